"""Batched inference (TEST.SLIDE_BATCH) against the sequential protocol of mmseg, written here
independently: every window of every view through the network alone, whole / slide, both
TEST.LOGITS_RESIZE rules, odd image sizes with clipped edge windows, multi-scale + flip; and the
full-size logits buffers alive at once, which must not grow with the number of views."""
import math
import weakref

import cv2
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import structtoken_d2  # noqa: F401  (registrations)
from detectron2.modeling import build_model
from structtoken_d2.data.datasets import shapes
from structtoken_d2.engine import Trainer
from structtoken_d2.modeling.test_time_augmentation import SemanticSegmentorWithTTA
from test_segmentor import tiny_cfg
from tiny_runs import tiny_cfg as runs_cfg

CROP, STRIDE = 64, 40  # tiny_cfg's TEST.SLIDE_CROP_SIZE / TEST.SLIDE_STRIDE
MEAN, STD = 127.5, 127.5  # configs/Base-StructToken.yaml's PIXEL_MEAN / PIXEL_STD
# Odd sizes: 70x45 (2 rows, one 45-wide column), 97x131 (2 x 3 windows, the last row / column
# shifted back to end at the border), 33x50 (smaller than the crop: one window).
# Tolerance 1e-5: float64 models, but the logits are resized in float32 (TEST.LOGITS_RESIZE rules).
SIZES = [(70, 45), (97, 131), (33, 50)]


def float64_model(mode, logits_resize, slide_batch, **overrides):
    torch.manual_seed(0)
    return build_model(_cfg(mode, logits_resize, slide_batch, **overrides)).double().eval()


