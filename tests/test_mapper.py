"""The training/test dataset mapper: image and label stay aligned through every transform."""
import os

import cv2
import numpy as np
import pytest
import torch

import structtoken_d2  # noqa: F401
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from structtoken_d2 import add_structtoken_config
from structtoken_d2.data import build_dataset_mapper
from structtoken_d2.data.transforms import CategoryAreaCrop, PhotometricDistortionTransform, keep_ratio_size

# Six well separated RGB colours: the class of a pixel is the index of its colour.
PALETTE = np.array([[0, 0, 255], [0, 255, 0], [255, 0, 0], [255, 255, 0], [0, 255, 255], [255, 0, 255]], np.uint8)


def _cfg(**overrides):
    cfg = get_cfg()
    add_structtoken_config(cfg)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.RESIZE_SCALE = [96, 64]
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = [48, 48]
    cfg.INPUT.PHOTOMETRIC_DISTORTION = False
    cfg.TEST.SCALE = [96, 64]
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


@pytest.fixture
def colour_coded_record(tmp_path):
    """A 64 x 96 image of 8 x 8 blocks with random classes (asymmetric), colour = PALETTE[label]."""
    rng = np.random.default_rng(0)
    label = np.kron(rng.integers(0, 6, (8, 12)), np.ones((8, 8), int)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "img.png"), PALETTE[label][:, :, ::-1])
    cv2.imwrite(str(tmp_path / "lbl.png"), label)
    return {"file_name": str(tmp_path / "img.png"), "sem_seg_file_name": str(tmp_path / "lbl.png"),
            "height": 64, "width": 96}


def _class_of_colour(image_chw: torch.Tensor) -> np.ndarray:
    pixels = image_chw.permute(1, 2, 0).numpy().astype(np.int32)
    distances = ((pixels[:, :, None, :] - PALETTE[None, None].astype(np.int32)) ** 2).sum(-1)
    return distances.argmin(-1)


def test_image_and_label_stay_aligned_through_resize_crop_flip_pad(colour_coded_record):
    mapper = build_dataset_mapper(_cfg(), is_train=True)
    np.random.seed(0)
    sizes, padded = set(), 0
    for _ in range(30):
        out = mapper(colour_coded_record)
        image, label = out["image"], out["sem_seg"].numpy()
        h, w = image.shape[1:]  # the image is not padded (the model pads it after normalising)
        assert h <= 48 and w <= 48 and label.shape == (48, 48)
        pad = label == 255  # the source label has no 255: every 255 is padding
        assert pad[h:].all() and pad[:, w:].all() and not pad[:h, :w].any()
        valid = ~pad
        agreement = (_class_of_colour(image)[valid[:h, :w]] == label[valid]).mean()
        assert agreement > 0.85, agreement  # bilinear image vs nearest label differ only at block edges
        sizes.add(valid.sum())
        padded += pad.any()
    assert len(sizes) > 1 and padded > 0  # random resizing happened, including below the crop size


def test_flip_is_applied_to_both(colour_coded_record):
    # With only a flip (no resize, no crop), every pixel must match exactly, flipped or not.
    cfg = _cfg(**{"INPUT.RESIZE_RATIO_RANGE": [1.0, 1.0], "INPUT.CROP.ENABLED": False, "INPUT.RESIZE_SCALE": [96, 64]})
    mapper = build_dataset_mapper(cfg, is_train=True)
    original = cv2.imread(colour_coded_record["sem_seg_file_name"], cv2.IMREAD_UNCHANGED)
    np.random.seed(1)
    flipped = 0
    for _ in range(10):
        out = mapper(colour_coded_record)
        label = out["sem_seg"].numpy()
        np.testing.assert_array_equal(_class_of_colour(out["image"]), label)
        flipped += (label == original[:, ::-1]).all()
    assert 0 < flipped < 10


def test_photometric_distortion_changes_colours_only():
    image = np.array([[[100, 100, 100], [200, 200, 200]], [[100, 100, 100], [10, 20, 30]]], np.uint8)
    label = np.array([[1, 2], [3, 255]], np.uint8)
    tfm = PhotometricDistortionTransform(brightness=20, contrast=1.5, saturation=None, hue=None,
                                         contrast_first=True, image_format="RGB")
    out = tfm.apply_image(image)
    # (100 + 20) * 1.5 = 180; (200 + 20) * 1.5 = 330 -> clipped to 255; (10..30 + 20) * 1.5.
    np.testing.assert_array_equal(out[0, 0], [180, 180, 180])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    np.testing.assert_array_equal(out[1, 1], [45, 60, 75])
    np.testing.assert_array_equal(tfm.apply_segmentation(label), label)


