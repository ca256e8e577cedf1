"""structtoken::depthwise_projection/bwd: the compiled kernels against the float64 PyTorch reference."""
import pytest
import torch

import structtoken_d2  # noqa: F401  (compat shims before any detectron2 import)
from structtoken_d2 import ops
from structtoken_d2.ops import reference
from structtoken_d2.ops.accuracy import forward_backward, max_errors

needs_extension = pytest.mark.skipif(ops.EXTENSION_ERROR is not None, reason="structtoken_d2._C is not built")
needs_cuda_kernel = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in ops.COMPILED_DEVICE_TYPES, reason="needs a GPU and the CUDA build")

# (B, H, W, C, channels per group): depthwise and 4-per-group (FFN) convs, 1x1 and odd images, C = 1.
ODD_CASES = [(2, 3, 5, 8, 1), (1, 4, 3, 8, 4), (1, 1, 1, 4, 1), (2, 1, 6, 3, 3), (1, 5, 1, 1, 1), (1, 3, 3, 6, 2)]
ZERO_SIZE_CASES = [(0, 3, 4, 8, 1), (2, 0, 4, 8, 1), (2, 3, 0, 8, 4)]  # no batch, no row, no column


def param_id(value):
    """Readable test ids (``2x7x9x300x1-bfloat16``), stable when a list of cases grows (tools/gpu_checks.sh
    names some of these tests)."""
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value).replace("torch.", "")


def strided_layout(inputs):
    """The same values in other memory layouts, as a model may pass them: x a channels-last view of NCHW memory,
    the conv weight with its taps outermost. Neither is contiguous."""
    x, w1, b1, conv_weight, *rest = inputs
    x = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    conv_weight = conv_weight.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
    assert not x.is_contiguous() and not conv_weight.is_contiguous()
    return [x, w1, b1, conv_weight, *rest]


def _inputs(case, dtype, device="cpu", seed=0):
    """``[x, norm1_weight, norm1_bias, conv_weight, conv_bias, norm2_weight, norm2_bias]`` and a grad_out."""
    B, H, W, C, cpg = case
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, mean=0.0, std=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std + mean

    tensors = [rand(B, H, W, C), rand(C, mean=1.0, std=0.3), rand(C, std=0.3), rand(C, cpg, 3, 3, std=0.5),
               rand(C, std=0.3), rand(C, mean=1.0, std=0.3), rand(C, std=0.3)]
    return [t.to(device=device, dtype=dtype) for t in tensors], rand(B, H, W, C).to(device=device, dtype=dtype)


def _kernel(*args, eps=1e-6, library=torch.ops.structtoken):
    return library.depthwise_projection(*args, eps)[0]


def _assert_within_factor_of_eager(case, dtype, device, factor=3.0, floor=1e-6, library=torch.ops.structtoken,
                                   kernel=None, layout=None):
    """Errors of ``kernel`` (default: the op of ``library``) against float64 within ``factor`` x eager PyTorch's
    in ``dtype``; ``layout`` (e.g. :func:`strided_layout`) re-lays the inputs out in memory first."""
    inputs, grad = _inputs(case, dtype, device)
    if layout is not None:
        inputs = layout(inputs)
    kernel = kernel or (lambda *a, eps: _kernel(*a, eps=eps, library=library))
    ours = max_errors(kernel, reference.depthwise_projection, inputs, grad, eps=1e-6)
    eager = max_errors(reference.depthwise_projection, reference.depthwise_projection, inputs, grad, eps=1e-6)
    for name in ours:
        assert ours[name] <= factor * eager[name] + floor, (name, ours, eager)


@needs_extension
@pytest.mark.parametrize("case", ODD_CASES)
def test_cpu_float32_error_within_factor_of_eager(case):
    _assert_within_factor_of_eager(case, torch.float32, "cpu")


@needs_extension
@pytest.mark.parametrize("case", ODD_CASES)
def test_cpu_gradcheck_float64(case):
    inputs, _ = _inputs(case, torch.float64)
    inputs = [t.requires_grad_() for t in inputs]
    # C = 1 makes LayerNorm's output its bias: the input gradient is exactly 0, the check still holds.
    assert torch.autograd.gradcheck(lambda *a: _kernel(*a, eps=1e-5), inputs)


@needs_extension
def test_saved_statistics_are_the_layernorm_statistics():
    inputs, _ = _inputs((2, 3, 4, 6, 1), torch.float64)
    x = inputs[0]
    _, mean1, rstd1, conv_out, mean2, rstd2 = torch.ops.structtoken.depthwise_projection(*inputs, 1e-6)
    torch.testing.assert_close(mean1, x.mean(-1))
    torch.testing.assert_close(rstd1, (x.var(-1, unbiased=False) + 1e-6).rsqrt())
    torch.testing.assert_close(mean2, conv_out.mean(-1))
    torch.testing.assert_close(rstd2, (conv_out.var(-1, unbiased=False) + 1e-6).rsqrt())


