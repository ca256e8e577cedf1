"""StructToken ops: compiled kernels where built for the tensor's device, else the PyTorch reference.

``active_implementation(device)`` says which one a call on ``device`` uses:
``"compiled-cuda"``, ``"compiled-cpu"`` or ``"pytorch"``. Set the environment variable
``STRUCTTOKEN_D2_FORCE_PYTORCH_OPS=1`` (or the config key ``MODEL.STRUCTTOKEN.FORCE_PYTORCH_OPS``)
to force the reference. Inputs in a dtype the kernels lack (e.g. bfloat16 on CPU) also take the
reference, and so do CUDA projections wider than ``CUDA_MAX_PROJECTION_CHANNELS``, ops whose kernel is
slower than the reference on the device type (``REFERENCE_IS_FASTER``), and code that ``torch.compile``
traces on a device of ``COMPILE_TRACES_REFERENCE``. Under autocast, the ops run
in the autocast dtype, as ``torch.matmul`` / ``conv2d`` would.
"""
import contextlib
import os

import torch

from . import reference

FORCE_PYTORCH_ENV = "STRUCTTOKEN_D2_FORCE_PYTORCH_OPS"

# Dtypes each compiled backend implements, by device type.
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}

# Widest channels-last input of the CUDA depthwise_projection kernel (csrc/cuda/depthwise_projection_cuda.cu);
# wider inputs take the reference.
CUDA_MAX_PROJECTION_CHANNELS = 4096

try:  # importing the extension registers torch.ops.structtoken.*
    from .. import _C  # noqa: F401
    from . import registrations  # noqa: F401

    EXTENSION_ERROR = None
except ImportError as e:  # not built: pure-Python install
    EXTENSION_ERROR = e


def _compiled_device_types() -> frozenset:
    """Device types the loaded extension has kernels for (checked once, so torch.compile need not)."""
    if EXTENSION_ERROR is not None:
        return frozenset()
    keys = {"cpu": "CPU", "cuda": "CUDA"}
    return frozenset(t for t, key in keys.items()
                     if torch._C._dispatch_has_kernel_for_dispatch_key("structtoken::slice_attention", key))


COMPILED_DEVICE_TYPES = _compiled_device_types()

# Device types whose ops torch.compile (MODEL.COMPILE) traces through the reference, not the kernels.
# The CPU kernels compose ATen's CPU kernels, which inductor calls as they are; traced, the reference's
# LayerNorm and GELU become inductor's own fused loops. The main job's training step over the eager one
# (tools/benchmark_model.py --mode train --compile, 2-core CPU, 2026-11-28, docs/benchmarks.md): compiled
# with the kernels 1.08-1.09x on 1 thread, 1.15x on 2; through the reference 1.11-1.13x and 1.20-1.24x.
# CUDA keeps its kernels: not measured on a GPU yet.
COMPILE_TRACES_REFERENCE = frozenset({"cpu"})

# Ops that take the reference on a device type where their compiled kernel is built, because the reference
# is faster there (docs/benchmarks.md "The CPU path of the head", 2026-12-04, a 2-core Xeon). On a CPU the
# fused depthwise projection (forward + backward, the ViT-T ADE20K head's widths 150 to 1368 and the main
# job's 198 and 792) took 1.1-1.6x the time of the reference, whose oneDNN grouped convolution it cannot
# match; the slice attention kernel (CSE and SSE at that head's shapes) took 1.09-1.23x the reference's
# time forward, and forward + backward 0.97-0.98x with 1 thread, 1.02-1.03x with 2.
REFERENCE_IS_FASTER = {"cpu": frozenset({"depthwise_projection", "slice_attention"})}

# The op library the dispatch below calls (the tests swap in the CUDA kernels run on the CPU emulator).
LIBRARY = torch.ops.structtoken
# The ops this module dispatches.
OP_NAMES = frozenset({"depthwise_projection", "slice_attention"})


