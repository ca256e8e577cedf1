"""The evaluation protocol of structtoken-d2 around an exported network, in numpy and OpenCV only.

What ``tools/train_net.py --eval-only`` does around the network, step by step as
``structtoken_d2`` does it (``data/transforms.py``, ``modeling/meta_arch/structtoken.py``,
``modeling/test_time_augmentation.py``):

- test resize: keep-ratio to ``TEST.SCALE`` (times a ratio with multi-scale), ``cv2.resize``
  bilinear (``INTER_LINEAR``, no antialiasing);
- ``TEST.MODE``: ``whole`` (one pass) or ``slide`` (mmseg's grid of ``TEST.SLIDE_CROP_SIZE``
  windows every ``TEST.SLIDE_STRIDE``, the overlapping logits averaged); the passes go through the
  network ``TEST.SLIDE_BATCH`` at a time; the network returns logits at its input's size
  (the ``TEST.LOGITS_RESIZE`` rule is inside the exported graph);
- the logits resized bilinearly (half-pixel centres, as ``F.interpolate(align_corners=False)``)
  to the original image size;
- multi-scale + flip (``TEST.AUG``): every ratio's view, and its horizontal flip, through the
  above; softmax probabilities, flipped back, averaged.

Images are ``[H, W, 3]`` arrays in the network's channel order; scores ``[K, H, W]`` float32.
Internally the scores are kept channels-last ``[H, W, K]`` (OpenCV resizes that layout).
"""
from dataclasses import dataclass
from typing import Callable, Iterator, List, Sequence, Tuple

import cv2
import numpy as np

#: ``f(images [B, 3, h, w] uint8) -> logits [B, K, h, w] float32``: the exported network.
Network = Callable[[np.ndarray], np.ndarray]

#: Most channels ``cv2.resize`` takes at once from Python (OpenCV 5); more are resized in chunks.
_CV2_MAX_CHANNELS = 128


@dataclass(frozen=True)
class EvaluationProtocol:
    """The ``TEST`` settings of a config that the evaluation applies around the network."""

    scale: Tuple[int, int]  # TEST.SCALE: (long side, short side) bounds of the keep-ratio resize
    mode: str = "slide"  # TEST.MODE: "whole" or "slide"
    crop_size: Tuple[int, int] = (512, 512)  # TEST.SLIDE_CROP_SIZE (h, w)
    stride: Tuple[int, int] = (341, 341)  # TEST.SLIDE_STRIDE (h, w)
    batch: int = 4  # TEST.SLIDE_BATCH: passes per network call
    ratios: Tuple[float, ...] = (1.0,)  # TEST.AUG.RATIOS
    flip: bool = False  # TEST.AUG.FLIP

    def __post_init__(self):
        if self.mode not in ("whole", "slide"):
            raise ValueError(f"TEST.MODE {self.mode!r}: valid: whole, slide")
        if self.batch < 1:
            raise ValueError(f"TEST.SLIDE_BATCH {self.batch}: must be >= 1")
        if not self.ratios:
            raise ValueError("TEST.AUG.RATIOS is empty: give at least one resize ratio, e.g. [1.0]")