def test_photometric_distortion_truncates_to_uint8_after_every_step():
    # mmseg: brightness 100 + 20.7 -> 120 (uint8), then contrast 120 * 1.5 = 180; without the
    # truncation in between, 120.7 * 1.5 = 181.05 -> 181.
    image = np.full((1, 1, 3), 100, np.uint8)
    tfm = PhotometricDistortionTransform(brightness=20.7, contrast=1.5, saturation=None, hue=None,
                                         contrast_first=True, image_format="RGB")
    np.testing.assert_array_equal(tfm.apply_image(image), np.full((1, 1, 3), 180, np.uint8))


def _mmseg_photometric_distortion(bgr, brightness, contrast, saturation, hue, contrast_first):
    """mmseg 0.20.2's PhotoMetricDistortion.__call__ with its random draws given, transcribed from its
    source (convert = float32 * alpha + beta, clip, astype(uint8); mmcv.bgr2hsv / hsv2bgr = cv2.cvtColor)."""
    def convert(img, alpha=1, beta=0):
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    img = bgr
    if brightness is not None:
        img = convert(img, beta=brightness)
    if contrast is not None and contrast_first:
        img = convert(img, alpha=contrast)
    if saturation is not None:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        img[:, :, 1] = convert(img[:, :, 1], alpha=saturation)
        img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
    if hue is not None:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        img[:, :, 0] = (img[:, :, 0].astype(int) + hue) % 180
        img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
    if contrast is not None and not contrast_first:
        img = convert(img, alpha=contrast)
    return img


@pytest.mark.parametrize("image_format", ["RGB", "BGR"])
def test_photometric_distortion_equals_mmseg_step_by_step(image_format):
    # Every combination of steps on random images; the same OpenCV calls on arrays of the same shape
    # take the same SIMD paths, so the results are equal to the bit on any CPU.
    rng = np.random.default_rng(0)
    for case in range(32):
        rgb = rng.integers(0, 256, (37, 101, 3), dtype=np.uint8)
        params = dict(
            brightness=rng.uniform(-32, 32) if case & 1 else None,
            contrast=rng.uniform(0.5, 1.5) if case & 2 else None,
            saturation=rng.uniform(0.5, 1.5) if case & 4 else None,
            hue=int(rng.integers(-18, 19)) if case & 8 else None,
            contrast_first=bool(case & 16),
        )
        image = rgb if image_format == "RGB" else rgb[..., ::-1].copy()
        out = PhotometricDistortionTransform(image_format=image_format, **params).apply_image(image)
        out_rgb = out if image_format == "RGB" else out[..., ::-1]
        expected = _mmseg_photometric_distortion(rgb[..., ::-1].copy(), **params)[..., ::-1]
        np.testing.assert_array_equal(out_rgb, expected, err_msg=str(params))


def test_photometric_distortion_is_per_pixel(colour_coded_record):
    # In the full pipeline, pixels of one colour (one class) share one colour afterwards too, to one
    # grey level: OpenCV's uint8 HSV -> RGB converts each row in SIMD blocks (64 pixels with AVX-512,
    # 32 with AVX2, 16 with SSE) and the rest of the row pixel by pixel, and the two round differently
    # (mmcv's hsv2bgr the same). So on an AVX-512 CPU the last 32 of these 96-pixel rows can be one
    # level off the first 64; OPENCV_CPU_DISABLE=AVX512-SKX,AVX512-CLX reproduces an AVX2 CPU.
    cfg = _cfg(**{"INPUT.PHOTOMETRIC_DISTORTION": True, "INPUT.RESIZE_RATIO_RANGE": [1.0, 1.0],
                  "INPUT.CROP.ENABLED": False})
    mapper = build_dataset_mapper(cfg, is_train=True)
    np.random.seed(3)
    spreads, changed = [], False
    for _ in range(5):
        out = mapper(colour_coded_record)
        pixels = out["image"].permute(1, 2, 0).numpy().reshape(-1, 3).astype(np.int64)
        label = out["sem_seg"].numpy().reshape(-1)
        assert len(np.unique(label)) == len(PALETTE)
        for cls in np.unique(label):
            of_class = pixels[label == cls]
            spreads.append(int((of_class.max(0) - of_class.min(0)).max()))
            changed |= not np.array_equal(of_class[0], PALETTE[cls])
    assert max(spreads) <= 1
    assert changed  # the distortion did change colours, so the check above is not vacuous


