"""Accuracy of an op implementation against a float64 ground truth, in the FlashAttention-test style.

Used by the tests and by ``tools/benchmark_ops.py``: an implementation run in a low precision dtype
is judged by how its error compares with the eager PyTorch reference's error in the same dtype.
"""
from typing import Callable, Dict, Sequence

import torch


def forward_backward(fn: Callable, inputs: Sequence[torch.Tensor], grad_out: torch.Tensor, **kwargs):
    """``(out, grads)``: ``fn(*inputs, **kwargs)`` and the gradients of ``<out, grad_out>`` w.r.t. ``inputs``.

    The inputs are detached copies with ``requires_grad=True``, so the caller's tensors are untouched.
    """
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves, **kwargs)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


def max_errors(fn: Callable, reference: Callable, inputs: Sequence[torch.Tensor], grad_out: torch.Tensor,
               **kwargs) -> Dict[str, float]:
    """Max abs error of ``fn`` (output, then each input gradient) against ``reference`` run in float64.

    Returns ``{"out": e, "grad0": e, "grad1": e, ...}``.
    """
    truth_out, truth_grads = forward_backward(reference, [t.double() for t in inputs], grad_out.double(), **kwargs)
    out, grads = forward_backward(fn, inputs, grad_out, **kwargs)
    errors = {"out": (out.double() - truth_out).abs().max().item()}
    for i, (g, t) in enumerate(zip(grads, truth_grads)):
        errors[f"grad{i}"] = (g.double() - t).abs().max().item()
    return errors
