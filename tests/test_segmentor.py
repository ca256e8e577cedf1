"""StructTokenSegmentor built from a config: training, inference modes, class-count and weight errors."""
import os

import pytest
import torch
import torch.nn.functional as F

import structtoken_d2  # noqa: F401  (registrations)
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from structtoken_d2 import add_structtoken_config
from structtoken_d2.modeling import ClassCountMismatchError, StructTokenCheckpointer, StructTokenSegmentor

BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "Base-StructToken.yaml")
K = 5


def tiny_cfg(variant="CSE", num_classes=K, **overrides):
    """The base config with a tiny ViT (2 blocks, width 32) and a 2-block head with 4x4 tokens."""
    cfg = get_cfg()
    add_structtoken_config(cfg)
    cfg.merge_from_file(BASE)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.VIT.NAME = "vit_tiny_patch16_384"
    cfg.MODEL.VIT.EMBED_DIM, cfg.MODEL.VIT.DEPTH, cfg.MODEL.VIT.NUM_HEADS = 32, 2, 2
    cfg.MODEL.VIT.IMG_SIZE = [64, 64]
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    cfg.MODEL.STRUCTTOKEN.VARIANT = variant
    cfg.MODEL.STRUCTTOKEN.NUM_BLOCKS = 2
    cfg.MODEL.STRUCTTOKEN.TOKEN_SIZE = [4, 4]
    cfg.TEST.SLIDE_CROP_SIZE, cfg.TEST.SLIDE_STRIDE = [64, 64], [40, 40]
    for key, value in overrides.items():
        node = cfg
        *path, leaf = key.split(".")
        for p in path:
            node = getattr(node, p)
        setattr(node, leaf, value)
    return cfg


def build(variant="CSE", seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(variant, **overrides))


def batch(sizes, labels=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        d = {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8).float()}
        if labels:
            seg = torch.randint(0, K, (h, w), generator=g)
            seg[:3] = 255
            d["sem_seg"] = seg
        out.append(d)
    return out


@pytest.mark.parametrize("variant", ["CSE", "SSE", "PWE"])
def test_every_variant_trains_on_odd_non_square_images(variant):
    model = build(variant)
    assert isinstance(model, StructTokenSegmentor)
    model.train()
    losses = model(batch([(70, 45), (52, 61)]))
    assert set(losses) == {"loss_sem_seg"} and torch.isfinite(losses["loss_sem_seg"])
    losses["loss_sem_seg"].backward()
    assert model.sem_seg_head.tokens.grad.abs().sum() > 0
    assert model.backbone.vit.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.backbone.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        inputs = batch([(70, 45)], labels=False)
        (out,) = model(inputs)
        assert out["sem_seg"].shape == (K, 70, 45)
        inputs[0].update(height=100, width=90)  # output at the original size
        (out,) = model(inputs)
        assert out["sem_seg"].shape == (K, 100, 90)


def test_loss_is_upsampled_cross_entropy_averaged_like_mmseg():
    model = build(**{"MODEL.VIT.DROP_PATH_RATE": 0.0, "MODEL.STRUCTTOKEN.DROP_PATH_RATE": 0.0}).train()
    inputs = batch([(48, 64)])
    logits = model.decode(model.normalize(inputs[0]["image"][None]))
    up = F.interpolate(logits, size=(48, 64), mode="bilinear", align_corners=False)
    target = inputs[0]["sem_seg"][None]
    per_pixel = F.cross_entropy(up, target, ignore_index=255, reduction="none")
    torch.testing.assert_close(model(inputs)["loss_sem_seg"], per_pixel.sum() / target.numel())  # all pixels
    model.loss_avg_non_ignore = True
    torch.testing.assert_close(model(inputs)["loss_sem_seg"], per_pixel.sum() / (target != 255).sum())


def test_slide_equals_whole_when_one_window_covers_the_image():
    model = build().eval()
    images = torch.rand(2, 3, 50, 60) * 255  # smaller than the 64x64 window
    assert model.slide_windows(50, 60) == [(0, 50, 0, 60)]
    with torch.no_grad():
        assert torch.equal(model.inference_logits(images, "slide"), model.inference_logits(images, "whole"))


def test_slide_windows_follow_mmseg_grid():
    model = build(**{"TEST.SLIDE_CROP_SIZE": [512, 512], "TEST.SLIDE_STRIDE": [341, 341]})
    windows = model.slide_windows(512, 2048)
    assert len(windows) == 6  # (2048 - 512 + 340) // 341 + 1
    assert windows[0] == (0, 512, 0, 512) and windows[-1] == (0, 512, 1536, 2048)
    assert all(y2 - y1 == 512 and x2 - x1 == 512 for y1, y2, x1, x2 in windows)


