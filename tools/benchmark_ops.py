#!/usr/bin/env python
"""Benchmark the fused StructToken ops against eager PyTorch, per paper shape preset.

For ``slice_attention`` (vs eager, ``scaled_dot_product_attention`` and ``torch.compile``), the fused
``depthwise_projection`` middle (vs eager and ``torch.compile``), the whole ``DepthwiseProjection``
module and one StructToken head training step (forward + loss + backward, under autocast for
16-bit dtypes), forward and forward+backward: median time (CUDA events, L2 flushed before each
call), peak memory, achieved GB/s and TFLOP/s and the % of the device roofline they reach.

GPU (the numbers docs/benchmarks.md asks for)::

    .venv/bin/python tools/benchmark_ops.py --device cuda --dtype bfloat16 --json bench.json --markdown bench.md

The head training step of the ViT-T ADE20K heads on a CPU, kernels (the default dispatch) against the
PyTorch reference, in interleaved rounds (docs/benchmarks.md, "The CPU path")::

    OMP_NUM_THREADS=1 .venv/bin/python tools/benchmark_ops.py --device cpu --heads-only --presets vitt-512 --iters 7 --warmup 1

CPU smoke run (tiny shapes, figures labelled CPU, no roofline)::

    OMP_NUM_THREADS=1 .venv/bin/python tools/benchmark_ops.py --device cpu --dtype float32 --smoke --no-compile

Exits with a message when ``structtoken_d2._C`` is not built for the device.
"""
import argparse
import contextlib
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

import structtoken_d2  # noqa: F401  (compat shims before any detectron2 import)
from structtoken_d2 import ops
from structtoken_d2.ops import reference
from structtoken_d2.ops.timing import (
    Roofline, device_label, device_roofline, interleaved_times, median_seconds, peak_memory_bytes,
)

# (B, M, C, N): tokens [B, M, N] attend over C feature slices of length N = H*W.
SLICE_PRESETS = {
    "ade20k-vitb-640-cse": (8, 150, 768, 1600),  # the target shape of docs/benchmarks.md
    "ade20k-vitt-512-cse": (8, 150, 192, 1024),
    "ade20k-vits-512-cse": (8, 150, 384, 1024),
    "ade20k-vitl-640-cse": (8, 150, 1024, 1600),
    "ade20k-vitb-640-sse": (8, 918, 918, 1600),  # SSE: q, k, v all [K + C, N]
    "cityscapes-vitl-768-cse": (8, 19, 1024, 2304),
    "coco-vitb-512-cse": (8, 171, 768, 1024),
    "coco-vitl-512-cse": (8, 171, 1024, 1024),  # configs/coco_stuff_10k are ViT-L
}
# (B, H, W, C, channels per conv group): projections are depthwise, the FFN has 4 channels per group.
PROJECTION_PRESETS = {
    "ade20k-vitb-640-proj": (8, 40, 40, 768, 1),  # the target shape of docs/benchmarks.md
    "ade20k-vitb-640-token-proj": (8, 40, 40, 150, 1),
    "ade20k-vitb-640-ffn": (8, 40, 40, 3072, 4),
    "ade20k-vitt-512-proj": (8, 32, 32, 192, 1),
    "ade20k-vitt-512-ffn": (8, 32, 32, 768, 4),
    "ade20k-vitl-640-ffn": (8, 40, 40, 4096, 4),  # the widest the CUDA kernel takes
    "cityscapes-vitl-768-proj": (8, 48, 48, 1024, 1),
    "cityscapes-vitl-768-token-proj": (8, 48, 48, 19, 1),
}
HEAD_PRESETS = {
    "ade20k-vitb-640-cse": dict(batch=8, channels=768, num_classes=150, size=40, num_blocks=4),
    # the ViT-T ADE20K heads, batch 2 (one GPU's share of the authors' batch 16): the CPU comparison
    "ade20k-vitt-512-cse": dict(batch=2, channels=192, num_classes=150, size=32, num_blocks=4, variant="CSE"),
    "ade20k-vitt-512-sse": dict(batch=2, channels=192, num_classes=150, size=32, num_blocks=4, variant="SSE"),
    "ade20k-vitt-512-pwe": dict(batch=2, channels=192, num_classes=150, size=32, num_blocks=4, variant="PWE"),
}
SMOKE_SLICE_PRESETS = {"smoke": (2, 19, 32, 256)}
SMOKE_PROJECTION_PRESETS = {"smoke-proj": (2, 16, 16, 32, 1), "smoke-ffn": (2, 16, 16, 64, 4)}
SMOKE_HEAD_PRESETS = {"smoke": dict(batch=1, channels=32, num_classes=5, size=8, num_blocks=2)}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class Case:
    """One timed callable. ``bytes_moved`` / ``flops``: the minimal traffic and work of the computation."""

    op: str
    preset: str
    shape: str
    mode: str  # "fwd" or "fwd+bwd"
    impl: str
    fn: Callable[[], object]
    bytes_moved: float = 0.0
    flops: float = 0.0