@needs_extension
def test_opcheck():
    inputs, grad = _inputs((1, 3, 4, 8, 2), torch.float32)
    torch.library.opcheck(torch.ops.structtoken.depthwise_projection,
                          [t.requires_grad_() for t in inputs] + [1e-6])
    saved = torch.ops.structtoken.depthwise_projection(*[t.detach() for t in inputs], 1e-6)[1:]
    x, w1, b1, cw, _, w2, b2 = (t.detach() for t in inputs)
    torch.library.opcheck(torch.ops.structtoken.depthwise_projection_backward, (grad, x, w1, b1, cw, w2, b2, *saved))


@needs_extension
def test_torch_compile_traces_forward_and_backward():
    inputs, grad = _inputs((1, 3, 3, 4, 1), torch.float64)
    inputs = [t.requires_grad_() for t in inputs]
    compiled = torch.compile(lambda *a: ops.depthwise_projection(*a), backend="aot_eager", fullgraph=True)
    out = compiled(*inputs)
    torch.testing.assert_close(out, reference.depthwise_projection(*inputs))
    got = torch.autograd.grad(out, inputs[3], grad)[0]
    expected = torch.autograd.grad(reference.depthwise_projection(*inputs), inputs[3], grad)[0]
    torch.testing.assert_close(got, expected)


def _with(inputs, index, tensor):
    return inputs[:index] + [tensor] + inputs[index + 1:]


@needs_extension
@pytest.mark.parametrize(
    "index, bad, message",
    [
        (0, torch.zeros(2, 3, 8), "x must be channels-last [B, H, W, C]"),
        (0, torch.zeros(1, 8, 3, 4).permute(0, 2, 3, 1), "x must be contiguous"),
        (0, torch.zeros(1, 3, 4, 8, dtype=torch.float16), "x must be float32 or float64 on CPU"),
        (1, torch.zeros(7), "norm1_weight must be [C] with C = 8"),
        (4, torch.zeros(8, 1), "conv_bias must be [C] with C = 8"),
        (6, torch.zeros(8, dtype=torch.float64), "norm2_bias has dtype Double but x has dtype Float"),
        (3, torch.zeros(8, 3, 3, 3), "conv_weight must be [C, C / groups, 3, 3] with C = 8"),
        (3, torch.zeros(8, 1, 5, 5), "conv_weight must be [C, C / groups, 3, 3] with C = 8"),
    ],
)
def test_bad_inputs_name_the_argument(index, bad, message):
    inputs, _ = _inputs((1, 3, 4, 8, 1), torch.float32)
    escaped = message.replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(RuntimeError, match=escaped):
        torch.ops.structtoken.depthwise_projection(*_with(inputs, index, bad), 1e-6)


CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cuda_floor(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-3


def _assert_empty_inputs_give_empty_outputs(case, dtype, device, library=torch.ops.structtoken):
    """Zero-size inputs (which PyTorch's conv2d refuses when H or W is 0): an empty output and input gradient of
    x's shape, and zero parameter gradients (sums over no pixel)."""
    inputs, grad = _inputs(case, dtype, device)
    out, grads = forward_backward(lambda *a: _kernel(*a, library=library), inputs, grad)
    assert out.shape == grads[0].shape == inputs[0].shape and out.numel() == 0
    for got, parameter in zip(grads[1:], inputs[1:]):
        torch.testing.assert_close(got, torch.zeros_like(parameter), rtol=0, atol=0)


@needs_cuda_kernel
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=param_id)
@pytest.mark.parametrize("case", ODD_CASES + [(2, 7, 9, 300, 1), (1, 5, 6, 1100, 4), (1, 3, 5, 4096, 4),
                                              (2, 40, 40, 768, 1), (1, 33, 40, 2600, 1)], ids=param_id)
def test_cuda_error_within_factor_of_eager(case, dtype):
    _assert_within_factor_of_eager(case, dtype, "cuda", floor=_cuda_floor(dtype))


@needs_cuda_kernel
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=param_id)
@pytest.mark.parametrize("case", [(2, 3, 5, 8, 1), (1, 5, 6, 1100, 4), (2, 40, 40, 768, 1)], ids=param_id)
def test_cuda_non_contiguous_inputs_through_the_dispatch(case, dtype, monkeypatch):
    """``structtoken_d2.ops.depthwise_projection`` (what the model calls) on strided inputs runs the kernel."""
    monkeypatch.delenv(ops.FORCE_PYTORCH_ENV, raising=False)
    _assert_within_factor_of_eager(case, dtype, "cuda", floor=_cuda_floor(dtype), layout=strided_layout,
                                   kernel=lambda *a, eps: ops.depthwise_projection(*a, eps=eps))


