"""The authors' mmseg checkpoints: tools/convert_mmseg_checkpoint.py and mmseg-format ViT weights,
against the outputs the authors' code computed (tests/data/authors_reference, see its README)."""
import contextlib
import importlib.util
import io
import os
import shlex
from pathlib import Path

import pytest
import torch

import structtoken_d2  # noqa: F401  (registrations)
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from structtoken_d2 import add_structtoken_config
from structtoken_d2.modeling import StructTokenCheckpointer
from structtoken_d2.modeling.mmseg_names import authors_to_ours, ours_to_authors

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "authors_reference"
VARIANTS = ("cse", "sse", "pwe")
_spec = importlib.util.spec_from_file_location("convert_tool", REPO / "tools" / "convert_mmseg_checkpoint.py")
convert_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_tool)


def run_tool(*args):
    """(return code, stdout, stderr) of the converter's command line."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = convert_tool.main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def rel_error(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def inputs():
    return torch.load(DATA / "inputs.pt")


@pytest.fixture(scope="module", params=VARIANTS)
def converted(request, tmp_path_factory):
    """(variant, converted checkpoint, the model built as the converter's printed command says)."""
    dst = tmp_path_factory.mktemp(request.param) / "converted.pth"
    rc, out, err = run_tool(DATA / f"authors_{request.param}.pth", dst, "--num-heads", "2")
    assert rc == 0, err
    assert f"StructToken-{request.param.upper()}, 4 blocks, K = 19 classes, tokens [4, 4]" in out
    assert "width 64, depth 2, 2 heads, input [64, 64], final norm False" in out
    command = next(line for line in out.splitlines() if "--config-file" in line)
    words = shlex.split(command)
    config, opts = words[words.index("--config-file") + 1], words[words.index(str(dst)) + 1:]
    cfg = get_cfg()
    add_structtoken_config(cfg)
    cfg.merge_from_file(str(REPO / config))
    cfg.merge_from_list(opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.PIXEL_MEAN = cfg.MODEL.PIXEL_STD = [127.5] * 3  # the fixture's normalisation
    cfg.TEST.MODE, cfg.TEST.LOGITS_RESIZE = "whole", "mmseg"
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    StructTokenCheckpointer(model).load(str(dst))
    return request.param, dst, model


def test_converted_checkpoint_loads_strictly(converted):
    _, dst, model = converted
    checkpoint = torch.load(dst, weights_only=True)
    assert set(checkpoint) == {"model", "meta"} and checkpoint["meta"]["CLASSES"][0] == "class_0"
    model.load_state_dict(checkpoint["model"], strict=True)  # no missing or unexpected key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_converted_model_reproduces_the_authors_outputs(converted, inputs, dtype):
    variant, _, model = converted
    expected = torch.load(DATA / f"expected_{variant}.pt")
    # float64: the authors' reference was computed in float64 from float32-normalised images (as
    # model.normalize feeds decode here); backbone_feature and logits_70x100_mmseg are stored in
    # float32 and inference_logits normalises in the model's dtype: 1e-6 for those (the README's bound).
    tight = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-6)}[dtype]
    model = model.to(dtype)
    try:
        with torch.no_grad():
            x80 = model.normalize(inputs["image_80x112"]).to(dtype)
            feature = model.backbone(x80)["last_feat"]
            assert rel_error(feature, expected["backbone_feature_80x112"]) < tight[1]
            assert rel_error(model.sem_seg_head({"last_feat": feature}), expected["head_logits_80x112"]) < tight[0]
            x70 = model.normalize(inputs["image_70x100"]).to(dtype)
            assert rel_error(model.decode(x70), expected["head_logits_70x100"]) < tight[0]
            logits = model.inference_logits(inputs["image_70x100"], "whole")
            assert logits.shape == (1, 19, 70, 100)
            assert rel_error(logits, expected["logits_70x100_mmseg"]) < tight[1]
            if dtype == torch.float32:  # the default rule is a different (aligned) resize
                model.logits_resize = "aligned"
                assert rel_error(model.inference_logits(inputs["image_70x100"], "whole"),
                                 expected["logits_70x100_mmseg"]) > 1e-2
    finally:
        model.logits_resize = "mmseg"
        model.float()


def test_rename_rules_round_trip_every_authors_key():
    for variant in VARIANTS:
        state = torch.load(DATA / f"authors_{variant}.pth", weights_only=True)["state_dict"]
        for key in state:
            ours = authors_to_ours(key)
            assert ours is not None and ours_to_authors(ours) == key
    assert authors_to_ours("backbone.layers.11.attn.attn.in_proj_weight") == "backbone.vit.blocks.11.attn.qkv.weight"
    assert authors_to_ours("backbone.ln1.bias") == "backbone.vit.norm.bias"
    assert authors_to_ours("decode_head.kernels") == "sem_seg_head.tokens"
    assert authors_to_ours("auxiliary_head.conv.weight") is None


