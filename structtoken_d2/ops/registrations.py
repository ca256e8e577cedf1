"""Fake (meta) kernels and autograd formulas of the compiled ``torch.ops.structtoken`` ops.

The schemas and the CPU/CUDA kernels live in ``csrc/``; importing this module (done by
:mod:`structtoken_d2.ops` once the extension is loaded) makes the ops traceable by ``torch.compile``
and differentiable. Each backward is once-differentiable.
"""
import torch

_OPS = torch.ops.structtoken


def _contiguous_like(t: torch.Tensor) -> torch.Tensor:
    """A contiguous empty tensor of ``t``'s shape (the kernels return contiguous tensors whatever their inputs)."""
    return t.new_empty(t.shape)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the saved softmax / LayerNorm statistics: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("structtoken::slice_attention")
def _slice_attention_fake(q, k, v, scale):
    return _contiguous_like(q), q.new_empty(q.shape[:2], dtype=_stats_dtype(q.dtype))


@torch.library.register_fake("structtoken::slice_attention_backward")
def _slice_attention_backward_fake(grad_out, q, k, v, lse, scale):
    return _contiguous_like(q), _contiguous_like(k), _contiguous_like(v)


@torch.library.register_fake("structtoken::depthwise_projection")
def _depthwise_projection_fake(x, norm1_weight, norm1_bias, conv_weight, conv_bias, norm2_weight, norm2_bias, eps):
    stats = [x.new_empty(x.shape[:3], dtype=_stats_dtype(x.dtype)) for _ in range(4)]
    return _contiguous_like(x), stats[0], stats[1], _contiguous_like(x), stats[2], stats[3]


@torch.library.register_fake("structtoken::depthwise_projection_backward")
def _depthwise_projection_backward_fake(grad_out, x, norm1_weight, norm1_bias, conv_weight, norm2_weight, norm2_bias,
                                   mean1, rstd1, conv_out, mean2, rstd2):
    vector = [_contiguous_like(norm1_weight) for _ in range(5)]
    return (_contiguous_like(x), vector[0], vector[1], _contiguous_like(conv_weight), vector[2], vector[3],
            vector[4])


def _slice_attention_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v, output[1])
    ctx.scale = scale
    ctx.mark_non_differentiable(output[1])


def _slice_attention_backward(ctx, grad_out, grad_lse):
    q, k, v, lse = ctx.saved_tensors
    grad_q, grad_k, grad_v = _OPS.slice_attention_backward(grad_out, q, k, v, lse, ctx.scale)
    return grad_q, grad_k, grad_v, None


def _depthwise_projection_setup(ctx, inputs, output):
    x, norm1_weight, norm1_bias, conv_weight, _, norm2_weight, norm2_bias, _ = inputs
    _, mean1, rstd1, conv_out, mean2, rstd2 = output
    ctx.mark_non_differentiable(mean1, rstd1, conv_out, mean2, rstd2)
    ctx.save_for_backward(x, norm1_weight, norm1_bias, conv_weight, norm2_weight, norm2_bias,
                          mean1, rstd1, conv_out, mean2, rstd2)


def _depthwise_projection_backward(ctx, grad_out, *unused_grads_of_saved):
    grads = _OPS.depthwise_projection_backward(grad_out.contiguous(), *ctx.saved_tensors)
    grad_x, grad_w1, grad_b1, grad_conv_w, grad_conv_b, grad_w2, grad_b2 = grads
    return grad_x, grad_w1, grad_b1, grad_conv_w, grad_conv_b, grad_w2, grad_b2, None


torch.library.register_autograd("structtoken::slice_attention", _slice_attention_backward,
                                setup_context=_slice_attention_setup)
torch.library.register_autograd("structtoken::depthwise_projection", _depthwise_projection_backward,
                                setup_context=_depthwise_projection_setup)
