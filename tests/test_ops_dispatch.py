"""structtoken_d2.ops dispatch: compiled kernel vs PyTorch reference, forced reference, no extension."""
import contextlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import structtoken_d2  # noqa: F401  (compat shims before any detectron2 import)
from structtoken_d2 import ops
from structtoken_d2.ops import reference


@pytest.fixture
def spy_reference(monkeypatch):
    """Replaces both reference ops by functions that record that they ran and return a marker tensor."""
    calls = []
    for name in ("slice_attention", "depthwise_projection"):
        monkeypatch.setattr(reference, name, lambda *a, _name=name, **k: calls.append(_name) or torch.full((1,), 7.0))
    return calls


def _small_args():
    q, k = torch.randn(1, 2, 5), torch.randn(1, 3, 5)
    x = torch.randn(1, 2, 3, 4)
    params = (torch.ones(4), torch.zeros(4), torch.randn(4, 1, 3, 3), torch.zeros(4), torch.ones(4), torch.zeros(4))
    return (q, k, k.clone(), 0.5), (x, *params)


def test_force_pytorch_env_selects_the_reference(monkeypatch, spy_reference):
    monkeypatch.setenv(ops.FORCE_PYTORCH_ENV, "1")
    assert ops.active_implementation("cpu") == "pytorch"
    assert ops.active_implementation("cuda") == "pytorch"
    attention_args, projection_args = _small_args()
    assert ops.slice_attention(*attention_args).item() == 7.0
    assert ops.depthwise_projection(*projection_args).item() == 7.0
    assert spy_reference == ["slice_attention", "depthwise_projection"]


@pytest.mark.skipif(ops.EXTENSION_ERROR is not None, reason="structtoken_d2._C is not built")
def test_compiled_cpu_kernel_runs_when_built(monkeypatch, spy_reference):
    monkeypatch.delenv(ops.FORCE_PYTORCH_ENV, raising=False)
    monkeypatch.setattr(ops, "REFERENCE_IS_FASTER", {})
    assert ops.active_implementation("cpu") == "compiled-cpu"
    attention_args, projection_args = _small_args()
    assert ops.slice_attention(*attention_args).shape == (1, 2, 5)
    assert ops.depthwise_projection(*projection_args).shape == (1, 2, 3, 4)
    assert spy_reference == []


@pytest.mark.skipif(ops.EXTENSION_ERROR is not None, reason="structtoken_d2._C is not built")
def test_an_op_whose_reference_is_faster_on_the_device_takes_it(monkeypatch, spy_reference):
    """On a CPU both ops take the reference (faster there, measured: REFERENCE_IS_FASTER); without the
    entry, the kernels."""
    monkeypatch.delenv(ops.FORCE_PYTORCH_ENV, raising=False)
    assert ops.REFERENCE_IS_FASTER["cpu"] == {"depthwise_projection", "slice_attention"}
    attention_args, projection_args = _small_args()
    assert ops.slice_attention(*attention_args).item() == 7.0
    assert ops.depthwise_projection(*projection_args).item() == 7.0
    assert spy_reference == ["slice_attention", "depthwise_projection"]
    monkeypatch.setattr(ops, "REFERENCE_IS_FASTER", {"cpu": frozenset({"depthwise_projection"})})
    assert ops.slice_attention(*attention_args).shape == (1, 2, 5)  # the kernel
    ops.depthwise_projection(*projection_args)
    assert spy_reference == ["slice_attention", "depthwise_projection", "depthwise_projection"]


@pytest.mark.skipif(ops.EXTENSION_ERROR is not None, reason="structtoken_d2._C is not built")
def test_the_logged_summary_says_what_compiled_code_runs(monkeypatch):
    monkeypatch.delenv(ops.FORCE_PYTORCH_ENV, raising=False)
    every_op = "pytorch (faster here than the compiled-cpu kernels, which are built)"
    assert ops.implementation_summary("cpu") == every_op  # REFERENCE_IS_FASTER names both ops on a CPU
    assert ops.implementation_summary("cpu", model_compiled=True) == every_op
    monkeypatch.setattr(ops, "REFERENCE_IS_FASTER", {"cpu": frozenset({"depthwise_projection"})})
    hybrid = "compiled-cpu (the pytorch reference for depthwise_projection: faster here)"
    assert ops.implementation_summary("cpu") == hybrid
    assert ops.implementation_summary("cpu", model_compiled=True) == (
        f"{hybrid} in eager code, the pytorch reference in compiled code (MODEL.COMPILE)")
    monkeypatch.setattr(ops, "REFERENCE_IS_FASTER", {})
    assert ops.implementation_summary("cpu") == "compiled-cpu"
    monkeypatch.setattr(ops, "COMPILE_TRACES_REFERENCE", frozenset())  # as on CUDA
    assert ops.implementation_summary("cpu", model_compiled=True) == "compiled-cpu"
    monkeypatch.setenv(ops.FORCE_PYTORCH_ENV, "1")
    assert ops.implementation_summary("cpu", model_compiled=True) == "pytorch"


