"""Own data: folder datasets (Python and config), checks before the model is built, fine-tuning a
checkpoint to another class count end to end, and quick-run evaluation settings."""
import json

import cv2
import numpy as np
import pytest
import torch

import structtoken_d2  # noqa: F401
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from structtoken_d2 import add_structtoken_config
from structtoken_d2.data.datasets import (
    DatasetNotFoundError, folder, register_folder_dataset, register_folder_datasets_from_config,
)
from structtoken_d2.engine import StructTokenPredictor, Trainer
from structtoken_d2.engine.dataset_checks import check_datasets
from structtoken_d2.modeling import ClassCountMismatchError
from tiny_runs import REPO, SHAPES_CONFIG, load_tool, restored_loggers, tiny_cfg, tiny_opts, write_folder_dataset


def test_register_folder_dataset_matches_images_and_labels_by_name(tmp_path):
    images, labels = tmp_path / "img", tmp_path / "ann"
    (images / "sub").mkdir(parents=True)
    (labels / "sub").mkdir(parents=True)
    for stem, ext in (("b", "jpg"), ("a", "png"), ("sub/c", "jpeg"), ("unlabelled", "jpg")):
        cv2.imwrite(str(images / f"{stem}.{ext}"), np.zeros((4, 4, 3), np.uint8))
    for stem in ("a", "b", "sub/c"):
        cv2.imwrite(str(labels / f"{stem}.png"), np.zeros((4, 4), np.uint8))
    register_folder_dataset("test_own_data_mixed", str(images), str(labels), ["bg", "thing"])
    records = DatasetCatalog.get("test_own_data_mixed")
    assert [(r["file_name"], r["sem_seg_file_name"]) for r in records] == [
        (str(images / "a.png"), str(labels / "a.png")),
        (str(images / "b.jpg"), str(labels / "b.png")),
        (str(images / "sub/c.jpeg"), str(labels / "sub/c.png")),
    ]
    meta = MetadataCatalog.get("test_own_data_mixed")
    assert meta.stuff_classes == ["bg", "thing"] and len(meta.stuff_colors) == 2
    assert meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"

    cv2.imwrite(str(labels / "orphan.png"), np.zeros((4, 4), np.uint8))
    with pytest.raises(DatasetNotFoundError, match="1 of 4 label maps have no image.*orphan.png"):
        DatasetCatalog.get("test_own_data_mixed")