def keep_ratio_size(height: int, width: int, scale: Sequence[int], ratio: float = 1.0) -> Tuple[int, int]:
    """mmseg's keep-ratio rescale: the largest ``(h, w)`` with the image's aspect ratio whose long
    side is at most ``max(scale) * ratio`` and short side at most ``min(scale) * ratio``."""
    long_edge, short_edge = int(max(scale) * ratio), int(min(scale) * ratio)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_image(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """``[H, W, 3]`` ``->`` ``[h, w, 3]`` = ``size``, ``cv2.resize`` bilinear (mmcv's ``imrescale``)."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    return cv2.resize(np.ascontiguousarray(image), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def resize_scores(scores: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Float32 ``[H, W, K]`` ``->`` ``[h, w, K]`` = ``size``, bilinear with half-pixel centres and no
    antialiasing (``F.interpolate(mode="bilinear", align_corners=False)``), channels in chunks."""
    if tuple(scores.shape[:2]) == tuple(size):
        return scores
    dsize = (size[1], size[0])
    if scores.shape[2] <= _CV2_MAX_CHANNELS:
        out = cv2.resize(scores, dsize, interpolation=cv2.INTER_LINEAR)
        return out[..., None] if out.ndim == 2 else out
    out = np.empty((size[0], size[1], scores.shape[2]), np.float32)
    for start in range(0, scores.shape[2], _CV2_MAX_CHANNELS):
        chunk = np.ascontiguousarray(scores[..., start:start + _CV2_MAX_CHANNELS])
        resized = cv2.resize(chunk, dsize, interpolation=cv2.INTER_LINEAR)
        out[..., start:start + chunk.shape[2]] = resized[..., None] if resized.ndim == 2 else resized
    return out


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax of float32 ``logits`` over ``axis``."""
    shifted = logits - logits.max(axis=axis, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=axis, keepdims=True)
    return shifted


def slide_windows(height: int, width: int, crop_size: Sequence[int], stride: Sequence[int]
                  ) -> List[Tuple[int, int, int, int]]:
    """mmseg's sliding-window grid: ``(y1, y2, x1, x2)`` of each crop, clipped to the image
    (``max(H - crop + stride - 1, 0) // stride + 1`` rows, likewise columns)."""
    (ch, cw), (sh, sw) = crop_size, stride
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    windows = []
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * sh + ch, height), min(j * sw + cw, width)
            windows.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return windows


def _passes(images: Sequence[np.ndarray], windows, batch: int) -> Iterator[Tuple[List[int], np.ndarray]]:
    """Batches of at most ``batch`` windows (of every image in turn): ``(image indices, [B, 3, h, w])``."""
    passes = [(n, window) for n in range(len(images)) for window in windows]
    for start in range(0, len(passes), batch):
        chunk = passes[start:start + batch]
        crops = [images[n][y1:y2, x1:x2] for n, (y1, y2, x1, x2) in chunk]
        yield [n for n, _ in chunk], np.ascontiguousarray(np.stack(crops).transpose(0, 3, 1, 2))


def network_logits(network: Network, images: Sequence[np.ndarray], protocol: EvaluationProtocol
                   ) -> List[np.ndarray]:
    """Logits ``[H, W, K]`` of equal-size ``[H, W, 3]`` images at their own size: one pass each
    (whole) or the sliding windows, averaged where they overlap (slide)."""
    h, w = images[0].shape[:2]
    windows = slide_windows(h, w, protocol.crop_size, protocol.stride) if protocol.mode == "slide" else [(0, h, 0, w)]
    sums: List[np.ndarray] = [None] * len(images)
    count = np.zeros((h, w, 1), np.float32)
    for y1, y2, x1, x2 in windows:
        count[y1:y2, x1:x2] += 1
    window_iter = iter(windows * len(images))
    for owners, batch in _passes(images, windows, protocol.batch):
        logits = network(batch)  # [B, K, h, w]
        for n, window_logits in zip(owners, logits):
            y1, y2, x1, x2 = next(window_iter)
            hwk = window_logits.transpose(1, 2, 0)
            if len(windows) == 1:
                sums[n] = np.ascontiguousarray(hwk)
                continue
            if sums[n] is None:
                sums[n] = np.zeros((h, w, hwk.shape[2]), np.float32)
            sums[n][y1:y2, x1:x2] += hwk
    if len(windows) > 1:
        for total in sums:
            total /= count
    return sums


def single_scale_logits(network: Network, image: np.ndarray, protocol: EvaluationProtocol) -> np.ndarray:
    """The evaluation without test-time augmentation: ``image [H, W, 3]`` resized keep-ratio to
    ``TEST.SCALE``, its logits resized back: ``[K, H, W]`` float32."""
    height, width = image.shape[:2]
    resized = resize_image(image, keep_ratio_size(height, width, protocol.scale))
    logits = network_logits(network, [resized], protocol)[0]
    return resize_scores(logits, (height, width)).transpose(2, 0, 1)


def multi_scale_flip_probabilities(network: Network, image: np.ndarray, protocol: EvaluationProtocol) -> np.ndarray:
    """Multi-scale (``protocol.ratios``) + flip (``protocol.flip``) test-time augmentation of
    ``image [H, W, 3]``: the mean softmax probabilities ``[K, H, W]`` float32 over every view, at the
    image's size. Views of equal size (an image and its flip) go through the network together."""
    height, width = image.shape[:2]
    views_by_size = {}
    for ratio in protocol.ratios:
        resized = resize_image(image, keep_ratio_size(height, width, protocol.scale, ratio))
        views = views_by_size.setdefault(resized.shape[:2], [])
        views += [(resized, False)] + ([(resized[:, ::-1], True)] if protocol.flip else [])
    total, runs = None, 0
    for views in views_by_size.values():
        for logits, (_, flipped) in zip(network_logits(network, [v for v, _ in views], protocol), views):
            probs = softmax(resize_scores(logits, (height, width)))
            if flipped:
                probs = probs[:, ::-1]
            total = probs if total is None else np.add(total, probs, out=total)
            runs += 1
    total /= runs
    return total.transpose(2, 0, 1)
