"""structtoken_d2.ops dispatch: compiled kernel vs PyTorch reference, forced reference, no extension."""
import subprocess
import sys

import pytest
import torch

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
    assert ops.active_implementation("cpu") == "compiled-cpu"
    attention_args, projection_args = _small_args()
    assert ops.slice_attention(*attention_args).shape == (1, 2, 5)
    assert ops.depthwise_projection(*projection_args).shape == (1, 2, 3, 4)
    assert spy_reference == []


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
def test_non_contiguous_channels_last_input_is_accepted():
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