@needs_cuda_kernel
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=param_id)
@pytest.mark.parametrize("case", ZERO_SIZE_CASES, ids=param_id)
def test_cuda_zero_size_inputs_give_empty_outputs(case, dtype):
    _assert_empty_inputs_give_empty_outputs(case, dtype, "cuda")


# The CUDA sources run on the CPU by the emulator (tests/cuda_emulation): CI's check of the device code. Beyond
# the odd cases: 2 and 4 values per thread, the 512-thread layout (C > 2048) at its 4096 limit, and weight-gradient
# grids with several image rows per row group (C = 2700, 3 channels per group: 33 blocks per row group).
EMULATED_CASES = ODD_CASES + [(2, 3, 4, 300, 1), (1, 2, 3, 1100, 4), (1, 2, 2, 4096, 4), (2, 20, 1, 2700, 3)]


@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("case", EMULATED_CASES)
def test_emulated_cuda_error_within_factor_of_eager(case, dtype, emulated_cuda_ops):
    _assert_within_factor_of_eager(case, dtype, "cpu", floor=_cuda_floor(dtype), library=emulated_cuda_ops)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
def test_emulated_cuda_non_contiguous_inputs_through_the_dispatch(dtype, emulated_cuda_ops, monkeypatch):
    monkeypatch.delenv(ops.FORCE_PYTORCH_ENV, raising=False)
    monkeypatch.setattr(ops, "LIBRARY", emulated_cuda_ops)  # the dispatch's CUDA path, on the emulated kernels
    monkeypatch.setattr(ops, "COMPILED_DEVICE_TYPES", frozenset({"cpu"}))
    monkeypatch.setitem(ops.KERNEL_DTYPES, "cpu", ops.KERNEL_DTYPES["cuda"])
    monkeypatch.setattr(ops, "REFERENCE_IS_FASTER", {})  # as on CUDA
    calls = []
    monkeypatch.setattr(reference, "depthwise_projection", lambda *a, _f=reference.depthwise_projection, **k:
                        calls.append(1) or _f(*a, **k))
    _assert_within_factor_of_eager((1, 5, 6, 40, 4), dtype, "cpu", floor=_cuda_floor(dtype), layout=strided_layout,
                                   kernel=lambda *a, eps: ops.depthwise_projection(*a, eps=eps))
    assert len(calls) == 3  # the float64 truth and eager PyTorch's two runs: the kernel path never fell back


@pytest.mark.parametrize("case", ZERO_SIZE_CASES, ids=param_id)
def test_emulated_cuda_zero_size_inputs_give_empty_outputs(case, emulated_cuda_ops):
    _assert_empty_inputs_give_empty_outputs(case, torch.bfloat16, "cpu", library=emulated_cuda_ops)


def test_emulated_cuda_rejects_more_channels_than_supported(emulated_cuda_ops):
    inputs, _ = _inputs((1, 1, 1, 4097, 1), torch.float32)
    with pytest.raises(RuntimeError, match="supports C <= 4096"):
        emulated_cuda_ops.depthwise_projection(*inputs, 1e-6)


def test_emulated_cuda_opcheck(emulated_cuda_ops):
    inputs, _ = _inputs((2, 3, 4, 40, 4), torch.bfloat16)
    torch.library.opcheck(emulated_cuda_ops.depthwise_projection, [t.requires_grad_() for t in inputs] + [1e-6])


@needs_cuda_kernel
def test_cuda_rejects_more_channels_than_supported():
    inputs, _ = _inputs((1, 2, 2, 4097, 1), torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="supports C <= 4096"):
        torch.ops.structtoken.depthwise_projection(*inputs, 1e-6)


@needs_cuda_kernel
def test_cuda_wider_inputs_take_the_reference():
    inputs, _ = _inputs((1, 2, 2, ops.CUDA_MAX_PROJECTION_CHANNELS + 1, 1), torch.float32, "cuda")
    torch.testing.assert_close(ops.depthwise_projection(*inputs), reference.depthwise_projection(*inputs))


@needs_cuda_kernel
def test_cuda_opcheck():
    inputs, _ = _inputs((2, 5, 7, 520, 4), torch.bfloat16, "cuda")
    torch.library.opcheck(torch.ops.structtoken.depthwise_projection,
                          [t.requires_grad_() for t in inputs] + [1e-6])