def test_overlapping_windows_are_averaged():
    """With a per-pixel model in place of the network, every window agrees with the whole image,
    so the slide result must reproduce the whole-image result exactly wherever windows overlap."""
    model = build().eval()
    weight = torch.randn(K, 3, 1, 1)
    model.decode = lambda x: F.conv2d(x, weight)  # full-resolution logits ...
    model.resize_logits = lambda logits, size: logits  # ... that need no resizing
    images = torch.rand(1, 3, 150, 100) * 255
    assert len(model.slide_windows(150, 100)) == 8  # 4 rows x 2 columns, overlapping
    with torch.no_grad():
        torch.testing.assert_close(model.inference_logits(images, "slide"), model.inference_logits(images, "whole"))


def test_slide_averages_the_real_model_windows():
    """Two overlapping windows of the real model: each pixel gets the mean of the windows covering it
    (one window per forward, as the expected values are computed; batching: tests/test_batched_inference.py)."""
    model = build(**{"TEST.SLIDE_BATCH": 1}).eval()
    images = torch.rand(1, 3, 64, 100) * 255
    assert model.slide_windows(64, 100) == [(0, 64, 0, 64), (0, 64, 36, 100)]
    with torch.no_grad():
        slide = model.inference_logits(images, "slide")
        x = model.normalize(images)
        left, right = (model.resize_logits(model.decode(w), w.shape[-2:]) for w in (x[..., :64], x[..., 36:]))
    expected = torch.cat((left[..., :36], (left[..., 36:] + right[..., :28]) / 2, right[..., 28:]), dim=-1)
    torch.testing.assert_close(slide, expected)
    assert not torch.allclose(left[..., 36:], right[..., :28])  # the windows do disagree on the overlap


@pytest.mark.parametrize("rule,resized_width", [("aligned", 64), ("mmseg", 50)])
def test_resize_logits_follows_the_logits_resize_rule(rule, resized_width):
    """Head logits [2, K, 3, 4] that equal their column index, to (40, 50): bilinear (align_corners
    False) reads column (x + 0.5) * 4 / W - 0.5 of the ramp, clamped to [0, 3], where W is the padded
    width 4 * 16 = 64 cropped to 50 ("aligned") or 50 itself ("mmseg")."""
    model = build(**{"TEST.LOGITS_RESIZE": rule})
    logits = torch.arange(4, dtype=torch.float64).expand(2, K, 3, 4)
    out = model.resize_logits(logits, (40, 50))
    assert out.shape == (2, K, 40, 50) and out.dtype == torch.float32
    x = torch.arange(50, dtype=torch.float64)
    expected = ((x + 0.5) * 4 / resized_width - 0.5).clamp(0, 3)
    torch.testing.assert_close(out.double(), expected.expand(2, K, 40, 50), atol=1e-6, rtol=0)


def test_inference_logits_takes_unnormalised_images_of_any_dtype():
    model = build().eval()
    images = torch.randint(0, 256, (2, 3, 33, 47), dtype=torch.uint8)
    with torch.no_grad():
        logits = model.inference_logits(images, "whole")
        x = (images.float() - 127.5) / 127.5
        manual = model.resize_logits(model.decode(x), (33, 47))
    assert logits.shape == (2, K, 33, 47)
    torch.testing.assert_close(logits, manual)
    with pytest.raises(ValueError, match="inference mode"):
        model.inference_logits(images, "tiles")


def test_unknown_variant_from_config():
    with pytest.raises(ValueError, match=r"VARIANT='FOO'.*CSE, PWE, SSE"):
        build("FOO")


def test_missing_backbone_weights_from_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="MODEL.VIT.WEIGHTS"):
        build(**{"MODEL.VIT.WEIGHTS": str(tmp_path / "missing.safetensors")})


def test_dataset_with_another_class_count_is_refused():
    name = "structtoken_test_three_classes"
    MetadataCatalog.get(name).set(stuff_classes=["a", "b", "c"])
    with pytest.raises(ClassCountMismatchError, match=f"'{name}' has 3 classes.*NUM_CLASSES is {K}"):
        build(**{"DATASETS.TEST": (name,)})
    build(num_classes=3, **{"DATASETS.TEST": (name,)})  # matching count builds


def test_checkpoint_with_another_class_count_is_refused(tmp_path):
    StructTokenCheckpointer(build(), save_dir=str(tmp_path)).save("five")
    path = str(tmp_path / "five.pth")
    other = build(num_classes=K + 1)
    with pytest.raises(ClassCountMismatchError, match=f"checkpoint has {K} classes.*built for {K + 1}"):
        StructTokenCheckpointer(other).load(path)
    with pytest.raises(ClassCountMismatchError):
        other.load_state_dict(torch.load(path, weights_only=False)["model"])
    same = build(seed=1)
    StructTokenCheckpointer(same).load(path)  # same class count: loads
    torch.testing.assert_close(same.sem_seg_head.tokens, build().sem_seg_head.tokens)
