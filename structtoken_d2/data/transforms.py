"""The two augmentations of the authors' mmseg pipeline that Detectron2 lacks: keep-ratio
resizing relative to an "img_scale" with a random ratio, and PhotoMetricDistortion."""
from typing import Sequence, Tuple

import cv2
import numpy as np
from detectron2.data.transforms import Augmentation, NoOpTransform, ResizeTransform, Transform
from PIL import Image


def keep_ratio_size(height: int, width: int, scale: Sequence[int], ratio: float) -> Tuple[int, int]:
    """mmseg keep-ratio rescale: the largest (h, w) with the image's aspect ratio whose long side is
    at most ``max(scale) * ratio`` and short side at most ``min(scale) * ratio``."""
    long_edge, short_edge = int(max(scale) * ratio), int(min(scale) * ratio)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


class ResizeToScale(Augmentation):
    """Keep-ratio resize to ``scale`` times a ratio drawn uniformly from ``ratio_range``
    (mmseg ``Resize(img_scale=scale, ratio_range=ratio_range, keep_ratio=True)``). Images are
    resized bilinearly, label maps with nearest neighbour."""

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
        return ResizeTransform(h, w, new_h, new_w, Image.BILINEAR)


class PhotometricDistortionTransform(Transform):
    """Fixed photometric changes of a uint8 [H, W, 3] image; label maps and coordinates are kept.

    Steps, each skipped when its parameter is None: brightness delta, contrast factor (before
    the HSV steps when ``contrast_first``, else after), saturation factor, hue shift (OpenCV
    hue units, 0..180). Values are clipped to 0..255 after every step, as in mmseg.
    """

    def __init__(self, brightness, contrast, saturation, hue, contrast_first: bool, image_format: str):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        out = img.astype(np.float32)
        if self.brightness is not None:
            out = np.clip(out + self.brightness, 0, 255)
        if self.contrast is not None and self.contrast_first:
            out = np.clip(out * self.contrast, 0, 255)
        if self.saturation is not None or self.hue is not None:
            to_hsv, from_hsv = (
                (cv2.COLOR_BGR2HSV, cv2.COLOR_HSV2BGR) if self.image_format == "BGR"
                else (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB)
            )
            hsv = cv2.cvtColor(out.astype(np.uint8), to_hsv).astype(np.float32)
            if self.saturation is not None:
                hsv[..., 1] = np.clip(hsv[..., 1] * self.saturation, 0, 255)
            if self.hue is not None:
                hsv[..., 0] = (hsv[..., 0] + self.hue) % 180
            out = cv2.cvtColor(hsv.astype(np.uint8), from_hsv).astype(np.float32)
        if self.contrast is not None and not self.contrast_first:
            out = np.clip(out * self.contrast, 0, 255)
        return out.astype(img.dtype)

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
