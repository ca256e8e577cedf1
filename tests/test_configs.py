"""Every config loads, is self-consistent, follows the authors' recipe, and builds a model whose
parameter count equals an independent formula and the paper's (Tables I, II, V)."""
import glob
import os
import re

import pytest
import torch

import structtoken_d2  # noqa: F401  (registrations)
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from structtoken_d2 import add_structtoken_config
from structtoken_d2.modeling.paper_numbers import PAPER_COMPLEXITY

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
MODEL_CONFIGS = sorted(
    os.path.relpath(p, ROOT)
    for d in ("ade20k", "cityscapes", "coco_stuff_10k")
    for p in glob.glob(os.path.join(ROOT, d, "structtoken_*.yaml"))
)
ALL_CONFIGS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "**", "*.yaml"), recursive=True))

VIT = {"vit_tiny_patch16_384": (192, 12), "vit_small_patch16_384": (384, 12),
       "vit_base_patch16_384": (768, 12), "vit_large_patch16_384": (1024, 24)}
DATASET = {  # classes, iterations, train / test sets
    "ade20k": (150, 160000, ("ade20k_sem_seg_train",), ("ade20k_sem_seg_val",)),
    "cityscapes": (19, 80000, ("cityscapes_fine_sem_seg_train",), ("cityscapes_fine_sem_seg_val",)),
    "coco_stuff_10k": (171, 80000, ("coco_stuff_10k_sem_seg_train",), ("coco_stuff_10k_sem_seg_test",)),
}
# The authors' head learning-rate multipliers (decode_head lr_mult) and ImageNet-normalised configs.
HEAD_LR = {("t", v): 9.0 for v in ("cse", "sse", "pwe")}
HEAD_LR.update({("b", "pwe"): 9.0, ("l", "sse"): 6.0})
IMAGENET_NORM = {("t", "cse"), ("t", "sse"), ("t", "pwe"), ("s", "cse"), ("s", "sse"), ("s", "pwe"), ("b", "cse")}


def load(rel):
    cfg = get_cfg()
    add_structtoken_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, rel))
    return cfg


def parse(rel):
    if rel == "ade20k/structtoken_cse.yaml":
        rel = "ade20k/structtoken_cse_vit_l_640.yaml"
    m = re.fullmatch(r"(\w+)/structtoken_(cse|sse|pwe)_vit_([tsbl])_(\d+)\.yaml", rel)
    assert m, rel
    return m.group(1), m.group(2), m.group(3), int(m.group(4))


@pytest.mark.parametrize("rel", ALL_CONFIGS)
def test_every_config_loads(rel):
    load(rel)


@pytest.mark.parametrize("rel", MODEL_CONFIGS)
def test_config_is_consistent_and_follows_the_recipe(rel):
    cfg = load(rel)
    dataset, variant, backbone, crop = parse(rel)
    classes, iters, train, test = DATASET[dataset]
    m = cfg.MODEL
    assert (m.META_ARCHITECTURE, m.BACKBONE.NAME, m.SEM_SEG_HEAD.NAME) == ("StructTokenSegmentor", "TimmViT", "StructTokenHead")
    assert m.STRUCTTOKEN.VARIANT == variant.upper() and m.STRUCTTOKEN.NUM_BLOCKS == 4
    assert m.VIT.NAME == f"vit_{dict(t='tiny', s='small', b='base', l='large')[backbone]}_patch16_384"
    assert m.SEM_SEG_HEAD.NUM_CLASSES == classes and m.SEM_SEG_HEAD.IGNORE_VALUE == 255
    assert (cfg.DATASETS.TRAIN, cfg.DATASETS.TEST, cfg.SOLVER.MAX_ITER) == (train, test, iters)
    # one size everywhere: crop = backbone input = test window = 16 x token grid
    assert list(cfg.INPUT.CROP.SIZE) == list(m.VIT.IMG_SIZE) == list(cfg.TEST.SLIDE_CROP_SIZE) == [crop, crop]
    assert [16 * s for s in m.STRUCTTOKEN.TOKEN_SIZE] == [crop, crop]
    assert list(cfg.TEST.SLIDE_STRIDE) == [{512: 341, 640: 426, 768: 512}[crop]] * 2
    assert cfg.TEST.MODE == "slide" and cfg.INPUT.FORMAT == "RGB"
    norm = ([123.675, 116.28, 103.53], [58.395, 57.12, 57.375]) if (backbone, variant) in IMAGENET_NORM else ([127.5] * 3,) * 2
    assert (list(m.PIXEL_MEAN), list(m.PIXEL_STD)) == norm
    s = cfg.SOLVER
    assert (s.OPTIMIZER, s.IMS_PER_BATCH, s.WEIGHT_DECAY, list(s.BETAS)) == ("ADAMW", 16, 0.01, [0.9, 0.999])
    assert s.BASE_LR == (1e-5 if (backbone, variant) == ("b", "pwe") else 2e-5)
    assert (s.LR_SCHEDULER_NAME, s.POLY_LR_POWER, s.WARMUP_ITERS, s.WARMUP_METHOD) == ("WarmupPolyLR", 1.0, 1500, "linear")
    # the authors' paramwise_cfg.custom_keys: {key: (lr_mult, decay_mult)}
    assert s.PARAM_GROUPS == "mmcv_custom_keys"
    assert {k: (v.get("LR_MULT", 1.0), v.get("DECAY_MULT", 1.0)) for k, v in s.CUSTOM_KEYS.items()} == {
        "pos_embed": (1.0, 0.0), "cls_token": (1.0, 0.0), "norm": (1.0, 0.0),
        "decode_head": (HEAD_LR.get((backbone, variant), 8.0), 1.0)}
    assert cfg.TEST.LOGITS_RESIZE == "mmseg"  # evaluated as mmseg's encode_decode


