"""StructToken ops: compiled kernels where built for the tensor's device, else the PyTorch reference.

``active_implementation(device)`` says which one a call on ``device`` uses:
``"compiled-cuda"``, ``"compiled-cpu"`` or ``"pytorch"``. Set the environment variable
``STRUCTTOKEN_D2_FORCE_PYTORCH_OPS=1`` (or the config key ``MODEL.STRUCTTOKEN.FORCE_PYTORCH_OPS``)
to force the reference.
"""
import os

import torch

from . import reference

FORCE_PYTORCH_ENV = "STRUCTTOKEN_D2_FORCE_PYTORCH_OPS"

try:  # importing the extension registers torch.ops.structtoken.*
    from .. import _C  # noqa: F401

    EXTENSION_ERROR = None
except ImportError as e:  # not built: pure-Python install
    EXTENSION_ERROR = e


def _has_kernel(op: str, dispatch_key: str) -> bool:
    if EXTENSION_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"structtoken::{op}", dispatch_key)


def active_implementation(device) -> str:
    """``"compiled-cuda"``, ``"compiled-cpu"`` or ``"pytorch"``: what the ops run on ``device``."""
    device = torch.device(device)
    if os.environ.get(FORCE_PYTORCH_ENV, "0") not in ("", "0"):
        return "pytorch"
    key = {"cuda": "CUDA", "cpu": "CPU"}.get(device.type)
    if key is None or not _has_kernel("slice_attention", key):
        return "pytorch"
    return f"compiled-{device.type}"


def slice_attention(q, k, v, scale: float):
    """See :func:`reference.slice_attention`; ``[B, M, N] x [B, C, N] x [B, C, N] -> [B, M, N]``."""
    if active_implementation(q.device) == "pytorch":
        return reference.slice_attention(q, k, v, scale)
    return torch.ops.structtoken.slice_attention(q, k, v, scale)


def depthwise_projection(x, norm1_weight, norm1_bias, conv_weight, conv_bias, norm2_weight, norm2_bias, eps=1e-6):
    """See :func:`reference.depthwise_projection`; ``[B, H, W, C] -> [B, H, W, C]``."""
    args = (x, norm1_weight, norm1_bias, conv_weight, conv_bias, norm2_weight, norm2_bias, eps)
    if active_implementation(x.device) == "pytorch":
        return reference.depthwise_projection(*args)
    return torch.ops.structtoken.depthwise_projection(*args)


__all__ = ["active_implementation", "slice_attention", "depthwise_projection", "reference"]
