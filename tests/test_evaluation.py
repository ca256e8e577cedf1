"""SemSegEvaluator against hand-computed confusion matrices and metrics."""
import math

import numpy as np
import pytest
import torch

import structtoken_d2  # noqa: F401
from detectron2.data import MetadataCatalog
from structtoken_d2.evaluation import SemSegEvaluator, confusion_matrix

CLASSES = ["a", "b", "c", "d"]


@pytest.fixture
def dataset(tmp_path):
    name = "test_eval_four_classes"
    if name not in MetadataCatalog.list():
        MetadataCatalog.get(name).set(stuff_classes=CLASSES, stuff_colors=[(0, 0, 0)] * 4, ignore_label=255)
    return name


def _write_label(path, label):
    import cv2

    cv2.imwrite(str(path), np.asarray(label, np.uint8))
    return str(path)


def _scores(pred):
    """[H, W] class ids -> [4, H, W] one-hot scores."""
    return torch.nn.functional.one_hot(torch.as_tensor(pred), 4).permute(2, 0, 1).float()


# Image 1 (2 x 4): gt row0 = 0 0 1 255, row1 = 1 1 255 0; pred row0 = 0 1 1 3, row1 = 1 0 2 0.
# Image 2 (1 x 3): gt = 0 255 1;                          pred = 3 2 1.
# Valid (gt != 255) pairs (gt, pred): img1: (0,0) (0,1) (1,1) (1,1) (1,0) (0,0); img2: (0,3) (1,1).
# Confusion (rows gt, cols pred):  gt0: [2, 1, 0, 1]   gt1: [1, 3, 0, 0]   gt2, gt3: zeros.
GT1 = [[0, 0, 1, 255], [1, 1, 255, 0]]
PRED1 = [[0, 1, 1, 3], [1, 0, 2, 0]]
GT2 = [[0, 255, 1]]
PRED2 = [[3, 2, 1]]
EXPECTED_CONF = [[2, 1, 0, 1], [1, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_confusion_matrix_skips_ignore():
    conf = confusion_matrix(torch.tensor(PRED1), torch.tensor(GT1), 4, 255)
    np.testing.assert_array_equal(conf.numpy(), [[2, 1, 0, 0], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


def test_confusion_matrix_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="outside 0..3"):
        confusion_matrix(torch.tensor([[0]]), torch.tensor([[7]]), 4, 255)


def test_metrics_hand_computed(dataset, tmp_path):
    evaluator = SemSegEvaluator(dataset, distributed=False)
    evaluator.reset()
    inputs = [
        {"file_name": "1.png", "sem_seg_file_name": _write_label(tmp_path / "1.png", GT1)},
        {"file_name": "2.png", "sem_seg_file_name": _write_label(tmp_path / "2.png", GT2)},
    ]
    evaluator.process(inputs[:1], [{"sem_seg": _scores(PRED1)}])
    evaluator.process(inputs[1:], [{"sem_seg": _scores(PRED2)}])
    np.testing.assert_array_equal(evaluator._conf.numpy(), EXPECTED_CONF)
    res = evaluator.evaluate()["sem_seg"]
    # IoU a = 2 / (4 + 3 - 2) = 0.4; b = 3 / (4 + 4 - 3) = 0.6; c is predicted only on ignored
    # pixels, so absent from both -> NaN, left out of the mean; d predicted once, never in gt -> 0.
    assert res["IoU-a"] == pytest.approx(40.0)
    assert res["IoU-b"] == pytest.approx(60.0)
    assert math.isnan(res["IoU-c"]) and res["IoU-d"] == 0.0
    assert res["mIoU"] == pytest.approx(100 / 3)
    # ACC a = 2/4, b = 3/4; c, d absent from gt -> NaN, left out of mACC.
    assert res["ACC-a"] == pytest.approx(50.0) and res["ACC-b"] == pytest.approx(75.0)
    assert math.isnan(res["ACC-c"]) and math.isnan(res["ACC-d"])
    assert res["mACC"] == pytest.approx(62.5)
    assert res["pACC"] == pytest.approx(100 * 5 / 8)
    # fwIoU: frequencies 4/8, 4/8 -> 0.5 * 0.4 + 0.5 * 0.6.
    assert res["fwIoU"] == pytest.approx(50.0)


def test_class_absent_from_gt_and_prediction_is_nan_and_excluded(dataset, tmp_path):
    evaluator = SemSegEvaluator(dataset, distributed=False)
    evaluator.reset()
    gt = [[0, 0], [1, 255]]
    pred = [[0, 1], [1, 1]]
    evaluator.process([{"file_name": "x", "sem_seg_file_name": _write_label(tmp_path / "x.png", gt)}],
                      [{"sem_seg": _scores(pred)}])
    res = evaluator.evaluate()["sem_seg"]
    # a: 1 / (2 + 1 - 1) = 0.5; b: 1 / (1 + 2 - 1) = 0.5; c, d never appear -> NaN, not in the mean.
    assert math.isnan(res["IoU-c"]) and math.isnan(res["IoU-d"])
    assert res["mIoU"] == pytest.approx(50.0)


def test_prediction_of_wrong_size_is_an_error(dataset, tmp_path):
    evaluator = SemSegEvaluator(dataset, distributed=False)
    evaluator.reset()
    record = {"file_name": "x", "sem_seg_file_name": _write_label(tmp_path / "x.png", [[0, 1]])}
    with pytest.raises(ValueError, match="original image size"):
        evaluator.process([record], [{"sem_seg": torch.zeros(4, 3, 3)}])
