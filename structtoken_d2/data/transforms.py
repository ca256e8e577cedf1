"""The augmentations of the authors' mmseg pipeline that Detectron2 lacks: keep-ratio resizing
relative to an "img_scale" with a random ratio, done with OpenCV as mmcv does, and
PhotoMetricDistortion; and Detectron2's category-area crop with a cheaper pixel count."""
from typing import Sequence, Tuple

import cv2
import numpy as np
from detectron2.data.transforms import (Augmentation, CropTransform, NoOpTransform, RandomCrop_CategoryAreaConstraint,
                                        ResizeTransform, Transform)


def keep_ratio_size(height: int, width: int, scale: Sequence[int], ratio: float) -> Tuple[int, int]:
    """mmseg keep-ratio rescale: the largest (h, w) with the image's aspect ratio whose long side is
    at most ``max(scale) * ratio`` and short side at most ``min(scale) * ratio``."""
    long_edge, short_edge = int(max(scale) * ratio), int(min(scale) * ratio)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


class OpenCVResizeTransform(ResizeTransform):
    """Detectron2's ``ResizeTransform`` with images resized as mmcv's ``imrescale`` does (what
    mmseg's ``Resize`` calls in training and at test time): ``cv2.resize`` ``INTER_LINEAR``
    (bilinear, half-pixel centres, no antialiasing: shrinking samples the image rather than
    averaging it, unlike PIL's bilinear). ``[H, W]`` or ``[H, W, C]`` arrays of a dtype OpenCV
    resizes (uint8, uint16, int16, float32, float64).

    Label maps: nearest neighbour on half-pixel centres (``INTER_NEAREST_EXACT``, the same pixels
    as PIL's / Detectron2's nearest). mmcv uses ``INTER_NEAREST``, which samples ``floor(i * s)``
    instead of ``floor((i + 0.5) * s)`` and so shifts labels against the bilinear image by up to
    half a source pixel; that misalignment is not reproduced."""

    def __init__(self, h: int, w: int, new_h: int, new_w: int, interp: int = cv2.INTER_LINEAR):
        """``interp``: the OpenCV interpolation flag used for images."""
        super().__init__(h, w, new_h, new_w, interp)

    def apply_image(self, img: np.ndarray, interp=None) -> np.ndarray:
        if img.shape[:2] != (self.h, self.w):
            raise ValueError(f"OpenCVResizeTransform built for {(self.h, self.w)}, got an array of {img.shape[:2]}")
        flag = self.interp if interp is None else interp
        out = cv2.resize(np.ascontiguousarray(img), (self.new_w, self.new_h), interpolation=flag)
        return out[..., None] if img.ndim == 3 and out.ndim == 2 else out  # cv2 drops a single channel

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self.apply_image(segmentation, interp=cv2.INTER_NEAREST_EXACT)

    def inverse(self) -> Transform:
        return OpenCVResizeTransform(self.new_h, self.new_w, self.h, self.w, self.interp)


class ResizeToScale(Augmentation):
    """Keep-ratio resize to ``scale`` times a ratio drawn uniformly from ``ratio_range``
    (mmseg ``Resize(img_scale=scale, ratio_range=ratio_range, keep_ratio=True)``), with
    :class:`OpenCVResizeTransform`: images bilinear as ``cv2.resize`` (no antialiasing), label
    maps nearest neighbour."""

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float] = (1.0, 1.0)):
        super().__init__()
        if len(scale) != 2 or min(scale) <= 0:
            raise ValueError(f"scale must be (long side, short side) > 0, got {scale}")
        if len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range}")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        h, w = image.shape[:2]
        ratio = np.random.uniform(*self.ratio_range)
        new_h, new_w = keep_ratio_size(h, w, self.scale, ratio)
        return OpenCVResizeTransform(h, w, new_h, new_w)


