"""What an evaluation and a training run report: per-class tables (log, JSON, CSV), multi-scale +
flip results in metrics.json, the curves at the end of training."""
import csv
import json
import logging
import math

import numpy as np
import pytest
import torch

import structtoken_d2  # noqa: F401
from detectron2.data import MetadataCatalog
from structtoken_d2.data.datasets import shapes
from structtoken_d2.engine import Trainer
from structtoken_d2.engine.metrics_plot_hook import MetricsPlotHook
from structtoken_d2.evaluation import SemSegEvaluator
from tiny_runs import tiny_cfg

CLASSES = ["sky", "road", "car", "tree"]


@pytest.fixture
def four_classes():
    name = "test_reports_four_classes"
    if name not in MetadataCatalog.list():
        MetadataCatalog.get(name).set(stuff_classes=CLASSES, stuff_colors=[(0, 0, 0)] * 4, ignore_label=255)
    return name


def _label(path, label):
    import cv2

    cv2.imwrite(str(path), np.asarray(label, np.uint8))
    return str(path)


def test_per_class_table_is_sorted_and_its_mean_is_the_reported_miou(four_classes, tmp_path, caplog):
    # gt  = sky sky road road car car ;  pred = sky road road road sky car  (tree: in neither)
    # sky  IoU 1 / (2 + 2 - 1) = 1/3, Acc 1/2;  road IoU 2 / (2 + 3 - 2) = 2/3, Acc 1;
    # car  IoU 1 / (2 + 1 - 1) = 1/2, Acc 1/2;  tree: NaN, NaN.  mIoU = (1/3 + 2/3 + 1/2) / 3 = 1/2.
    gt, pred = [[0, 0, 1, 1, 2, 2]], [[0, 1, 1, 1, 0, 2]]
    evaluator = SemSegEvaluator(four_classes, distributed=False, output_dir=str(tmp_path / "inference"))
    evaluator.reset()
    scores = torch.nn.functional.one_hot(torch.tensor(pred), 4).permute(2, 0, 1).float()
    evaluator.process([{"file_name": "x", "sem_seg_file_name": _label(tmp_path / "x.png", gt)}], [{"sem_seg": scores}])
    with caplog.at_level(logging.INFO):
        res = evaluator.evaluate()["sem_seg"]
    assert res["mIoU"] == pytest.approx(50.0)

    with open(tmp_path / "inference" / f"per_class_{four_classes}.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == ["road", "car", "sky", "tree"]  # best IoU first, NaN last
    ious = [float(r["IoU"]) for r in rows]
    assert ious[:3] == pytest.approx([200 / 3, 50.0, 100 / 3]) and math.isnan(ious[3])
    assert [float(r["Acc"]) for r in rows][:3] == pytest.approx([100.0, 50.0, 50.0])
    table_mean = float(np.nanmean(ious))
    assert table_mean == pytest.approx(res["mIoU"], abs=1e-9)

    document = json.loads((tmp_path / "inference" / f"per_class_{four_classes}.json").read_text())
    assert document["mIoU"] == pytest.approx(res["mIoU"])
    assert document["classes"][3] == {"class": "tree", "IoU": None, "Acc": None}
    assert np.mean([c["IoU"] for c in document["classes"] if c["IoU"] is not None]) == pytest.approx(document["mIoU"])

    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "| road" in logged and "66.67" in logged and "| tree" in logged
    assert logged.index("| road") < logged.index("| car") < logged.index("| sky")


def test_evaluator_without_output_dir_writes_nothing(four_classes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evaluator = SemSegEvaluator(four_classes, distributed=False)
    evaluator.reset()
    evaluator.process([{"file_name": "x", "sem_seg_file_name": _label(tmp_path / "x.png", [[0]])}],
                      [{"sem_seg": torch.tensor([1.0, 0, 0, 0]).view(4, 1, 1)}])
    evaluator.evaluate()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_plot_hook_failure_is_a_warning_not_an_error(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        MetricsPlotHook(str(tmp_path)).after_train()  # no metrics.json there
    assert any("Could not plot the training curves" in r.getMessage() and str(tmp_path) in r.getMessage()
               for r in caplog.records)


def test_training_logs_multi_scale_flip_results_and_draws_its_curves(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.setattr(shapes, "SHAPES_SPLITS", {"train": (4, 0), "val": (2, 1)})
    out = tmp_path / "run"
    cfg = tiny_cfg({"TEST.AUG.ENABLED": True, "TEST.AUG.RATIOS": [1.0], "TEST.PREDICTION_IMAGES": 1,
                    "OUTPUT_DIR": str(out)})
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()

    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    final = records[-1]
    assert final["iteration"] == 2
    assert "sem_seg/mIoU" in final and "shapes_sem_seg_val_TTA/sem_seg/mIoU" in final
    assert (out / "curves.png").stat().st_size > 0
    for folder in ("inference", "inference_TTA"):
        assert (out / folder / "per_class_shapes_sem_seg_val.csv").is_file()
