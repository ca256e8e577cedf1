"""The details of the authors' mmseg pipeline around the model: the logits resize of a window
(TEST.LOGITS_RESIZE), OpenCV resizing as mmcv, padding in normalised space, reduce_zero_label."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import structtoken_d2  # noqa: F401  (registrations)
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from structtoken_d2 import add_structtoken_config
from structtoken_d2.data.transforms import OpenCVResizeTransform, ResizeToScale
from structtoken_d2.modeling.test_time_augmentation import SemanticSegmentorWithTTA


def _model_cfg(**overrides):
    cfg = get_cfg()
    add_structtoken_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "StructTokenSegmentor"
    cfg.MODEL.BACKBONE.NAME = "TimmViT"
    cfg.MODEL.SEM_SEG_HEAD.NAME = "StructTokenHead"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["last_feat"]
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.VIT.NAME = "vit_tiny_patch16_384"
    cfg.MODEL.VIT.EMBED_DIM, cfg.MODEL.VIT.DEPTH, cfg.MODEL.VIT.NUM_HEADS = 32, 1, 2
    cfg.MODEL.VIT.IMG_SIZE = [64, 64]
    cfg.MODEL.STRUCTTOKEN.NUM_BLOCKS = 1
    cfg.MODEL.STRUCTTOKEN.TOKEN_SIZE = [4, 4]
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [100.0, 120.0, 140.0], [50.0, 60.0, 70.0]
    for key, value in overrides.items():
        node = cfg
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return cfg


# ------------------------------------------------------------------------ TEST.LOGITS_RESIZE
def _ramp_model(logits_resize):
    """A segmentor whose head logits are a fixed ramp: one class, value j in logit column j."""
    model = build_model(_model_cfg(**{"TEST.LOGITS_RESIZE": logits_resize})).eval()
    model.decode = lambda x: torch.arange(-(-x.shape[-1] // 16), dtype=torch.float32).expand(
        x.shape[0], 1, -(-x.shape[-2] // 16), -1)
    return model


@pytest.mark.parametrize("rule", ["aligned", "mmseg"])
def test_logits_resize_rules_by_hand(rule):
    # A 16 x 20 image: the ViT pads it to 16 x 32, two logit columns (values 0 and 1).
    # Bilinear (align_corners False) maps output pixel x to source position (x + 0.5) * n / N - 0.5
    # in the 2 logit columns: N = 32 (the padded width, then cropped) for "aligned", N = 20 for "mmseg".
    model = _ramp_model(rule)
    with torch.no_grad():
        out = model.inference_logits(torch.zeros(1, 3, 16, 20), "whole")
    assert out.shape == (1, 1, 16, 20)
    n_out = {"aligned": 32, "mmseg": 20}[rule]
    x = np.arange(20)
    expected = np.clip((x + 0.5) * 2 / n_out - 0.5, 0, 1)
    np.testing.assert_allclose(out[0, 0, 0].numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(out[0, 0].numpy(), np.broadcast_to(expected, (16, 20)), atol=1e-6)


def test_logits_resize_rules_agree_on_multiples_of_16():
    images = torch.rand(1, 3, 32, 48) * 255
    with torch.no_grad():
        aligned = _ramp_model("aligned").inference_logits(images, "whole")
        mmseg = _ramp_model("mmseg").inference_logits(images, "whole")
    torch.testing.assert_close(aligned, mmseg)


def test_unknown_logits_resize_is_refused():
    with pytest.raises(ValueError, match=r"TEST.LOGITS_RESIZE='nearest'.*aligned, mmseg"):
        build_model(_model_cfg(**{"TEST.LOGITS_RESIZE": "nearest"}))


# ------------------------------------------------------------------- resizing as mmcv (cv2)
def _bilinear_reference(image_hwc: np.ndarray, size) -> np.ndarray:
    """Bilinear resize without antialiasing (half-pixel centres, edges clamped), float64."""
    h, w = image_hwc.shape[:2]
    new_h, new_w = size

    def taps(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    y0, y1, fy = taps(h, new_h)
    x0, x1, fx = taps(w, new_w)
    img = image_hwc.astype(np.float64)
    rows = img[y0] * (1 - fy)[:, None, None] + img[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


def _random_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# (ratio, size): scale (90, 60) x 0.75 = long side int(67.5) = 67, so factor min(67/90, 45/60)
# and (int(60 * 67/90 + 0.5), 67) = (45, 67), as mmcv's rescale_size.
@pytest.mark.parametrize("ratio, size", [(0.5, (30, 45)), (0.75, (45, 67)), (1.25, (75, 112))])
def test_resize_to_scale_is_bilinear_without_antialiasing(ratio, size):
    image = _random_image(60, 90)
    tfm = ResizeToScale((90, 60), (ratio, ratio)).get_transform(image)
    assert isinstance(tfm, OpenCVResizeTransform)
    out = tfm.apply_image(image)
    assert out.shape == (*size, 3) and out.dtype == np.uint8
    reference = _bilinear_reference(image, size)
    assert np.abs(out - reference).max() <= 1.0  # OpenCV's uint8 fixed-point rounding
    if ratio < 1:  # PIL's antialiased bilinear (the old resize) averages instead of sampling
        pil = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR)).astype(np.float64)
        assert np.abs(pil - reference).max() > 20


def test_label_resize_is_centre_aligned_nearest():
    # Labels keep the pixels of PIL's nearest (half-pixel centres, aligned with the bilinear image).
    label = np.random.default_rng(1).integers(0, 150, (37, 53), dtype=np.uint8)
    tfm = OpenCVResizeTransform(37, 53, 23, 80)
    out = tfm.apply_segmentation(label)
    pil = np.asarray(Image.fromarray(label).resize((80, 23), Image.NEAREST))
    np.testing.assert_array_equal(out, pil)
    # Away from ties, that is source index floor((i + 0.5) * n_in / n_out), by hand:
    assert out[5, 7] == label[int(5.5 * 37 / 23), int(7.5 * 53 / 80)]
    assert tfm.inverse().apply_image(np.zeros((23, 80, 3), np.uint8)).shape == (37, 53, 3)


def test_multi_scale_tta_resizes_the_image_as_opencv():
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, batched_inputs):
            seen.extend(x["image"] for x in batched_inputs)
            return [{"sem_seg": torch.zeros(2, x["height"], x["width"])} for x in batched_inputs]

    cfg = get_cfg()
    add_structtoken_config(cfg)
    image = _random_image(64, 96, seed=2)
    tta = SemanticSegmentorWithTTA(cfg, Recorder(), ratios=[0.5], flip=False, scale=[96, 64])
    tta([{"image": torch.as_tensor(image.transpose(2, 0, 1)), "height": 64, "width": 96}])
    (resized,) = seen
    assert resized.shape == (3, 32, 48)
    reference = _bilinear_reference(image, (32, 48)).transpose(2, 0, 1)
    assert np.abs(resized.numpy() - reference).max() <= 1.0


# ------------------------------------------------------------ padding in normalised space
def test_padding_of_a_training_crop_is_zero_after_normalisation(tmp_path):
    """A 40 x 40 image, crop 48: the mapper pads only the label (255); the model normalises the
    image and pads it with 0, i.e. with the mean colour (mmseg: Normalize, then Pad)."""
    import cv2
    from structtoken_d2.data import build_dataset_mapper

    image = _random_image(40, 40, seed=3)
    cv2.imwrite(str(tmp_path / "img.png"), image[:, :, ::-1])
    cv2.imwrite(str(tmp_path / "lbl.png"), np.ones((40, 40), np.uint8))
    record = {"file_name": str(tmp_path / "img.png"), "sem_seg_file_name": str(tmp_path / "lbl.png"),
              "height": 40, "width": 40}
    cfg = _model_cfg(**{"INPUT.RESIZE_SCALE": [40, 40], "INPUT.RESIZE_RATIO_RANGE": [1.0, 1.0],
                        "INPUT.CROP.ENABLED": True, "INPUT.CROP.TYPE": "absolute", "INPUT.CROP.SIZE": [48, 48],
                        "INPUT.PHOTOMETRIC_DISTORTION": False})
    np.random.seed(0)
    mapped = build_dataset_mapper(cfg, is_train=True)(record)
    assert mapped["sem_seg"].shape == (48, 48) and (mapped["sem_seg"][40:] == 255).all()

    model = build_model(cfg).train()
    seen = []
    model.decode = lambda x: seen.append(x) or torch.zeros(x.shape[0], 3, x.shape[-2] // 16, x.shape[-1] // 16)
    model([mapped])
    (x,) = seen
    assert x.shape == (1, 3, 48, 48)
    assert torch.equal(x[..., 40:, :], torch.zeros(1, 3, 8, 48)) and torch.equal(x[..., 40:], torch.zeros(1, 3, 48, 8))
    assert mapped["image"].shape == (3, 40, 40)
    img = mapped["image"].double()
    mean, std = torch.tensor([100.0, 120.0, 140.0]).view(3, 1, 1), torch.tensor([50.0, 60.0, 70.0]).view(3, 1, 1)
    torch.testing.assert_close(x[0, :, :40, :40].double(), (img - mean) / std, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------- reduce_zero_label
def test_reduce_zero_label_keeps_ignore():
    # mmseg: 0 -> 255, l -> l - 1, and (its 254 -> 255 step) 255 stays 255.
    from structtoken_d2.data.labels import reduce_zero_label

    label = np.array([[0, 1, 2], [150, 254, 255]], np.uint8)
    np.testing.assert_array_equal(reduce_zero_label(label), [[255, 0, 1], [149, 253, 255]])