# ------------------------------------------------------------------------------ refusals
def _authors_state(variant="cse"):
    return torch.load(DATA / f"authors_{variant}.pth", weights_only=True)


def _assert_refused(tmp_path, src, message, *extra):
    dst = tmp_path / "out" / "converted.pth"
    rc, out, err = run_tool(src, dst, "--num-heads", "2", *extra)
    assert rc == 1 and out == ""
    assert "nothing written" in err
    assert any(m in err for m in ([message] if isinstance(message, str) else message)), err
    assert not dst.exists()
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")  # no temporary left either
    return err


def test_corrupted_checkpoint_is_refused(tmp_path):
    src = tmp_path / "truncated.pth"
    src.write_bytes((DATA / "authors_cse.pth").read_bytes()[:100000])
    _assert_refused(tmp_path, src, f"{src}: cannot be read as a PyTorch checkpoint")


def test_unknown_layout_is_refused(tmp_path):
    src = tmp_path / "other.pth"
    torch.save({"state_dict": {"encoder.conv.weight": torch.zeros(3)}}, src)
    _assert_refused(tmp_path, src, "unknown layout, expected the authors' mmseg model")
    torch.save({"model": {"sem_seg_head.tokens": torch.zeros(1, 19, 4, 4)}}, src)
    _assert_refused(tmp_path, src, "is a Detectron2 checkpoint")


def test_missing_key_is_refused_by_name(tmp_path):
    ckpt = _authors_state()
    del ckpt["state_dict"]["decode_head.layers.3.ffn1.norm3.bias"]
    src = tmp_path / "missing.pth"
    torch.save(ckpt, src)
    _assert_refused(tmp_path, src, "missing keys: ['decode_head.layers.3.ffn1.norm3.bias']")


def test_unknown_keys_are_refused_by_name(tmp_path):
    ckpt = _authors_state()
    ckpt["state_dict"]["auxiliary_head.conv_seg.weight"] = torch.zeros(19, 64, 1, 1)
    src = tmp_path / "aux.pth"
    torch.save(ckpt, src)
    _assert_refused(tmp_path, src, "keys no rule of the authors' layout covers: ['auxiliary_head.conv_seg.weight']")
    del ckpt["state_dict"]["auxiliary_head.conv_seg.weight"]
    ckpt["state_dict"]["decode_head.conv_seg.weight"] = torch.zeros(19, 64, 1, 1)
    torch.save(ckpt, src)
    _assert_refused(tmp_path, src, "unexpected keys: ['decode_head.conv_seg.weight']")


def test_shape_mismatch_is_refused_by_name(tmp_path):
    ckpt = _authors_state()
    ckpt["state_dict"]["decode_head.residual_block.conv1.weight"] = torch.zeros(19, 19, 1, 1)
    src = tmp_path / "shape.pth"
    torch.save(ckpt, src)
    _assert_refused(tmp_path, src, "shape mismatches: ['decode_head.residual_block.conv1.weight [19, 19]")


def test_wrong_class_count_is_refused(tmp_path):
    _assert_refused(tmp_path, DATA / "authors_pwe.pth",
                    "has 19 classes (decode_head.kernels of shape [1, 19, 4, 4]), not --num-classes 150",
                    "--num-classes", "150")


