"""structtoken::slice_attention/bwd: the compiled kernels against the float64 PyTorch reference."""
import pytest
import torch

import structtoken_d2  # noqa: F401  (compat shims before any detectron2 import)
from structtoken_d2 import ops
from structtoken_d2.ops import reference
from structtoken_d2.ops.accuracy import forward_backward, max_errors

needs_extension = pytest.mark.skipif(ops.EXTENSION_ERROR is not None, reason="structtoken_d2._C is not built")
needs_cuda_kernel = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in ops.COMPILED_DEVICE_TYPES, reason="needs a GPU and the CUDA build")

# (B, M, C, N): odd sizes, single token / channel / image, N not a multiple of any tile.
ODD_SHAPES = [(2, 5, 3, 7), (1, 1, 1, 1), (1, 3, 1, 33), (3, 1, 4, 5), (1, 7, 37, 65)]
GRADCHECK_SHAPES = ODD_SHAPES[:4] + [(1, 3, 17, 9)]  # gradcheck cost grows with the input size
ZERO_SIZE_SHAPES = [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 4, 0)]  # no batch, no token, no pixel


def param_id(value):
    """Readable test ids (``1x7x37x65-bfloat16``), stable when a list of cases grows (tools/gpu_checks.sh
    names some of these tests)."""
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value).replace("torch.", "")