def test_config_registers_a_dataset_per_split(tmp_path):
    root = write_folder_dataset(tmp_path / "data", num_classes=3, splits={"train": 2, "val": 1, "test": 1})
    cfg = tiny_cfg({"DATASETS.FOLDER.ROOT": str(root), "DATASETS.FOLDER.CLASSES": ["bg", "a", "b"],
                    "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 3})
    assert register_folder_datasets_from_config(cfg) == ["folder_test", "folder_train", "folder_val"]
    check_datasets(cfg, ["folder_train", "folder_val", "folder_test"])
    assert [len(DatasetCatalog.get(f"folder_{s}")) for s in ("train", "val", "test")] == [2, 1, 1]
    assert MetadataCatalog.get("folder_val").stuff_classes == ["bg", "a", "b"]


def test_checking_datasets_registers_and_loads_nothing(tmp_path, monkeypatch):
    root = write_folder_dataset(tmp_path / "data", num_classes=3, splits={"train": 2, "val": 1})
    cfg = tiny_cfg({"DATASETS.FOLDER.ROOT": str(root), "DATASETS.FOLDER.CLASSES": ["bg", "a", "b"],
                    "DATASETS.TRAIN": ("folder_train",), "DATASETS.TEST": ("folder_val",),
                    "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 3, "OUTPUT_DIR": str(tmp_path / "out")})
    register_folder_datasets_from_config(cfg)
    loads = []
    real_load = folder.load_folder_dataset
    monkeypatch.setattr(folder, "load_folder_dataset", lambda name, *a: loads.append(name) or real_load(name, *a))
    other = tiny_cfg({"DATASETS.FOLDER.ROOT": str(tmp_path / "elsewhere"), "DATASETS.FOLDER.CLASSES": ["x"]})
    check_datasets(other, [])  # DATASETS.FOLDER of another config: not registered by a check
    check_datasets(cfg, ["folder_train", "folder_val"])
    assert loads == [] and MetadataCatalog.get("folder_val").image_root == str(root / "images/val")

    Trainer(cfg)  # checks the datasets, builds the model and the training loader: loads folder_train once
    assert loads == ["folder_train"]

    (root / "labels/val").rename(root / "labels/val_moved")  # a missing folder: found without loading
    with pytest.raises(DatasetNotFoundError, match=r"'folder_val' not found: missing .*labels/val\b"):
        check_datasets(cfg, ["folder_train", "folder_val"])
    assert loads == ["folder_train"]


@pytest.fixture
def model_never_built(monkeypatch):
    def fail(cls, cfg):
        raise AssertionError("the model was built before the datasets were checked")

    monkeypatch.setattr(Trainer, "build_model", classmethod(fail))


def test_missing_dataset_is_reported_before_building_vit_l(tmp_path, monkeypatch, model_never_built):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "empty"))
    cfg = get_cfg()
    add_structtoken_config(cfg)
    cfg.merge_from_file(str(REPO / "configs/ade20k/structtoken_cse_vit_l_640.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path / "out")])
    with pytest.raises(DatasetNotFoundError, match="ADEChallengeData2016"):
        Trainer(cfg)


def test_class_count_of_own_data_is_checked_before_building_the_model(tmp_path, model_never_built):
    root = write_folder_dataset(tmp_path / "data", num_classes=3)
    cfg = tiny_cfg({"DATASETS.FOLDER.ROOT": str(root), "DATASETS.FOLDER.CLASSES": ["bg", "a", "b"],
                    "DATASETS.TRAIN": ("folder_train",), "DATASETS.TEST": ("folder_val",)})  # NUM_CLASSES 6
    with pytest.raises(ClassCountMismatchError, match="'folder_train' has 3 classes.*NUM_CLASSES 3"):
        Trainer(cfg)
    train_net = load_tool("train_net")  # and for --eval-only, through the command line
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"")  # a file, never read: the class count is checked first
    opts = tiny_opts({"DATASETS.FOLDER.ROOT": str(root), "DATASETS.FOLDER.CLASSES": ["bg", "a", "b"],
                      "DATASETS.TEST": ("folder_val",), "MODEL.WEIGHTS": str(weights),
                      "OUTPUT_DIR": str(tmp_path / "out")})
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", str(SHAPES_CONFIG), "--eval-only"] + [str(o) for o in opts])
    with restored_loggers(), pytest.raises(SystemExit, match="'folder_val' has 3 classes"):
        train_net.main(args)


def test_predictor_has_the_metadata_of_a_config_folder_dataset(tmp_path):
    root = write_folder_dataset(tmp_path / "data", num_classes=3, splits={"val": 1})
    classes = ["sky", "road", "car"]
    cfg = tiny_cfg({"DATASETS.FOLDER.ROOT": str(root), "DATASETS.FOLDER.CLASSES": classes,
                    "DATASETS.TRAIN": (), "DATASETS.TEST": ("folder_val",), "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 3})
    weights = tmp_path / "model.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    cfg.defrost()
    cfg.MODEL.WEIGHTS = str(weights)
    predictor = StructTokenPredictor(cfg)
    assert predictor.metadata.stuff_classes == classes


def test_own_data_and_fine_tuning_to_another_class_count_end_to_end(tmp_path, monkeypatch):
    """A 4-class model trained on one folder dataset (Python API), then fine-tuned from the command
    line on a 3-class folder dataset (DATASETS.FOLDER.*), evaluated on one image."""
    first = write_folder_dataset(tmp_path / "first", num_classes=4)
    register_folder_dataset("test_own_data_first", str(first / "images/train"), str(first / "labels/train"),
                            ["bg", "x", "y", "z"])
    cfg = tiny_cfg({"DATASETS.TRAIN": ("test_own_data_first",), "DATASETS.TEST": (),
                    "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 4, "OUTPUT_DIR": str(tmp_path / "first_run")})
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    source = torch.load(tmp_path / "first_run/model_final.pth", weights_only=False)["model"]
    assert source["sem_seg_head.tokens"].shape[1] == 4

    second = write_folder_dataset(tmp_path / "second", num_classes=3)
    train_net = load_tool("train_net")
    out = tmp_path / "second_run"

    def run(out, *extra):
        opts = tiny_opts({"DATASETS.FOLDER.ROOT": str(second), "DATASETS.FOLDER.CLASSES": ["bg", "cat", "dog"],
                          "DATASETS.TRAIN": ("folder_train",), "DATASETS.TEST": ("folder_val",),
                          "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 3, "MODEL.WEIGHTS": str(tmp_path / "first_run/model_final.pth"),
                          "SOLVER.BASE_LR": 0.0, "TEST.EVAL_NUM_IMAGES": 1, "OUTPUT_DIR": str(out), **dict(extra)})
        args = train_net.default_argument_parser().parse_args(["--config-file", str(SHAPES_CONFIG)] + [str(o) for o in opts])
        with restored_loggers():
            return train_net.main(args)

    monkeypatch.setattr("sys.argv", ["train_net.py"])
    with pytest.raises(SystemExit, match="checkpoint has 4 classes.*built for 3"):  # the default: refused
        run(tmp_path / "refused")
    run(out, ("MODEL.STRUCTTOKEN.REINIT_CLASS_DEPENDENT_WEIGHTS", True))
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert sorted(k for m in metrics for k in m if k.startswith("sem_seg/IoU-")) == [
        "sem_seg/IoU-bg", "sem_seg/IoU-cat", "sem_seg/IoU-dog"]  # evaluated with the 3 new classes
    tuned = torch.load(out / "model_final.pth", weights_only=False)["model"]
    assert tuned["sem_seg_head.tokens"].shape[1] == 3
    for key in ("backbone.vit.pos_embed", "backbone.vit.blocks.0.attn.qkv.weight", "sem_seg_head.dec_proj.weight"):
        torch.testing.assert_close(tuned[key], source[key], rtol=0, atol=0)  # loaded (learning rate 0)
    log = (out / "log.txt").read_text()
    assert "Fine-tuning from 4 to 3 classes" in log and "sem_seg_head.tokens" in log


def test_quick_run_skips_the_final_evaluation_and_evaluates_a_subset(tmp_path, monkeypatch):
    root = write_folder_dataset(tmp_path / "data", num_classes=3, splits={"train": 2, "val": 3})
    base = {"DATASETS.FOLDER.ROOT": str(root), "DATASETS.FOLDER.CLASSES": ["bg", "a", "b"],
            "DATASETS.TRAIN": ("folder_train",), "DATASETS.TEST": ("folder_val",),
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 3, "SOLVER.MAX_ITER": 1, "OUTPUT_DIR": str(tmp_path / "out")}
    calls = []
    monkeypatch.setattr(Trainer, "test", classmethod(lambda cls, cfg, model, evaluators=None: calls.append(1) or {}))
    for eval_after_train, expected_calls in ((True, 1), (False, 0)):
        calls.clear()
        trainer = Trainer(tiny_cfg({**base, "TEST.EVAL_AFTER_TRAIN": eval_after_train}))
        trainer.resume_or_load(resume=False)
        trainer.train()
        assert len(calls) == expected_calls  # Detectron2's EvalHook evaluates after the last iteration

    loader = Trainer.build_test_loader(tiny_cfg({**base, "TEST.EVAL_NUM_IMAGES": 2}), "folder_val")
    assert [x[0]["file_name"] for x in loader] == [str(root / "images/val/0.png"), str(root / "images/val/1.png")]
