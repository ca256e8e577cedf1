"""Predictors give the evaluation path's prediction: StructTokenPredictor (a Detectron2
DefaultPredictor) always, Detectron2's own DefaultPredictor on images its resize leaves as the
evaluation does; every config's INPUT.MIN/MAX_SIZE_TEST equal its keep-ratio TEST.SCALE resize."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import structtoken_d2  # noqa: F401
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor
from structtoken_d2 import add_structtoken_config
from structtoken_d2.data.datasets import register_folder_dataset
from structtoken_d2.data.transforms import keep_ratio_size
from structtoken_d2.engine import StructTokenPredictor, Trainer
from structtoken_d2.modeling.checkpoint import WeightsNotFoundError
from structtoken_d2.modeling import StructTokenCheckpointer
from structtoken_d2.modeling.test_time_augmentation import SemanticSegmentorWithTTA
from tiny_runs import REPO, tiny_cfg

CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml"))


def _evaluation_logits(cfg, dataset_name, model):
    """The logits the evaluation scores: the test loader's input through the model."""
    (inputs,) = [batch for batch in Trainer.build_test_loader(cfg, dataset_name)]
    with torch.no_grad():
        return model(inputs)[0]["sem_seg"]


def _tta_evaluation_scores(cfg, dataset_name, model):
    """What ``Trainer.test_with_TTA`` scores: the original image through the TTA wrapper."""
    (inputs,) = [batch for batch in Trainer.build_test_loader(cfg, dataset_name, resize_to_test_scale=False)]
    return SemanticSegmentorWithTTA(cfg, model)(inputs)[0]["sem_seg"]


@pytest.fixture
def trained(tmp_path):
    """A tiny config (test scale 32) with its random weights saved as MODEL.WEIGHTS, and the model."""
    torch.manual_seed(0)
    cfg = tiny_cfg({"DATASETS.TRAIN": (), "DATASETS.TEST": ()})
    model = Trainer.build_model(cfg)
    StructTokenCheckpointer(model, save_dir=str(tmp_path)).save("weights")
    cfg.MODEL.WEIGHTS = str(tmp_path / "weights.pth")
    model.eval()
    return cfg, model


def _one_image_dataset(tmp_path: Path, name: str, size):
    (tmp_path / name / "img").mkdir(parents=True)
    (tmp_path / name / "ann").mkdir()
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / name / "img/x.png"), image)
    cv2.imwrite(str(tmp_path / name / "ann/x.png"), np.zeros(size, np.uint8))
    register_folder_dataset(name, str(tmp_path / name / "img"), str(tmp_path / name / "ann"), [str(i) for i in range(6)])
    return image


@pytest.mark.parametrize("size", [(45, 71), (20, 26), (32, 32)])  # shrunk, enlarged, unchanged by the test resize
def test_structtoken_predictor_equals_the_evaluation_path(tmp_path, trained, size):
    cfg, model = trained
    name = f"test_predictor_{size[0]}x{size[1]}"
    image_bgr = _one_image_dataset(tmp_path, name, size)
    expected = _evaluation_logits(cfg, name, model)
    predicted = StructTokenPredictor(cfg)(image_bgr)["sem_seg"]
    assert predicted.shape == (6, *size)
    torch.testing.assert_close(predicted, expected, rtol=0, atol=0)


def test_structtoken_predictor_with_test_aug_equals_the_tta_evaluation(tmp_path, trained):
    cfg, model = trained
    cfg.TEST.AUG.ENABLED, cfg.TEST.AUG.RATIOS, cfg.TEST.AUG.FLIP = True, [0.75, 1.25], True
    image_bgr = _one_image_dataset(tmp_path, "test_predictor_tta", (45, 71))
    expected = _tta_evaluation_scores(cfg, "test_predictor_tta", model)
    plain = _evaluation_logits(cfg, "test_predictor_tta", model)
    predicted = StructTokenPredictor(cfg)(image_bgr)["sem_seg"]
    assert predicted.shape == (6, 45, 71)
    torch.testing.assert_close(predicted.sum(0), torch.ones(45, 71))  # probabilities, not logits
    assert not torch.equal(predicted.argmax(0), plain.argmax(0))  # TTA changes the prediction here
    torch.testing.assert_close(predicted, expected, rtol=0, atol=0)


@pytest.mark.parametrize("weights", ["", "no/such/model_final.pth"])
def test_predictor_without_a_weights_file_is_refused(weights):
    cfg = tiny_cfg({"DATASETS.TRAIN": (), "DATASETS.TEST": (), "MODEL.WEIGHTS": weights})
    with pytest.raises(WeightsNotFoundError, match=f"MODEL.WEIGHTS '{weights}' is not a file"):
        StructTokenPredictor(cfg)


def test_detectron2_default_predictor_equals_the_evaluation_path_at_the_test_scale(tmp_path, trained):
    cfg, model = trained
    image_bgr = _one_image_dataset(tmp_path, "test_predictor_d2", (32, 32))
    expected = _evaluation_logits(cfg, "test_predictor_d2", model)
    torch.testing.assert_close(DefaultPredictor(cfg)(image_bgr)["sem_seg"], expected, rtol=0, atol=0)


@pytest.mark.parametrize("rel", CONFIGS)
def test_min_max_size_test_is_the_keep_ratio_test_scale_resize(rel):
    cfg = get_cfg()
    add_structtoken_config(cfg)
    cfg.merge_from_file(str(REPO / rel))
    for h, w in [(512, 683), (683, 512), (375, 500), (1024, 2048), (96, 4000), (4000, 96), (128, 128), (1, 1)]:
        d2 = T.ResizeShortestEdge.get_output_shape(h, w, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        assert d2 == keep_ratio_size(h, w, cfg.TEST.SCALE, 1.0), (rel, h, w)