@dataclass
class Row:
    op: str
    preset: str
    shape: str
    mode: str
    impl: str
    device: str
    dtype: str
    median_us: float
    speedup_vs_eager: Optional[float]
    peak_mem_mib: Optional[float]
    gbps: Optional[float]
    tflops: Optional[float]
    roofline_pct: Optional[float]


def implementation(name: str):
    """Runs the structtoken_d2.ops calls in the block on the compiled kernels or on the reference ("eager")."""
    return ops.forced_pytorch(name == "eager")


def _fwd_and_bwd_cases(op, preset, shape, impls, inputs, fwd_bytes, bwd_bytes, fwd_flops, bwd_flops):
    """A "fwd" case (no grad) and a "fwd+bwd" case (torch.autograd.grad) per implementation."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    cases = []
    for impl, fn in impls.items():
        def forward(fn=fn):
            with torch.no_grad():
                return fn(*inputs)

        def forward_backward(fn=fn):
            out = fn(*leaves)
            return torch.autograd.grad(out, leaves, torch.ones_like(out))

        cases.append(Case(op, preset, shape, "fwd", impl, forward, fwd_bytes, fwd_flops))
        cases.append(Case(op, preset, shape, "fwd+bwd", impl, forward_backward, fwd_bytes + bwd_bytes,
                          fwd_flops + bwd_flops))
    return cases


def slice_attention_cases(presets, device, dtype, use_compile) -> List[Case]:
    cases = []
    for preset, (B, M, C, N) in presets.items():
        scale = N ** -0.5
        q, k, v = (torch.randn(*s, device=device, dtype=dtype) for s in ((B, M, N), (B, C, N), (B, C, N)))
        impls = {
            "kernel": lambda q, k, v: torch.ops.structtoken.slice_attention(q, k, v, scale)[0],
            "eager": lambda q, k, v: reference.slice_attention(q, k, v, scale),
            "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None],
                                                                   scale=scale)[:, 0],
        }
        if use_compile:
            impls["compile"] = torch.compile(lambda q, k, v: reference.slice_attention(q, k, v, scale))
        size = q.element_size()
        cases += _fwd_and_bwd_cases(
            "slice_attention", preset, f"B{B} M{M} C{C} N{N}", impls, (q, k, v),
            fwd_bytes=size * (2 * B * M * N + 2 * B * C * N), bwd_bytes=size * (3 * B * M * N + 4 * B * C * N),
            fwd_flops=4 * B * M * C * N, bwd_flops=8 * B * M * C * N)
    return cases


def _projection_parameters(C, cpg, device, dtype):
    """``[norm1_weight, norm1_bias, conv_weight, conv_bias, norm2_weight, norm2_bias]``."""
    return [torch.ones(C, device=device, dtype=dtype), torch.zeros(C, device=device, dtype=dtype),
            torch.randn(C, cpg, 3, 3, device=device, dtype=dtype) * 0.3, torch.zeros(C, device=device, dtype=dtype),
            torch.ones(C, device=device, dtype=dtype), torch.zeros(C, device=device, dtype=dtype)]


def projection_cases(presets, device, dtype, use_compile) -> List[Case]:
    cases = []
    for preset, (B, H, W, C, cpg) in presets.items():
        x = torch.randn(B, H, W, C, device=device, dtype=dtype)
        params = _projection_parameters(C, cpg, device, dtype)
        impls = {
            "kernel": lambda *a: torch.ops.structtoken.depthwise_projection(*a, 1e-6)[0],
            "eager": lambda *a: reference.depthwise_projection(*a, 1e-6),
        }
        if use_compile:
            impls["compile"] = torch.compile(lambda *a: reference.depthwise_projection(*a, 1e-6))
        tensor_bytes, conv_flops = x.numel() * x.element_size(), 18 * cpg * x.numel()
        cases += _fwd_and_bwd_cases(
            "depthwise_projection", preset, f"B{B} {H}x{W} C{C} cpg{cpg}", impls, (x, *params),
            fwd_bytes=2 * tensor_bytes, bwd_bytes=3 * tensor_bytes, fwd_flops=conv_flops, bwd_flops=2 * conv_flops)
    return cases


def _autocast(device, dtype):
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def module_cases(projection_presets, head_presets, device, dtype) -> List[Case]:
    """The whole DepthwiseProjection module and one head training step, kernels vs reference."""
    from structtoken_d2.modeling.heads.structtoken_head import StructTokenHead
    from structtoken_d2.modeling.layers import DepthwiseProjection

    param_dtype = torch.float32 if dtype != torch.float64 else dtype  # mixed precision keeps fp32 weights
    cases = []
    for preset, (B, H, W, C, cpg) in projection_presets.items():
        if cpg != 1:
            continue
        module = DepthwiseProjection(C, C).to(device=device, dtype=param_dtype)
        x = torch.randn(B, H, W, C, device=device, dtype=param_dtype, requires_grad=True)
        for impl in ("kernel", "eager"):
            def step(impl=impl):
                with implementation(impl), _autocast(device, dtype):
                    out = module(x)
                out.float().sum().backward()
            cases.append(Case("DepthwiseProjection module", preset, f"B{B} {H}x{W} C{C}", "fwd+bwd", impl, step))
    for preset, cfg in head_presets.items():
        head = StructTokenHead(in_feature="res5", in_channels=cfg["channels"], num_classes=cfg["num_classes"],
                               channels=cfg["channels"], num_blocks=cfg["num_blocks"], variant=cfg.get("variant", "CSE"),
                               token_size=(cfg["size"], cfg["size"])).to(device=device, dtype=param_dtype)
        size = (cfg["batch"], cfg["channels"], cfg["size"], cfg["size"])
        feature = torch.randn(*size, device=device, dtype=param_dtype)
        labels = torch.randint(cfg["num_classes"], (cfg["batch"], cfg["size"], cfg["size"]), device=device)
        for impl in ("kernel", "eager"):
            def train_step(impl=impl):
                head.zero_grad(set_to_none=True)
                with implementation(impl), _autocast(device, dtype):
                    logits = head({"res5": feature})
                F.cross_entropy(logits.float(), labels).backward()
            shape = "{variant} B{batch} C{channels} K{num_classes} {size}x{size} L{num_blocks}".format(
                **dict(dict(variant="CSE"), **cfg))
            cases.append(Case("StructTokenHead train step", preset, shape, "fwd+loss+bwd", impl, train_step))
    return cases


def measure(cases: Sequence[Case], device, dtype, roofline: Roofline, iters: int, warmup: int,
            cpu_clock: str = "process") -> List[Row]:
    """Median time of each case. On a GPU one case after the other (CUDA events, L2 flushed); on a CPU
    the implementations of one op, preset and mode in interleaved rounds (:func:`interleaved_times`),
    timed by ``cpu_clock``: "process", the process's CPU time (all threads), which other jobs on a shared
    machine change far less than the wall time; or "wall", what a user waits for (with several threads,
    CPU time also counts the threads' waits for each other)."""
    times = {}
    rows = []
    label = device_label(device)
    interleaved = {}
    if device.type == "cpu":
        groups = {}
        for case in cases:
            groups.setdefault((case.op, case.preset, case.mode), {})[case.impl] = case.fn
        for key, fns in groups.items():
            for impl, call_times in interleaved_times(fns, device, iters, warmup).items():
                interleaved[key + (impl,)] = statistics.median(call_times.cpu if cpu_clock == "process"
                                                               else call_times.wall)
    for case in cases:
        seconds = interleaved.get((case.op, case.preset, case.mode, case.impl))
        seconds = seconds if seconds is not None else median_seconds(case.fn, device, iters, warmup)
        times[(case.op, case.preset, case.mode, case.impl)] = seconds
        memory = peak_memory_bytes(case.fn, device)
        bound = roofline.seconds(case.bytes_moved, case.flops)
        rows.append(Row(
            case.op, case.preset, case.shape, case.mode, case.impl, label, str(dtype).replace("torch.", ""),
            median_us=seconds * 1e6, speedup_vs_eager=None,
            peak_mem_mib=None if memory is None else memory / 2 ** 20,
            gbps=case.bytes_moved / seconds / 1e9 if case.bytes_moved else None,
            tflops=case.flops / seconds / 1e12 if case.flops else None,
            roofline_pct=100 * bound / seconds if bound else None))
    for row in rows:
        eager = times.get((row.op, row.preset, row.mode, "eager"))
        row.speedup_vs_eager = eager / times[(row.op, row.preset, row.mode, row.impl)] if eager else None
    return rows


def markdown(rows: Sequence[Row], roofline: Optional[Roofline] = None) -> str:
    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    peaks = "" if roofline is None else (f"; roofline {fmt(roofline.gbps, 'g')} GB/s, "
                                         f"{fmt(roofline.tflops, 'g')} TFLOP/s")
    lines = [f"Device: {rows[0].device}, dtype {rows[0].dtype}{peaks}" if rows else "No rows.", "",
             "| op | preset | shape | mode | impl | median (µs) | vs eager | peak mem (MiB) | GB/s | TFLOP/s "
             "| % roofline |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r.op} | {r.preset} | {r.shape} | {r.mode} | {r.impl} | {r.median_us:.1f} | "
                     f"{fmt(r.speedup_vs_eager, '.2f')}x | {fmt(r.peak_mem_mib, '.1f')} | {fmt(r.gbps, '.3g')} | "
                     f"{fmt(r.tflops, '.3g')} | {fmt(r.roofline_pct, '.0f')} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU smoke test), not the paper presets")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--no-modules", action="store_true", help="skip the module and head training-step rows")
    parser.add_argument("--presets", nargs="+", default=None, metavar="NAME",
                        help="run only the presets whose name contains one of these (e.g. vitt-512)")
    parser.add_argument("--heads-only", action="store_true",
                        help="only the head training-step rows (e.g. the CPU comparison of the ViT-T heads)")
    parser.add_argument("--cpu-clock", choices=("process", "wall"), default="process",
                        help="CPU rows: median process CPU time (steadier on a shared machine) or wall time")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--peak-gbps", type=float, default=None, help="override the device's memory bandwidth")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak TFLOP/s")
    parser.add_argument("--json", default=None, help="write the rows here as JSON")
    parser.add_argument("--markdown", default=None, help="write the markdown table here (always printed)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    if device.type not in ops.COMPILED_DEVICE_TYPES:
        reason = ops.EXTENSION_ERROR or f"the extension was built without {device.type} kernels"
        sys.exit(f"benchmark_ops: no compiled structtoken ops for {device.type} ({reason}). Build them with "
                 f"`make setup` or `python setup.py build_ext --inplace` (CUDA: with nvcc found or FORCE_CUDA=1) "
                 f"and run again.")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmark_ops: --device cuda but no GPU is visible")
    if dtype not in ops.KERNEL_DTYPES[device.type]:
        sys.exit(f"benchmark_ops: the {device.type} kernels implement {ops.KERNEL_DTYPES[device.type]}, not {dtype}")
    slice_presets = SMOKE_SLICE_PRESETS if args.smoke else SLICE_PRESETS
    projection_presets = SMOKE_PROJECTION_PRESETS if args.smoke else PROJECTION_PRESETS
    head_presets = SMOKE_HEAD_PRESETS if args.smoke else HEAD_PRESETS
    if args.presets:
        def chosen(presets):
            return {name: p for name, p in presets.items() if any(part in name for part in args.presets)}
        slice_presets, projection_presets, head_presets = map(chosen, (slice_presets, projection_presets, head_presets))
    torch.manual_seed(0)
    if args.heads_only:
        cases = module_cases({}, head_presets, device, dtype)
    else:
        cases = slice_attention_cases(slice_presets, device, dtype, not args.no_compile)
        cases += projection_cases(projection_presets, device, dtype, not args.no_compile)
        if not args.no_modules:
            cases += module_cases(projection_presets, head_presets, device, dtype)
    roofline = device_roofline(device, dtype, args.peak_gbps, args.peak_tflops)
    rows = measure(cases, device, dtype, roofline, args.iters, args.warmup, args.cpu_clock)
    table = markdown(rows, roofline)
    if device.type == "cpu":
        clock = "process CPU time" if args.cpu_clock == "process" else "wall time"
        table = f"**CPU figures (median {clock}, interleaved rounds): not GPU performance.**\n\n" + table
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"roofline": asdict(roofline), "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