def n_major(t):
    """``t`` [B, X, N] with the same values in N-major memory (a transposed view: not contiguous)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _inputs(shape, dtype, device="cpu", seed=0):
    B, M, C, N = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(*s, generator=g, dtype=torch.float64) for s in
                     ((B, M, N), (B, C, N), (B, C, N), (B, M, N)))
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)], grad.to(device=device, dtype=dtype)


def _kernel(q, k, v, scale, library=torch.ops.structtoken):
    return library.slice_attention(q, k, v, scale)[0]


def _assert_within_factor_of_eager(shape, dtype, device, factor=3.0, floor=1e-6, library=torch.ops.structtoken,
                                   layout=None):
    """Kernel errors (output, input gradients) against float64 within ``factor`` x eager PyTorch's in ``dtype``;
    ``layout`` (e.g. :func:`n_major`) re-lays the inputs out in memory first."""
    (q, k, v), grad = _inputs(shape, dtype, device)
    if layout is not None:
        q, k, v = (layout(t) for t in (q, k, v))
        assert not any(t.is_contiguous() for t in (q, k, v) if t.numel() > 1)
    scale = q.shape[-1] ** -0.5
    ours = max_errors(lambda *a, scale: _kernel(*a, scale, library), reference.slice_attention, (q, k, v), grad,
                      scale=scale)
    eager = max_errors(reference.slice_attention, reference.slice_attention, (q, k, v), grad, scale=scale)
    for name in ours:
        assert ours[name] <= factor * eager[name] + floor, (name, ours, eager)


@needs_extension
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_cpu_float32_error_within_factor_of_eager(shape):
    _assert_within_factor_of_eager(shape, torch.float32, "cpu")


@needs_extension
@pytest.mark.parametrize("shape", GRADCHECK_SHAPES)
def test_cpu_gradcheck_float64(shape):
    (q, k, v), _ = _inputs(shape, torch.float64)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda *a: _kernel(*a, 0.7), inputs)


@needs_extension
def test_saved_probs_are_the_softmax_of_the_scaled_logits():
    (q, k, v), _ = _inputs((2, 4, 6, 9), torch.float64)
    _, probs = torch.ops.structtoken.slice_attention(q, k, v, 0.3)
    expected = torch.softmax(torch.einsum("bmn,bcn->bmc", q, k) * 0.3, dim=-1)
    torch.testing.assert_close(probs, expected)


@needs_extension
def test_opcheck():
    (q, k, v), grad = _inputs((2, 3, 5, 7), torch.float32)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.structtoken.slice_attention, (q, k, v, 0.5))
    probs = torch.softmax(torch.randn(2, 3, 5), dim=-1)
    bwd_args = (grad, q.detach(), k.detach(), v.detach(), probs, 0.5)
    torch.library.opcheck(torch.ops.structtoken.slice_attention_backward, bwd_args)


@needs_extension
def test_opcheck_with_transposed_inputs():
    """The kernels return contiguous tensors for strided inputs; the fake kernels must say so."""
    (q, k, v), _ = _inputs((2, 3, 5, 7), torch.float32)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.structtoken.slice_attention, (q, k, v, 0.5))


@needs_extension
def test_torch_compile_traces_forward_and_backward():
    (q, k, v), _ = _inputs((1, 3, 4, 6), torch.float64)
    for t in (q, k, v):
        t.requires_grad_()
    compiled = torch.compile(lambda a, b, c: ops.slice_attention(a, b, c, 0.5), backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v)
    out.sum().backward()
    torch.testing.assert_close(out, reference.slice_attention(q, k, v, 0.5))
    expected = torch.autograd.grad(reference.slice_attention(q, k, v, 0.5).sum(), q)[0]
    torch.testing.assert_close(q.grad, expected)


@needs_extension
@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape, dtype, message",
    [
        ((2, 3), (2, 4, 5), (2, 4, 5), torch.float32, "q must be [B, M, N]"),
        ((2, 3, 5), (2, 4, 6), (2, 4, 6), torch.float32, "k must be [B, C, N] with B, N of q"),
        ((2, 3, 5), (2, 4, 5), (2, 3, 5), torch.float32, "v must have the shape of k"),
        ((2, 3, 5), (2, 0, 5), (2, 0, 5), torch.float32, "at least one channel"),
        ((2, 3, 5), (2, 4, 5), (2, 4, 5), torch.float16, "q must be float32 or float64 on CPU"),
    ],
)
def test_bad_inputs_name_the_argument(q_shape, k_shape, v_shape, dtype, message):
    q, k, v = (torch.zeros(s, dtype=dtype) for s in (q_shape, k_shape, v_shape))
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        torch.ops.structtoken.slice_attention(q, k, v, 1.0)


@needs_extension
def test_backward_checks_the_saved_probs():
    (q, k, v), grad = _inputs((2, 3, 5, 7), torch.float32)
    with pytest.raises(RuntimeError, match=r"probs must be \[B, M, C\] = \[2, 3, 5\], got \[2, 3, 4\]"):
        torch.ops.structtoken.slice_attention_backward(grad, q, k, v, torch.zeros(2, 3, 4), 1.0)
    with pytest.raises(RuntimeError, match="probs has dtype Double but q has dtype Float"):
        torch.ops.structtoken.slice_attention_backward(grad, q, k, v, torch.zeros(2, 3, 5, dtype=torch.float64), 1.0)


@needs_extension
def test_dtype_mismatch_names_the_argument():
    q, k = torch.zeros(1, 2, 3), torch.zeros(1, 2, 3)
    with pytest.raises(RuntimeError, match="v has dtype Double but q has dtype Float"):
        torch.ops.structtoken.slice_attention(q, k, k.double(), 1.0)


CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cuda_floor(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-3


def _assert_empty_inputs_match_the_reference(shape, dtype, device, library=torch.ops.structtoken):
    """Zero-size inputs: the kernel's output and input gradients have the reference's shapes and values
    (zeros where an empty sum makes them)."""
    inputs, grad = _inputs(shape, dtype, device)
    out, grads = forward_backward(lambda *a: _kernel(*a, 0.5, library), inputs, grad)
    expected_out, expected_grads = forward_backward(lambda *a: reference.slice_attention(*a, 0.5), inputs, grad)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    for got, expected in zip(grads, expected_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@needs_cuda_kernel
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=param_id)
@pytest.mark.parametrize("shape", ODD_SHAPES + [(2, 150, 192, 1024), (1, 342, 171, 1600)], ids=param_id)
def test_cuda_error_within_factor_of_eager(shape, dtype):
    _assert_within_factor_of_eager(shape, dtype, "cuda", floor=_cuda_floor(dtype))


@needs_cuda_kernel
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=param_id)
@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (1, 7, 37, 65), (2, 150, 192, 1024)], ids=param_id)
def test_cuda_non_contiguous_inputs_error_within_factor_of_eager(shape, dtype):
    _assert_within_factor_of_eager(shape, dtype, "cuda", floor=_cuda_floor(dtype), layout=n_major)


@needs_cuda_kernel
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=param_id)
@pytest.mark.parametrize("shape", ZERO_SIZE_SHAPES, ids=param_id)
def test_cuda_zero_size_inputs_match_the_reference(shape, dtype):
    _assert_empty_inputs_match_the_reference(shape, dtype, "cuda")


# The CUDA sources run on the CPU by the emulator (tests/cuda_emulation): CI's check of the device code.
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("shape", ODD_SHAPES + [(2, 40, 70, 96)])
def test_emulated_cuda_error_within_factor_of_eager(shape, dtype, emulated_cuda_ops):
    _assert_within_factor_of_eager(shape, dtype, "cpu", floor=_cuda_floor(dtype), library=emulated_cuda_ops)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
def test_emulated_cuda_non_contiguous_inputs_error_within_factor_of_eager(dtype, emulated_cuda_ops):
    _assert_within_factor_of_eager((1, 7, 37, 65), dtype, "cpu", floor=_cuda_floor(dtype), library=emulated_cuda_ops,
                                   layout=n_major)


@pytest.mark.parametrize("shape", ZERO_SIZE_SHAPES, ids=param_id)
def test_emulated_cuda_zero_size_inputs_match_the_reference(shape, emulated_cuda_ops):
    _assert_empty_inputs_match_the_reference(shape, torch.bfloat16, "cpu", library=emulated_cuda_ops)


def test_emulated_cuda_saved_probs_are_the_softmax(emulated_cuda_ops):
    (q, k, v), _ = _inputs((2, 9, 40, 33), torch.bfloat16)
    _, probs = emulated_cuda_ops.slice_attention(q, k, v, 0.3)
    expected = torch.softmax(torch.einsum("bmn,bcn->bmc", q.double(), k.double()) * 0.3, dim=-1)
    assert probs.dtype == torch.bfloat16
    torch.testing.assert_close(probs.double(), expected, rtol=2 ** -8, atol=1e-6)


def test_emulated_cuda_rejects_float64_naming_the_backend(emulated_cuda_ops):
    (q, k, v), _ = _inputs((1, 2, 3, 4), torch.float64)
    with pytest.raises(RuntimeError, match=r"q must be float32, float16 or bfloat16 on CUDA \(emulated"):
        emulated_cuda_ops.slice_attention(q, k, v, 1.0)


def test_emulated_cuda_opcheck(emulated_cuda_ops):
    (q, k, v), _ = _inputs((2, 3, 40, 70), torch.bfloat16)
    torch.library.opcheck(emulated_cuda_ops.slice_attention, [t.requires_grad_() for t in (q, k, v)] + [0.5])


@needs_cuda_kernel
def test_cuda_float64_is_rejected_with_a_clear_message():
    (q, k, v), _ = _inputs((1, 2, 3, 4), torch.float64, "cuda")
    with pytest.raises(RuntimeError, match="q must be float32, float16 or bfloat16 on CUDA"):
        torch.ops.structtoken.slice_attention(q, k, v, 1.0)


@needs_cuda_kernel
def test_cuda_opcheck():
    (q, k, v), _ = _inputs((2, 3, 40, 70), torch.bfloat16, "cuda")
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.structtoken.slice_attention, (q, k, v, 0.5))
