"""Fake (meta) kernels and autograd formulas of the compiled ``torch.ops.structtoken`` ops.

The schemas and the CPU/CUDA kernels live in ``csrc/``; importing this module (done by
:mod:`structtoken_d2.ops` once the extension is loaded) makes the ops traceable by ``torch.compile``
and differentiable. Each backward is once-differentiable. :func:`register` does the same for another
library with the same schemas (the tests' CUDA emulation, ``structtoken_emulated``).
"""
import torch


def _contiguous_like(t: torch.Tensor) -> torch.Tensor:
    """A contiguous empty tensor of ``t``'s shape (the kernels return contiguous tensors whatever their inputs)."""
    return t.new_empty(t.shape)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the saved LayerNorm statistics: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _slice_attention_fake(q, k, v, scale):
    return _contiguous_like(q), q.new_empty((q.shape[0], q.shape[1], k.shape[1]))


def _slice_attention_backward_fake(grad_out, q, k, v, probs, scale):
    return _contiguous_like(q), _contiguous_like(k), _contiguous_like(v)


def _depthwise_projection_fake(x, norm1_weight, norm1_bias, conv_weight, conv_bias, norm2_weight, norm2_bias, eps):
    stats = [x.new_empty(x.shape[:3], dtype=_stats_dtype(x.dtype)) for _ in range(4)]
    return _contiguous_like(x), stats[0], stats[1], _contiguous_like(x), stats[2], stats[3]


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


def _depthwise_projection_setup(ctx, inputs, output):
    x, norm1_weight, norm1_bias, conv_weight, _, norm2_weight, norm2_bias, _ = inputs
    _, mean1, rstd1, conv_out, mean2, rstd2 = output
    ctx.mark_non_differentiable(mean1, rstd1, conv_out, mean2, rstd2)
    ctx.save_for_backward(x, norm1_weight, norm1_bias, conv_weight, norm2_weight, norm2_bias,
                          mean1, rstd1, conv_out, mean2, rstd2)


def register(namespace: str) -> None:
    """Registers the fake kernels and autograd formulas of the ops of ``torch.ops.<namespace>``."""
    library_ops = getattr(torch.ops, namespace)

    def slice_attention_backward(ctx, grad_out, grad_probs):
        q, k, v, probs = ctx.saved_tensors
        grad_q, grad_k, grad_v = library_ops.slice_attention_backward(grad_out, q, k, v, probs, ctx.scale)
        return grad_q, grad_k, grad_v, None

    def depthwise_projection_backward(ctx, grad_out, *unused_grads_of_saved):
        grads = library_ops.depthwise_projection_backward(grad_out.contiguous(), *ctx.saved_tensors)
        grad_x, grad_w1, grad_b1, grad_conv_w, grad_conv_b, grad_w2, grad_b2 = grads
        return grad_x, grad_w1, grad_b1, grad_conv_w, grad_conv_b, grad_w2, grad_b2, None

    fakes = {
        "slice_attention": _slice_attention_fake,
        "slice_attention_backward": _slice_attention_backward_fake,
        "depthwise_projection": _depthwise_projection_fake,
        "depthwise_projection_backward": _depthwise_projection_backward_fake,
    }
    for op, fake in fakes.items():
        torch.library.register_fake(f"{namespace}::{op}")(fake)
    torch.library.register_autograd(f"{namespace}::slice_attention", slice_attention_backward,
                                    setup_context=_slice_attention_setup)
    torch.library.register_autograd(f"{namespace}::depthwise_projection", depthwise_projection_backward,
                                    setup_context=_depthwise_projection_setup)


register("structtoken")