@pytest.mark.skipif(ops.EXTENSION_ERROR is not None, reason="structtoken_d2._C is not built")
def test_dtypes_without_a_kernel_take_the_reference(monkeypatch, spy_reference):
    monkeypatch.delenv(ops.FORCE_PYTORCH_ENV, raising=False)
    attention_args, projection_args = _small_args()
    q, k, v, scale = attention_args
    ops.slice_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast dtype decides, as for torch.matmul
        ops.slice_attention(*attention_args)
    assert spy_reference == ["slice_attention", "slice_attention"]


@pytest.mark.skipif(ops.EXTENSION_ERROR is not None, reason="structtoken_d2._C is not built")
def test_non_contiguous_channels_last_input_is_accepted(monkeypatch):
    monkeypatch.setattr(ops, "REFERENCE_IS_FASTER", {})
    _, (x, *params) = _small_args()
    strided = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)  # [B, H, W, C] view of an NCHW tensor
    torch.testing.assert_close(ops.depthwise_projection(strided, *params), reference.depthwise_projection(x, *params))


def test_unknown_device_type_uses_the_reference():
    assert ops.active_implementation("meta") == "pytorch"


def test_without_extension_the_reference_runs():
    """A pure-Python install (no ``structtoken_d2._C``) imports and computes with the reference ops."""
    script = (
        "import sys; sys.modules['structtoken_d2._C'] = None\n"  # makes `from .. import _C` raise ImportError
        "import torch, structtoken_d2\n"
        "from structtoken_d2 import ops\n"
        "assert ops.EXTENSION_ERROR is not None\n"
        "assert ops.active_implementation('cpu') == 'pytorch', ops.active_implementation('cpu')\n"
        "q, k = torch.randn(1, 2, 5), torch.randn(1, 3, 5)\n"
        "torch.testing.assert_close(ops.slice_attention(q, k, k, 0.5), ops.reference.slice_attention(q, k, k, 0.5))\n"
        "print('reference-ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "reference-ok" in result.stdout


def _head_training_step(head, feature, labels, autocast_dtype=None):
    """(logits, loss, {parameter name: gradient}) of one forward + cross-entropy + backward."""
    head.zero_grad(set_to_none=True)
    context = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with context:
        logits = head({"last_feat": feature})
    loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    return logits.detach().double(), {n: p.grad.detach().double() for n, p in head.named_parameters()}


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("variant", ["CSE", "SSE", "PWE"])
def test_head_step_on_the_emulated_cuda_kernels(variant, autocast_dtype, emulated_cuda_ops, monkeypatch):
    """The CUDA path of the dispatch (autocast dtype, casts, contiguity, autograd glue) through a head training
    step: its error against float64 within a small factor of eager PyTorch's in the same precision. (In
    bfloat16 some gradients of this random head are ill-conditioned, 10-300% off for eager PyTorch too, so
    the float32 cases are the sharp ones.)"""
    from structtoken_d2.modeling import StructTokenHead

    torch.manual_seed(0)
    head = StructTokenHead(in_feature="last_feat", in_channels=24, num_classes=5, variant=variant, num_blocks=2,
                           token_size=(5, 5), channels=24, drop_path_rate=0.0)
    feature, labels = torch.randn(1, 24, 5, 5), torch.randint(5, (1, 5, 5))
    monkeypatch.delenv(ops.FORCE_PYTORCH_ENV, raising=False)
    truth = _head_training_step(head.double(), feature.double(), labels)
    head.float()
    monkeypatch.setenv(ops.FORCE_PYTORCH_ENV, "1")
    eager = _head_training_step(head, feature, labels, autocast_dtype)
    monkeypatch.delenv(ops.FORCE_PYTORCH_ENV)
    monkeypatch.setattr(ops, "LIBRARY", emulated_cuda_ops)
    monkeypatch.setattr(ops, "COMPILED_DEVICE_TYPES", frozenset({"cpu"}))
    monkeypatch.setitem(ops.KERNEL_DTYPES, "cpu", ops.KERNEL_DTYPES["cuda"])
    monkeypatch.setattr(ops, "REFERENCE_IS_FASTER", {})  # as on CUDA
    reference_calls = []
    for name in ("slice_attention", "depthwise_projection"):  # record any fallback to the reference
        original = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, _f=original, **k: reference_calls.append(_f) or _f(*a, **k))
    kernel = _head_training_step(head, feature, labels, autocast_dtype)
    assert not reference_calls

    def error(result):
        """Largest relative L2 error over the logits and every parameter gradient that is not negligible."""
        logits, grads = result
        norms = {name: t.norm() for name, t in truth[1].items()}
        largest = max(norms.values())
        errors = [(logits - truth[0]).norm() / truth[0].norm()]
        errors += [(grads[n] - truth[1][n]).norm() / norms[n] for n in grads if norms[n] > 1e-3 * largest]
        return max(errors).item()

    floor = 1e-3 if autocast_dtype else 1e-5
    assert error(kernel) <= 3 * error(eager) + floor, (error(kernel), error(eager))