def _scale_and_shift(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """``img * alpha + beta`` in float32, clipped to 0..255 and truncated to uint8: mmseg's
    ``PhotoMetricDistortion.convert``, which ends every step."""
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


class PhotometricDistortionTransform(Transform):
    """Fixed photometric changes of a uint8 ``[H, W, 3]`` image; label maps and coordinates are kept.

    mmseg's ``PhotoMetricDistortion`` step by step, each skipped when its parameter is None:
    brightness delta, contrast factor (here when ``contrast_first``), saturation factor, hue shift
    (OpenCV hue units, 0..180), contrast (here when not ``contrast_first``). Each step ends in uint8
    (clipped to 0..255, truncated), and saturation and hue each convert to HSV and back with
    OpenCV, as mmcv's ``bgr2hsv`` / ``hsv2bgr`` do.

    OpenCV converts uint8 HSV to RGB in SIMD blocks along each row (64 pixels with AVX-512, 32 with
    AVX2, 16 with SSE) and the rest of the row pixel by pixel; the two paths round differently, so
    one colour may come out one grey level apart depending on its column and the CPU. mmcv has the
    same behaviour; it is kept (tests/test_mapper.py says so where it matters).
    """

    def __init__(self, brightness, contrast, saturation, hue, contrast_first: bool, image_format: str):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        if img.dtype != np.uint8:
            raise ValueError(f"PhotometricDistortionTransform needs a uint8 image, got {img.dtype}")
        out = img
        if self.brightness is not None:
            out = _scale_and_shift(out, beta=self.brightness)
        if self.contrast is not None and self.contrast_first:
            out = _scale_and_shift(out, alpha=self.contrast)
        if self.saturation is not None:
            out = self._in_hsv(out, 1, lambda s: _scale_and_shift(s, alpha=self.saturation))
        if self.hue is not None:
            out = self._in_hsv(out, 0, lambda h: (h.astype(np.int64) + self.hue) % 180)
        if self.contrast is not None and not self.contrast_first:
            out = _scale_and_shift(out, alpha=self.contrast)
        return out

    def _in_hsv(self, img: np.ndarray, channel: int, change) -> np.ndarray:
        """``img`` converted to HSV (uint8, OpenCV), ``change`` applied to one channel, converted back."""
        to_hsv, from_hsv = (
            (cv2.COLOR_BGR2HSV, cv2.COLOR_HSV2BGR) if self.image_format == "BGR"
            else (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB)
        )
        hsv = cv2.cvtColor(np.ascontiguousarray(img), to_hsv)
        hsv[..., channel] = change(hsv[..., channel])
        return cv2.cvtColor(hsv, from_hsv)

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords


class PhotometricDistortion(Augmentation):
    """mmseg PhotoMetricDistortion: each of brightness (+-``brightness_delta``), contrast
    (``contrast_range``), saturation (``saturation_range``) and hue (+-``hue_delta``) applied with
    probability 0.5, contrast either first or last with equal probability."""

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: int = 18,
        image_format: str = "RGB",
    ):
        super().__init__()
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"PhotometricDistortion needs an RGB or BGR image, got format {image_format!r}")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        if image.ndim != 3 or image.shape[2] != 3:
            return NoOpTransform()
        rand = np.random

        def maybe(sample):
            return sample() if rand.randint(2) else None

        return PhotometricDistortionTransform(
            brightness=maybe(lambda: rand.uniform(-self.brightness_delta, self.brightness_delta)),
            contrast=maybe(lambda: rand.uniform(*self.contrast_range)),
            saturation=maybe(lambda: rand.uniform(*self.saturation_range)),
            hue=maybe(lambda: rand.randint(-self.hue_delta, self.hue_delta)),
            contrast_first=bool(rand.randint(2)),
            image_format=self.image_format,
        )


class CategoryAreaCrop(RandomCrop_CategoryAreaConstraint):
    """Detectron2's ``RandomCrop_CategoryAreaConstraint`` (mmseg's ``RandomCrop`` with ``cat_max_ratio``):
    the crop is drawn again, up to 10 times, while one category covers ``single_category_max_area`` or
    more of its non-ignored pixels. The same draws from ``np.random`` in the same order, so the same
    crops; the pixels are counted with ``np.bincount`` instead of ``np.unique`` (a sort), and each
    window once. Detectron2's count took a quarter of the main job's mapper time (0.5 of 2.0 ms per
    128 px image, docs/speed.md). Label maps: ``[H, W]`` of non-negative integers (uint8 train ids)."""

    def get_transform(self, image, sem_seg):
        if self.single_category_max_area >= 1.0:
            return self.crop_aug.get_transform(image)
        h, w = sem_seg.shape
        rejected = set()  # windows already counted: a crop the size of the image is drawn 10 times
        for _ in range(10):
            crop_h, crop_w = self.crop_aug.get_crop_size((h, w))
            y0 = np.random.randint(h - crop_h + 1)
            x0 = np.random.randint(w - crop_w + 1)
            if (y0, x0, crop_h, crop_w) in rejected:
                continue
            if self._accepts(sem_seg[y0 : y0 + crop_h, x0 : x0 + crop_w]):
                break
            rejected.add((y0, x0, crop_h, crop_w))
        return CropTransform(x0, y0, crop_w, crop_h)

    def _accepts(self, crop: np.ndarray) -> bool:
        counts = np.bincount(crop.ravel())
        if self.ignored_category is not None and self.ignored_category < len(counts):
            counts[self.ignored_category] = 0
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() < counts.sum() * self.single_category_max_area