def image(h, w, seed=0):
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------- the sequential protocol
def windows(h, w):
    """mmseg's slide grid: (h - crop + stride - 1) // stride + 1 rows (at least 1), likewise columns;
    each window [crop x crop] clipped to the image and shifted back inside it."""
    grid = []
    for i in range(max(h - CROP + STRIDE - 1, 0) // STRIDE + 1):
        for j in range(max(w - CROP + STRIDE - 1, 0) // STRIDE + 1):
            y2, x2 = min(i * STRIDE + CROP, h), min(j * STRIDE + CROP, w)
            grid.append((max(y2 - CROP, 0), y2, max(x2 - CROP, 0), x2))
    return grid


def one_pass(model, crop, logits_resize):
    """One window [3, h, w] (normalised) alone through the network; stride-16 logits to (h, w)."""
    h, w = crop.shape[-2:]
    logits = model.decode(crop[None])  # the network (the backbone pads to a multiple of 16)
    if logits_resize == "aligned":  # upsample to the padded size, crop the padding off
        up = F.interpolate(logits, size=(math.ceil(h / 16) * 16, math.ceil(w / 16) * 16), mode="bilinear",
                           align_corners=False)
        return up[0, :, :h, :w]
    return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[0]


def sequential_logits(model, img, mode, logits_resize, dtype=torch.float64):
    """Logits [K, H, W] of a uint8 image, one window (or the whole image) per network call."""
    x = (img.to(dtype) - MEAN) / STD
    h, w = x.shape[-2:]
    grid = windows(h, w) if mode == "slide" else [(0, h, 0, w)]
    total = torch.zeros(model.num_classes, h, w, dtype=dtype)
    count = torch.zeros(h, w, dtype=dtype)
    for y1, y2, x1, x2 in grid:
        total[:, y1:y2, x1:x2] += one_pass(model, x[:, y1:y2, x1:x2], logits_resize)
        count[y1:y2, x1:x2] += 1
    return total / count


def keep_ratio_size(h, w, scale, ratio):
    long_edge, short_edge = int(max(scale) * ratio), int(min(scale) * ratio)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def sequential_tta(model, img, mode, logits_resize, scale, ratios):
    """mmseg MultiScaleFlipAug: per ratio and flip, the view's logits resized to the original size,
    softmax, flipped back; probabilities averaged."""
    h, w = img.shape[-2:]
    hwc = img.permute(1, 2, 0).numpy()
    probs = []
    for ratio in ratios:
        nh, nw = keep_ratio_size(h, w, scale, ratio)
        view = torch.from_numpy(cv2.resize(hwc, (nw, nh), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1).copy())
        for flip in (False, True):
            logits = sequential_logits(model, view.flip(-1) if flip else view, mode, logits_resize)
            p = F.softmax(F.interpolate(logits[None], size=(h, w), mode="bilinear", align_corners=False)[0], dim=0)
            probs.append(p.flip(-1) if flip else p)
    return torch.stack(probs).mean(0)


# --------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("logits_resize", ["aligned", "mmseg"])
@pytest.mark.parametrize("mode", ["slide", "whole"])
def test_batched_model_output_equals_one_window_at_a_time(mode, logits_resize):
    model = float64_model(mode, logits_resize, slide_batch=3)  # 3: full and partial batches
    assert [len(windows(h, w)) for h, w in SIZES] == [2, 6, 1]
    assert windows(97, 131)[-1] == (33, 97, 67, 131)  # the edge window, shifted back
    # Two inputs of each size (an image and its flip, as the test-time augmentation sends them).
    inputs = [{"image": v, "height": v.shape[1] + 5, "width": v.shape[2] - 3}
              for i, (h, w) in enumerate(SIZES) for v in (image(h, w, i), image(h, w, i).flip(-1))]
    with torch.no_grad():
        outputs = model(inputs)
        for inp, out in zip(inputs, outputs):
            expected = sequential_logits(model, inp["image"], mode, logits_resize)
            expected = F.interpolate(expected[None], size=(inp["height"], inp["width"]), mode="bilinear",
                                     align_corners=False)[0]
            assert out["sem_seg"].shape == expected.shape
            torch.testing.assert_close(out["sem_seg"].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("logits_resize", ["aligned", "mmseg"])
@pytest.mark.parametrize("mode", ["slide", "whole"])
def test_batched_multi_scale_flip_equals_sequential_protocol(mode, logits_resize):
    # 97x131 at scale (131, 97): ratio 0.75 -> 72x97, 1.0 and 1.001 -> 97x131 (two equal-size
    # views, stacked in one model call), 1.5 -> 145x196 (4 x 5 windows).
    ratios = [0.75, 1.0, 1.001, 1.5]
    img = image(97, 131)
    with torch.no_grad():
        for slide_batch in (1, 4):
            model = float64_model(mode, logits_resize, slide_batch)
            tta = SemanticSegmentorWithTTA(_cfg(mode, logits_resize, slide_batch), model, ratios=ratios, flip=True,
                                           scale=[131, 97])
            out = tta([{"image": img, "height": 97, "width": 131}])[0]["sem_seg"]
            expected = sequential_tta(model, img, mode, logits_resize, (131, 97), ratios)
            torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def _cfg(mode, logits_resize, slide_batch, **overrides):
    return tiny_cfg(**{"TEST.MODE": mode, "TEST.LOGITS_RESIZE": logits_resize, "TEST.SLIDE_BATCH": slide_batch,
                       **overrides})


def _record_batches(model):
    """Wraps ``model.decode``: returns the list the batch size of each network call goes to."""
    sizes, decode = [], model.decode

    def recording(x):
        sizes.append(x.shape[0])
        return decode(x)

    model.decode = recording
    return sizes


@pytest.mark.parametrize("slide_batch,expected", [(1, [1] * 12), (4, [4, 4, 4]), (5, [5, 5, 2]), (64, [12])])
def test_windows_of_an_image_and_its_flip_go_through_the_network_in_batches(slide_batch, expected):
    # 97x131 slide: 6 windows, 12 with the flipped view; at most slide_batch per network call.
    model = float64_model("slide", "aligned", slide_batch)
    sizes = _record_batches(model)
    tta = SemanticSegmentorWithTTA(_cfg("slide", "aligned", slide_batch), model, ratios=[1.0], flip=True,
                                   scale=[131, 97])
    with torch.no_grad():
        tta([{"image": image(97, 131), "height": 97, "width": 131}])
    assert sizes == expected


def test_equal_size_views_of_two_ratios_share_the_network_calls():
    # Ratios 1.0 and 1.001 both give 97x131: 4 views x 6 windows = 24 windows, 3 calls of 8 (each
    # ratio alone would take 8 + 4, twice); ratio 0.75 gives 72x97: 2 views x 4 windows, one call.
    model = float64_model("slide", "aligned", 8)
    sizes = _record_batches(model)
    tta = SemanticSegmentorWithTTA(_cfg("slide", "aligned", 8), model, ratios=[1.0, 0.75, 1.001], flip=True,
                                   scale=[131, 97])
    with torch.no_grad():
        tta([{"image": image(97, 131), "height": 97, "width": 131}])
    assert sizes == [8, 8, 8, 8]


def test_float32_batched_output_is_close_to_sequential():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**{"TEST.SLIDE_BATCH": 8})).eval()
    img = image(97, 131)
    with torch.no_grad():
        out = model([{"image": img}])[0]["sem_seg"]
        expected = sequential_logits(model, img, "slide", "aligned", torch.float32)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_slide_batch_must_be_positive():
    with pytest.raises(ValueError, match="TEST.SLIDE_BATCH=0"):
        build_model(tiny_cfg(**{"TEST.SLIDE_BATCH": 0}))


def test_batched_and_sequential_evaluations_give_identical_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.setattr(shapes, "SHAPES_SPLITS", {"train": (1, 0), "val": (6, 1)})
    # The synthetic validation images (128 x 128) at scale 48 and ratios 0.75 ... 1.5: 36 x 36 to 72 x 72
    # views, 32 x 32 windows (1 to 9 per view).
    cfg = runs_cfg({"TEST.AUG.ENABLED": True, "TEST.AUG.RATIOS": [0.75, 1.0, 1.5], "TEST.SCALE": [48, 48],
                    "OUTPUT_DIR": str(tmp_path / "out")})
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    results = {}
    for slide_batch in (1, 8):
        model.slide_batch = slide_batch
        results[slide_batch] = (Trainer.test(cfg, model), Trainer.test_with_TTA(cfg, model))
    single, tta = results[1]
    # (Detectron2's test() unwraps the results of a single dataset.)
    assert single["sem_seg"]["mIoU"] != tta["shapes_sem_seg_val_TTA"]["sem_seg"]["mIoU"]
    assert results[8] == results[1]


class LargeStorageTracker(TorchDispatchMode):
    """A tracemalloc for tensors: after every op run under it, the total bytes of the live storages of
    at least ``min_bytes`` among the tensors the ops returned; ``peak`` is the largest total."""

    def __init__(self, min_bytes):
        super().__init__()
        self.min_bytes, self.peak = min_bytes, 0
        self.tensors = []  # (weak reference, storage address, storage bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= self.min_bytes:
                self.tensors.append((weakref.ref(t), t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        self.tensors = [entry for entry in self.tensors if entry[0]() is not None]
        self.peak = max(self.peak, sum({ptr: nbytes for _, ptr, nbytes in self.tensors}.values()))
        return out


@pytest.mark.parametrize("slide_batch", [1, 4])
@pytest.mark.parametrize("mode", ["slide", "whole"])
def test_full_size_logits_alive_at_once_do_not_grow_with_the_views(mode, slide_batch):
    # 97x131 views, K = 48: one [K, H, W] float32 is 2.4 MB (float64: twice), more than anything else
    # here (4 stacked float64 images, padded: 1.5 MB; a 64x64 window's resized logits: 0.8 MB).
    # Ratios 1.0, 1.001, 1.002 all give 97x131: with flip, 2 or 6 views of one size, in one model call.
    k, (h, w) = 48, (97, 131)
    full_size = k * h * w * 4
    model = float64_model(mode, "aligned", slide_batch, **{"MODEL.SEM_SEG_HEAD.NUM_CLASSES": k})
    peaks = []
    for ratios in ([1.0], [1.0, 1.001, 1.002]):
        tta = SemanticSegmentorWithTTA(_cfg(mode, "aligned", slide_batch), model, ratios=ratios, flip=True,
                                       scale=[w, h])
        with torch.no_grad(), LargeStorageTracker(full_size) as tracker:
            out = tta([{"image": image(h, w), "height": h, "width": w}])[0]["sem_seg"]
        assert out.shape == (k, h, w)
        peaks.append(tracker.peak / full_size)
    assert peaks[0] >= 2  # the tracker sees the buffers: the running sum, and a view's logits
    assert peaks[1] == peaks[0]