def test_existing_destination_is_kept_unless_overwrite(tmp_path):
    dst = tmp_path / "mine.pth"
    dst.write_text("a file of the user")
    rc, _, err = run_tool(DATA / "authors_cse.pth", dst, "--num-heads", "2")
    assert rc == 1 and "exists; pass --overwrite" in err and dst.read_text() == "a file of the user"
    rc, _, _ = run_tool(DATA / "authors_cse.pth", dst, "--num-heads", "2", "--overwrite")
    assert rc == 0 and "sem_seg_head.tokens" in torch.load(dst, weights_only=True)["model"]
    assert sorted(os.listdir(tmp_path)) == ["mine.pth"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_converted_checkpoint_has_the_mode_of_an_ordinary_file(tmp_path, overwrite):
    dst = tmp_path / "converted.pth"
    if overwrite:
        dst.write_text("older")
    old_umask = os.umask(0o022)
    try:
        rc, _, err = run_tool(DATA / "authors_cse.pth", dst, "--num-heads", "2", *(["--overwrite"] if overwrite else []))
    finally:
        os.umask(old_umask)
    assert rc == 0, err
    assert os.stat(dst).st_mode & 0o777 == 0o644  # readable by the group and others, not mkstemp's 0600


# ----------------------------------------------------- mmseg-format ViT weights (vit2mmseg)
def _backbone_cfg(weights):
    cfg = get_cfg()
    add_structtoken_config(cfg)
    cfg.MODEL.VIT.NAME = "vit_tiny_patch16_384"
    cfg.MODEL.VIT.EMBED_DIM, cfg.MODEL.VIT.DEPTH, cfg.MODEL.VIT.NUM_HEADS = 64, 2, 2
    cfg.MODEL.VIT.IMG_SIZE = [64, 64]
    cfg.MODEL.VIT.WEIGHTS = str(weights)
    return cfg


def _mmseg_vit_file(tmp_path, extra=None):
    """The fixture's backbone as mmseg's vit2mmseg writes a ViT: bare state dict, mmseg names,
    the final norm as ``ln1`` (unused with final_norm=False)."""
    authors = _authors_state("sse")["state_dict"]
    state = {k[len("backbone."):]: v for k, v in authors.items() if k.startswith("backbone.")}
    state.update({"ln1.weight": torch.ones(64), "ln1.bias": torch.zeros(64)}, **(extra or {}))
    path = tmp_path / "vit_mmseg.pth"
    torch.save(state, path)
    return path


def test_mmseg_format_vit_weights_load_into_the_same_backbone_features(tmp_path, inputs):
    from structtoken_d2.modeling.backbone.vit import TimmViT

    backbone = TimmViT(_backbone_cfg(_mmseg_vit_file(tmp_path))).eval()
    expected = torch.load(DATA / "expected_sse.pt")["backbone_feature_80x112"]
    x = (inputs["image_80x112"].float() - 127.5) / 127.5
    with torch.no_grad():
        assert rel_error(backbone(x)["last_feat"], expected) < 1e-5


def test_mmseg_format_vit_weights_with_unknown_keys_or_a_whole_model_are_refused(tmp_path):
    from structtoken_d2.modeling.backbone.vit import TimmViT

    path = _mmseg_vit_file(tmp_path, {"layers.0.gamma": torch.ones(64)})
    with pytest.raises(ValueError, match=r"mmseg ViT layout with keys no rule covers: \['layers.0.gamma'\]"):
        TimmViT(_backbone_cfg(path))
    with pytest.raises(ValueError, match="whole segmentation model.*convert_mmseg_checkpoint"):
        TimmViT(_backbone_cfg(DATA / "authors_cse.pth"))


# ------------------------------------------------------------------ configuration found
def test_head_count_from_the_checkpoints_meta_config(tmp_path):
    ckpt = _authors_state("cse")
    ckpt["meta"]["config"] = "model = dict(backbone=dict(type='VisionTransformer', embed_dims=64, num_heads=2))"
    src = tmp_path / "with_config.pth"
    torch.save(ckpt, src)
    rc, out, _ = run_tool(src, tmp_path / "out.pth")
    assert rc == 0 and "depth 2, 2 heads" in out and "ViT heads 2: from the checkpoint's meta config" in out


def test_a_released_model_is_matched_to_its_config():
    """The layout of the authors' ViT-T CSE ADE20K model (shapes only, no memory): the converter
    recognises it and names the config that builds it; the head count is ViT-T's 3."""
    from structtoken_d2.modeling.mmseg_conversion import convert_state, expected_shapes, matching_configs

    ours = expected_shapes({"MODEL.VIT.NAME": "vit_tiny_patch16_384", "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 150})
    authors = {}
    for name, shape in ours.items():  # the authors' names; the head's 1x1 convs as [O, I, 1, 1]
        head_linear = name.startswith("sem_seg_head.") and len(shape) == 2
        authors[ours_to_authors(name)] = torch.zeros(1).expand(*shape, *((1, 1) if head_linear else ()))
    conversion = convert_state(authors, {"CLASSES": ["wall"] * 150})
    o = conversion.overrides
    assert (o["MODEL.VIT.NAME"], o["MODEL.STRUCTTOKEN.VARIANT"], o["MODEL.SEM_SEG_HEAD.NUM_CLASSES"]) == \
        ("vit_tiny_patch16_384", "CSE", 150)
    assert "MODEL.VIT.NUM_HEADS" not in o  # the standard ViT-T: 12 blocks, 3 heads
    assert (o["MODEL.VIT.IMG_SIZE"], o["MODEL.STRUCTTOKEN.TOKEN_SIZE"]) == ([512, 512], [32, 32])
    found = matching_configs(o, str(REPO / "configs"))
    assert [os.path.relpath(p, REPO / "configs") for p in found] == ["ade20k/structtoken_cse_vit_t_512.yaml"]