# ----------------------------------------------------------------------------- parameters
def vit_params(c, depth, grid):  # mmseg ViT: patch conv, class token, pos embed, blocks, no final norm
    block = 2 * c + (3 * c * c + 3 * c) + (c * c + c) + 2 * c + (4 * c * c + 4 * c) + (4 * c * c + c)
    return (3 * 16 * 16 * c + c) + c + (grid * grid + 1) * c + depth * block


def head_params(variant, c, k, grid, blocks=4):  # the authors' decode head
    def proj(n):
        return 2 * n * n + 18 * n  # 1x1 + LN + 3x3 dw + LN + 1x1 + LN, all with bias

    def ffn(d):
        return 8 * d * d + 171 * d  # 1x1 d->4d + LN + 3x3 group conv (4 per group) + LN + 1x1 4d->d + LN

    g = c + k
    per_block = {
        "cse": lambda last: 2 * proj(k) + 2 * proj(c) + ffn(k) + (0 if last else ffn(c)),
        "sse": lambda last: 4 * proj(g) + ffn(g),
        "pwe": lambda last: 2 * proj(g) + g * g + g + ffn(g),
    }[variant]
    res_block = 2 * (2 * k + 9 * k * k + k)
    return (c * c + c) + k * grid * grid + sum(per_block(i == blocks - 1) for i in range(blocks)) + res_block


def build_on_meta(rel):
    cfg = load(rel)
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):  # parameter shapes without the memory (ViT-L is 300M parameters)
        return build_model(cfg)


@pytest.mark.parametrize("rel", MODEL_CONFIGS)
def test_parameter_count_equals_the_independent_formula(rel):
    dataset, variant, backbone, crop = parse(rel)
    c, depth = VIT[load(rel).MODEL.VIT.NAME]
    model = build_on_meta(rel)
    expected = vit_params(c, depth, crop // 16) + head_params(variant, c, DATASET[dataset][0], crop // 16)
    assert sum(p.numel() for p in model.parameters()) == expected


# StructToken-PWE ViT-T: the paper prints "12M", the authors' code has 12.65M (checked against the
# formula above). See docs/model_zoo.md.
_OFF_TARGET = {"ade20k/structtoken_pwe_vit_t_512.yaml"}


@pytest.mark.parametrize("rel", [
    pytest.param(r, marks=pytest.mark.xfail(strict=True, reason="paper prints 12M; the authors' code has 12.65M"))
    if r in _OFF_TARGET else r for r in sorted(PAPER_COMPLEXITY)
])
def test_parameter_count_within_3_percent_of_the_paper(rel):
    _, paper_params, _ = PAPER_COMPLEXITY[rel]
    params = sum(p.numel() for p in build_on_meta(rel).parameters()) / 1e6
    assert abs(params - paper_params) / paper_params < 0.03, f"{params:.2f}M vs paper {paper_params}M"
