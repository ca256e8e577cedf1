"""ONNX export (structtoken_d2.export, tools/export_model.py): for CSE, SSE and PWE and both
TEST.LOGITS_RESIZE rules, a tiny model exported with dynamic shapes, run by onnxruntime inside the
runtime's whole / slide protocol, gives the logits of the PyTorch segmentor's own inference on odd
image sizes; the file holds only standard ONNX operators and the config's test settings; the tool's
errors are one line and write nothing."""
import json
import re

import numpy as np
import onnx
import pytest
import torch

import structtoken_d2  # noqa: F401  (registrations)
from structtoken_d2.data.datasets.shapes import SHAPES_CLASSES
from structtoken_d2.engine import Trainer
from structtoken_d2.export import class_names_of, export_onnx
from structtoken_d2.modeling import StructTokenCheckpointer
from structtoken_runtime import EvaluationProtocol, StructTokenONNX, network_logits
from tiny_runs import SHAPES_CONFIG, load_tool, tiny_cfg, tiny_opts

# Odd sizes against the 32 px slide crop (stride 21): 2 x 3 windows, the last ones shifted back
# inside; 2 x 2 windows; one window smaller than the crop. None is a multiple of 16.
SIZES = [(45, 70), (53, 37), (19, 27)]
TOLERANCE = 1e-4  # max |ONNX - PyTorch| / max |PyTorch logit|


def tiny_model(variant="PWE", logits_resize="aligned", **overrides):
    """A 1-block, 32-wide model of the synthetic config (random weights, seed 0) and its config."""
    torch.manual_seed(0)
    cfg = tiny_cfg({"MODEL.STRUCTTOKEN.VARIANT": variant, "TEST.LOGITS_RESIZE": logits_resize,
                    "TEST.SLIDE_BATCH": 4, **overrides})
    return Trainer.build_model(cfg).eval(), cfg


# Every variant with both TEST.LOGITS_RESIZE rules.
@pytest.fixture(scope="module", params=[(v, r) for v in ("CSE", "SSE", "PWE") for r in ("aligned", "mmseg")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def exported(request, tmp_path_factory):
    variant, rule = request.param
    model, cfg = tiny_model(variant, rule)
    path = str(tmp_path_factory.mktemp("onnx") / f"{variant}_{rule}.onnx")
    check = export_onnx(model, cfg, path, class_names=class_names_of(cfg))
    return model, cfg, path, check


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_exported_network_in_the_runtime_protocol_gives_pytorchs_logits(exported, mode):
    model, cfg, path, _ = exported
    runtime = StructTokenONNX(path, threads=1)
    protocol = EvaluationProtocol(scale=tuple(cfg.TEST.SCALE), mode=mode, crop_size=tuple(cfg.TEST.SLIDE_CROP_SIZE),
                                  stride=tuple(cfg.TEST.SLIDE_STRIDE), batch=3)  # windows of two images per call
    generator = torch.Generator().manual_seed(1)
    for h, w in SIZES:
        images = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8, generator=generator)
        with torch.no_grad():
            expected = model.inference_logits(images, mode).numpy()  # [2, K, h, w]
        got = network_logits(runtime.network, list(images.permute(0, 2, 3, 1).numpy()), protocol)
        got = np.stack([logits.transpose(2, 0, 1) for logits in got])
        assert got.shape == expected.shape
        relative = np.abs(got - expected).max() / np.abs(expected).max()
        assert relative < TOLERANCE, f"{h}x{w} {mode}: {relative:.3g}"


def test_export_is_checked_and_holds_only_standard_operators_and_the_test_settings(exported):
    model, cfg, path, check = exported
    assert check.batch == 2 and check.size == tuple(cfg.TEST.SLIDE_CROP_SIZE) and check.relative_diff < TOLERANCE
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    domains = {node.domain for node in proto.graph.node}
    assert domains <= {"", "ai.onnx"} and not proto.functions, (domains, [f.name for f in proto.functions])
    (graph_input,) = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))  # B, H, W dynamic
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["class_names"]) == list(SHAPES_CLASSES)
    assert json.loads(meta["pixel_mean"]) == pytest.approx(cfg.MODEL.PIXEL_MEAN)
    assert json.loads(meta["pixel_std"]) == pytest.approx(cfg.MODEL.PIXEL_STD)
    assert json.loads(meta["test_scale"]) == [32, 32] and json.loads(meta["slide_crop_size"]) == [32, 32]
    assert json.loads(meta["slide_stride"]) == [21, 21] and json.loads(meta["logits_resize"]) == cfg.TEST.LOGITS_RESIZE
    assert json.loads(meta["aug_ratios"]) == [0.75, 1.0, 1.25, 1.5] and json.loads(meta["image_size"]) is None
    assert "VARIANT: " + cfg.MODEL.STRUCTTOKEN.VARIANT in meta["config"]