def test_crop_respects_category_area_constraint(tmp_path):
    # Left half class 0, right half class 1 of a 32 x 96 map, a 32 x 32 crop: only 17 of the 65
    # crop positions hold both classes with <= 75% each (26%); retrying up to 10 times makes it ~95%.
    label = np.zeros((32, 96), np.uint8)
    label[:, 48:] = 1
    image = np.zeros((32, 96, 3), np.uint8)
    constrained = T.RandomCrop_CategoryAreaConstraint("absolute", (32, 32), 0.75, 255)
    plain = T.RandomCrop_CategoryAreaConstraint("absolute", (32, 32), 1.0, 255)

    def ok(aug):
        tfm = aug.get_transform(image, label)
        crop = tfm.apply_segmentation(label)
        return np.bincount(crop.ravel(), minlength=2).max() <= 0.75 * crop.size

    np.random.seed(0)
    assert sum(ok(constrained) for _ in range(50)) >= 42
    assert sum(ok(plain) for _ in range(50)) <= 22


def test_category_area_crop_draws_detectron2s_crops():
    # Same np.random draws, so the same crop as Detectron2's RandomCrop_CategoryAreaConstraint, whether
    # its first draw is kept or redrawn (the pixel count differs: bincount instead of unique).
    rng = np.random.default_rng(0)
    redrawn = 0
    for trial in range(60):
        h, w = rng.integers(40, 90, size=2)
        label = np.zeros((h, w), np.uint8)
        label[:, rng.integers(w):] = rng.integers(1, 4)
        label[rng.integers(h):, : rng.integers(w)] = 255
        crop = (32, int(rng.integers(20, 40)))
        transforms = []
        for aug in (CategoryAreaCrop("absolute", crop, 0.75, 255),
                    T.RandomCrop_CategoryAreaConstraint("absolute", crop, 0.75, 255),
                    T.RandomCrop_CategoryAreaConstraint("absolute", crop, 1.0, 255)):
            np.random.seed(trial)
            tfm = aug.get_transform(np.zeros((h, w, 3), np.uint8), label)
            transforms.append((tfm.x0, tfm.y0, tfm.w, tfm.h))
        assert transforms[0] == transforms[1]
        redrawn += transforms[1] != transforms[2]
    assert redrawn >= 10  # the constraint did redraw crops, so the equality covers its counting


def test_keep_ratio_size():
    # img_scale (2048, 512): a 100 x 200 image -> factor min(2048/200, 512/100) = 5.12.
    assert keep_ratio_size(100, 200, (2048, 512), 1.0) == (512, 1024)
    # A very wide image is limited by the long side: 100 x 1000 -> factor 2.048.
    assert keep_ratio_size(100, 1000, (2048, 512), 1.0) == (205, 2048)
    # Ratio 0.5 halves the scale: (1024, 256) -> 100 x 200 at factor 2.56.
    assert keep_ratio_size(100, 200, (2048, 512), 0.5) == (256, 512)


def test_test_mapper_resizes_to_test_scale_and_keeps_original_size(colour_coded_record):
    out = build_dataset_mapper(_cfg(**{"TEST.SCALE": [192, 128]}), is_train=False)(colour_coded_record)
    assert tuple(out["image"].shape) == (3, 128, 192)
    assert (out["height"], out["width"]) == (64, 96) and "sem_seg" not in out
    raw = build_dataset_mapper(_cfg(), is_train=False, resize_to_test_scale=False)(colour_coded_record)
    assert tuple(raw["image"].shape) == (3, 64, 96)


def test_unknown_mapper_name_is_a_clear_error():
    with pytest.raises(KeyError, match="not registered"):
        build_dataset_mapper(_cfg(**{"INPUT.DATASET_MAPPER_NAME": "nope"}), is_train=True)


def test_cached_decoding_gives_the_same_samples_and_reads_each_file_once(colour_coded_record, tmp_path):
    # Photometric distortion, resize, crop and flip on: the cached arrays must come out unchanged by
    # the augmentations of earlier samples, so both mappers give the same samples for the same seeds.
    second = dict(colour_coded_record, file_name=str(tmp_path / "img2.png"))
    cv2.imwrite(second["file_name"], 255 - cv2.imread(colour_coded_record["file_name"]))
    records = [colour_coded_record, second] * 6
    outputs = {}
    for cached in (False, True):
        mapper = build_dataset_mapper(_cfg(**{"INPUT.PHOTOMETRIC_DISTORTION": True,
                                              "DATALOADER.CACHE_DECODED_IMAGES": cached}), is_train=True)
        np.random.seed(3)
        outputs[cached] = [mapper(r) for r in records[:2]]
        if cached:  # from here on the files are not read
            for path in (second["file_name"], colour_coded_record["sem_seg_file_name"]):
                os.remove(path)
        outputs[cached] += [mapper(r) for r in records[2:]]
    for plain, cached in zip(outputs[False], outputs[True]):
        assert torch.equal(plain["image"], cached["image"]) and torch.equal(plain["sem_seg"], cached["sem_seg"])
    assert len({tuple(o["image"].shape) for o in outputs[True]}) > 1  # the samples did differ
