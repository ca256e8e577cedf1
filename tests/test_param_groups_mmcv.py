"""SOLVER.PARAM_GROUPS "mmcv_custom_keys": the learning rate and weight decay of every parameter
equal what mmcv's DefaultOptimizerConstructor gives the authors' model under the authors' config.

The reference is an independent implementation of mmcv's rule, applied to the authors' own
parameter names (tests/data/authors_reference checkpoints); our parameters are paired with the
authors' tensors by value (every fixture tensor is distinct), not by our rename rules."""
from pathlib import Path

import pytest
import torch

import structtoken_d2  # noqa: F401  (registrations)
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from structtoken_d2 import add_structtoken_config
from structtoken_d2.engine.optimizer import build_optimizer
from structtoken_d2.modeling.mmseg_conversion import convert_state, read_mmseg_checkpoint

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "authors_reference"

# (fixture, our config of the authors' recipe, the authors' optimizer of that config:
#  lr, weight_decay, paramwise_cfg.custom_keys)
_AUTHORS_KEYS = {"pos_embed": dict(decay_mult=0.0), "cls_token": dict(decay_mult=0.0), "norm": dict(decay_mult=0.0)}
CASES = [
    ("cse", "ade20k/structtoken_cse_vit_t_512.yaml", 2e-5, 0.01, {**_AUTHORS_KEYS, "decode_head": dict(lr_mult=9.0)}),
    ("sse", "ade20k/structtoken_sse_vit_l_640.yaml", 2e-5, 0.01, {**_AUTHORS_KEYS, "decode_head": dict(lr_mult=6.0)}),
    ("pwe", "ade20k/structtoken_pwe_vit_b_512.yaml", 1e-5, 0.01, {**_AUTHORS_KEYS, "decode_head": dict(lr_mult=9.0)}),
]


def mmcv_param_settings(name, base_lr, base_wd, custom_keys):
    """mmcv 1.x DefaultOptimizerConstructor.add_params for a parameter of full name ``name`` with
    only custom_keys given: keys sorted alphabetically, then by length, longest first; the first
    key that is a substring of the name sets lr_mult / decay_mult (default 1); else the defaults."""
    for key in sorted(sorted(custom_keys), key=len, reverse=True):
        if key in name:
            return base_lr * custom_keys[key].get("lr_mult", 1.0), base_wd * custom_keys[key].get("decay_mult", 1.0)
    return base_lr, base_wd


def _model_and_optimizer(variant, config):
    state, meta = read_mmseg_checkpoint(str(DATA / f"authors_{variant}.pth"))
    conversion = convert_state(state, meta, num_heads=2)
    cfg = get_cfg()
    add_structtoken_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / config))
    cfg.merge_from_list(conversion.opts())  # the fixture's small model, the config's optimizer
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = ()  # 19 classes, not ADE20K's 150
    model = build_model(cfg)
    model.load_state_dict(conversion.state_dict, strict=True)
    return state, model, build_optimizer(cfg, model)


@pytest.mark.parametrize("variant, config, base_lr, base_wd, custom_keys", CASES)
def test_param_groups_equal_mmcv_custom_keys_on_the_authors_names(variant, config, base_lr, base_wd, custom_keys):
    authors_state, model, optimizer = _model_and_optimizer(variant, config)
    settings = {}  # our parameter -> (lr, weight decay)
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert p not in settings
            settings[p] = (group["lr"], group["weight_decay"])
    params = list(model.parameters())
    assert len(settings) == len(params) == len(authors_state)

    by_value = {}
    for p in params:
        by_value.setdefault((p.numel(), round(p.detach().double().sum().item(), 6)), []).append(p)
    for name, tensor in authors_state.items():
        candidates = by_value[(tensor.numel(), round(tensor.double().sum().item(), 6))]
        (ours,) = [p for p in candidates if torch.equal(p.detach().flatten(), tensor.flatten())]
        expected = mmcv_param_settings(name, base_lr, base_wd, custom_keys)
        assert settings[ours] == pytest.approx(expected, rel=1e-12), name


def test_what_the_authors_rule_means():
    """The issue's reading of the rule: the whole head (norms, tokens) lr x mult WITH weight
    decay; the ViT's ln1/ln2 keep weight decay; pos_embed / cls_token have none."""
    _, model, optimizer = _model_and_optimizer("sse", "ade20k/structtoken_sse_vit_l_640.yaml")
    settings = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    vit, head = model.backbone.vit, model.sem_seg_head
    assert settings[id(head.tokens)] == pytest.approx((6 * 2e-5, 0.01))
    assert settings[id(head.residual_block.norm1.weight)] == pytest.approx((6 * 2e-5, 0.01))
    assert settings[id(vit.blocks[0].norm1.weight)] == pytest.approx((2e-5, 0.01))
    assert settings[id(vit.pos_embed)] == settings[id(vit.cls_token)] == pytest.approx((2e-5, 0.0))


def test_unknown_custom_key_field_is_refused(tmp_path):
    base = REPO / "configs" / "ade20k" / "structtoken_cse_vit_t_512.yaml"
    cfg = get_cfg()
    add_structtoken_config(cfg)
    with pytest.raises(AssertionError, match="Non-existent key: SOLVER.CUSTOM_KEYS.decode_head.LR_MUL"):  # yacs
        cfg.merge_from_file(str(base))
        cfg.merge_from_list(["SOLVER.CUSTOM_KEYS.decode_head.LR_MUL", "9.0"])
    config = tmp_path / "typo.yaml"  # a new key (allowed) with a misspelt field
    config.write_text(f'_BASE_: "{base}"\nSOLVER:\n  CUSTOM_KEYS:\n    backbone: {{LR_MUL: 0.1}}\n')
    cfg = get_cfg()
    add_structtoken_config(cfg)
    cfg.merge_from_file(str(config))
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        model = build_model(cfg)
    with pytest.raises(ValueError, match=r"SOLVER.CUSTOM_KEYS.backbone: unknown entries \['LR_MUL'\]"):
        build_optimizer(cfg, model)
