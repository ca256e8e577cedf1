"""Multi-scale + flip test-time augmentation (SemanticSegmentorWithTTA) on stand-in models."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import structtoken_d2  # noqa: F401
from detectron2.config import get_cfg
from structtoken_d2 import add_structtoken_config
from structtoken_d2.modeling.test_time_augmentation import SemanticSegmentorWithTTA


class PerPixelModel(nn.Module):
    """Logits [K, h, w] = a fixed linear map of each pixel's colour (flip-equivariant), resized
    to the input's height / width like the real segmentor."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.weight = torch.randn(num_classes, 3, generator=torch.Generator().manual_seed(0))

    def forward(self, batched_inputs):
        outs = []
        for x in batched_inputs:
            logits = torch.einsum("kc,chw->khw", self.weight, x["image"].float() / 64)
            logits = F.interpolate(logits[None], size=(x["height"], x["width"]), mode="bilinear", align_corners=False)[0]
            outs.append({"sem_seg": logits})
        return outs


class HeightModel(nn.Module):
    """Two-class logits [h / 10, 0] everywhere, h = the height of the image it is given."""

    def forward(self, batched_inputs):
        outs = []
        for x in batched_inputs:
            h = x["image"].shape[1]
            logits = torch.zeros(2, x["height"], x["width"])
            logits[0] = h / 10
            outs.append({"sem_seg": logits})
        return outs


def _cfg():
    cfg = get_cfg()
    add_structtoken_config(cfg)
    return cfg


def _image(h=24, w=40):
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_flip_tta_on_flip_equivariant_model_equals_plain_prediction():
    model = PerPixelModel()
    image = _image()  # random, so not left-right symmetric: a flip not undone would show
    inp = {"image": image, "height": 24, "width": 40}
    plain = F.softmax(model([inp])[0]["sem_seg"], dim=0)
    tta = SemanticSegmentorWithTTA(_cfg(), model, ratios=[1.0], flip=True, scale=[40, 24])
    out = tta([inp])[0]["sem_seg"]
    assert out.shape == (4, 24, 40)
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-5)
    assert torch.equal(out.argmax(0), plain.argmax(0))


def test_probabilities_of_every_scale_are_averaged_at_the_original_size():
    # scale (32, 32), a 32 x 32 image, ratios 0.5 and 1.0: the model sees heights 16 and 32,
    # logits 1.6 and 3.2 for class 0; with flip each is seen twice. mmseg averages probabilities:
    # p0 = (sigmoid(1.6) + sigmoid(3.2)) / 2, not sigmoid(2.4) (the average of logits).
    tta = SemanticSegmentorWithTTA(_cfg(), HeightModel(), ratios=[0.5, 1.0], flip=True, scale=[32, 32])
    out = tta([{"image": _image(32, 32), "height": 50, "width": 60}])[0]["sem_seg"]
    assert out.shape == (2, 50, 60)
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = (sigmoid(1.6) + sigmoid(3.2)) / 2
    torch.testing.assert_close(out[0], torch.full((50, 60), expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.sum(0), torch.ones(50, 60))


def test_defaults_come_from_the_config():
    cfg = _cfg()
    cfg.TEST.AUG.RATIOS = [0.75, 1.25]
    cfg.TEST.AUG.FLIP = False
    cfg.TEST.SCALE = [64, 16]
    tta = SemanticSegmentorWithTTA(cfg, HeightModel())
    # Keep-ratio sizes of a 32 x 32 image for (64, 16) x 0.75 and x 1.25: short side 12 and 20.
    out = tta([{"image": _image(32, 32), "height": 8, "width": 8}])[0]["sem_seg"]
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    np.testing.assert_allclose(out[0].numpy(), (sigmoid(1.2) + sigmoid(2.0)) / 2, atol=1e-6)


def test_empty_ratios_is_an_error():
    with pytest.raises(ValueError, match="at least one"):
        SemanticSegmentorWithTTA(_cfg(), HeightModel(), ratios=[])