def active_implementation(device) -> str:
    """``"compiled-cuda"``, ``"compiled-cpu"`` or ``"pytorch"``: what the ops run on ``device``."""
    device = torch.device(device)
    if os.environ.get(FORCE_PYTORCH_ENV, "0") not in ("", "0"):
        return "pytorch"
    if device.type not in COMPILED_DEVICE_TYPES:
        return "pytorch"
    if device.type in COMPILE_TRACES_REFERENCE and torch.compiler.is_compiling():
        return "pytorch"
    return f"compiled-{device.type}"


def implementation_summary(device, model_compiled: bool = False) -> str:
    """:func:`active_implementation`, and what compiled code runs where that differs (a model with
    ``MODEL.COMPILE`` on a device of ``COMPILE_TRACES_REFERENCE``): the line the trainer logs."""
    name = active_implementation(device)
    device_type = torch.device(device).type
    faster = REFERENCE_IS_FASTER.get(device_type, frozenset())
    if name != "pytorch" and faster >= OP_NAMES:
        return f"pytorch (faster here than the {name} kernels, which are built)"
    if name != "pytorch" and faster:
        name += f" (the pytorch reference for {', '.join(sorted(faster))}: faster here)"
    if model_compiled and name != "pytorch" and device_type in COMPILE_TRACES_REFERENCE:
        return f"{name} in eager code, the pytorch reference in compiled code (MODEL.COMPILE)"
    return name


@contextlib.contextmanager
def forced_pytorch(enabled: bool = True):
    """Within the block, the ops take the PyTorch reference (``enabled``) or the kernels where built
    (not ``enabled``), whatever ``STRUCTTOKEN_D2_FORCE_PYTORCH_OPS`` says; it is restored after.
    (``torch.compile`` guards on the variable: a compiled function recompiles for the other setting.)"""
    old = os.environ.get(FORCE_PYTORCH_ENV)
    os.environ[FORCE_PYTORCH_ENV] = "1" if enabled else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[FORCE_PYTORCH_ENV]
        else:
            os.environ[FORCE_PYTORCH_ENV] = old


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for ``x``'s device, else ``x.dtype``."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _runs_compiled(device: torch.device, dtype: torch.dtype, op: str) -> bool:
    return (active_implementation(device) != "pytorch" and dtype in KERNEL_DTYPES[device.type]
            and op not in REFERENCE_IS_FASTER.get(device.type, ()))


def slice_attention(q, k, v, scale: float):
    """See :func:`reference.slice_attention`; ``[B, M, N] x [B, C, N] x [B, C, N] -> [B, M, N]``."""
    dtype = _compute_dtype(q)
    if not _runs_compiled(q.device, dtype, "slice_attention"):
        return reference.slice_attention(q, k, v, scale)
    with torch.autocast(q.device.type, enabled=False):
        return LIBRARY.slice_attention(q.to(dtype), k.to(dtype), v.to(dtype), float(scale))[0]


def depthwise_projection(x, norm1_weight, norm1_bias, conv_weight, conv_bias, norm2_weight, norm2_bias, eps=1e-6):
    """See :func:`reference.depthwise_projection`; ``[B, H, W, C] -> [B, H, W, C]``.

    The parameters are cast to the compute dtype of ``x`` (their gradients flow back in their own dtype).
    """
    params = (norm1_weight, norm1_bias, conv_weight, conv_bias, norm2_weight, norm2_bias)
    dtype = _compute_dtype(x)
    too_wide = x.device.type == "cuda" and x.shape[-1] > CUDA_MAX_PROJECTION_CHANNELS
    if too_wide or not _runs_compiled(x.device, dtype, "depthwise_projection"):
        return reference.depthwise_projection(x, *params, eps)
    with torch.autocast(x.device.type, enabled=False):
        args = [x.to(dtype).contiguous()] + [p.to(dtype) for p in params]
        return LIBRARY.depthwise_projection(*args, float(eps))[0]


__all__ = ["active_implementation", "implementation_summary", "forced_pytorch", "slice_attention", "depthwise_projection", "reference", "KERNEL_DTYPES"]