# ------------------------------------------------------------------------------ the tool
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny PWE model's random weights as MODEL.WEIGHTS, and the model."""
    model, _ = tiny_model()
    folder = tmp_path_factory.mktemp("weights")
    StructTokenCheckpointer(model, save_dir=str(folder)).save("tiny")
    return str(folder / "tiny.pth"), model


def _run_tool(*argv):
    return load_tool("export_model").main(["--config-file", str(SHAPES_CONFIG), *(str(a) for a in argv)])


def test_tool_writes_a_fixed_size_int8_model_that_the_runtime_refuses_other_sizes_with(weights, tmp_path):
    path, model = weights
    out = tmp_path / "fixed_int8.onnx"
    assert _run_tool("--output", str(out), "--image-size", "32x32", "--int8", *tiny_opts(),
                     "MODEL.WEIGHTS", path) == str(out)
    runtime = StructTokenONNX(str(out), threads=1)
    assert runtime.metadata["image_size"] == [32, 32]
    assert runtime.metadata["quantization"].startswith("dynamic int8")
    assert {n.op_type for n in onnx.load(str(out)).graph.node} & {"MatMulInteger", "DynamicQuantizeMatMul"}
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.inference_logits(image).numpy()
    got = runtime.network(image.numpy())
    assert np.abs(got - expected).max() / np.abs(expected).max() < 0.1  # int8 weights: close, not equal
    with pytest.raises(ValueError, match=r"exported for 32x32 inputs only, this pass is 32x40: export with --dynamic"):
        runtime.network(np.zeros((1, 3, 32, 40), np.uint8))


@pytest.mark.parametrize("argv, message", [
    (["--image-size", "32by32"], r"image size '32by32': expected HEIGHTxWIDTH"),
    (["MODEL.WEIGHTS", "/nonexistent/w.pth"], r"MODEL.WEIGHTS.*/nonexistent/w.pth"),
    (["MODEL.VIT.EMBED_DIMS", "32"], r"MODEL.VIT.EMBED_DIMS is not a config key; did you mean MODEL.VIT.EMBED_DIM"),
    (["--calibration-images", "4"], r"--calibration-images N needs --int8"),
])
def test_tool_errors_are_one_line_and_write_nothing(tmp_path, argv, message):
    out = tmp_path / "m.onnx"
    with pytest.raises(SystemExit) as excinfo:
        _run_tool("--output", str(out), *argv, *tiny_opts())
    text = str(excinfo.value.code)
    assert "\n" not in text and ": error: " in text and re.search(message, text), text
    assert list(tmp_path.iterdir()) == []


def test_tool_never_replaces_a_file_and_an_unexportable_opset_is_one_line(weights, tmp_path):
    path, _ = weights
    existing = tmp_path / "taken.onnx"
    existing.write_bytes(b"mine")
    with pytest.raises(SystemExit) as excinfo:
        _run_tool("--output", str(existing), *tiny_opts(), "MODEL.WEIGHTS", path)
    assert "taken.onnx exists; it is not replaced" in str(excinfo.value.code)
    assert existing.read_bytes() == b"mine"
    out = tmp_path / "new.onnx"
    with pytest.raises(SystemExit) as excinfo:
        _run_tool("--output", str(out), "--opset", "26", *tiny_opts(), "MODEL.WEIGHTS", path)
    message = str(excinfo.value.code)
    assert "\n" not in message and "opset 26" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.onnx"]
