#!/usr/bin/env python
"""Check the StructToken head's training step per variant under bf16 autocast, kernels against PyTorch ops.

    python tools/gpu_check_head.py --json gpu_out/head_bf16.json
    python tools/gpu_check_head.py --tiny --iters 2 --json head.json     # the dry run's tiny head, on the CPU

For each extraction variant (CSE, SSE, PWE): one training step of a ``StructTokenHead`` (forward,
cross-entropy, backward; float32 weights, the forward under bfloat16 autocast, drop path off) with
the compiled kernels and with the PyTorch ops (``STRUCTTOKEN_D2_FORCE_PYTORCH_OPS=1``), from the same
weights and inputs, each against the same step in float64 without autocast. A step's error is the
largest relative L2 error of the logits and of every parameter gradient whose norm is above 1e-3 of
the largest. The kernels pass when their error is finite and at most 3x that of the PyTorch ops plus
1e-3 (the criterion of tests/test_ops_dispatch.py for the emulated kernels). Then the step's median
time (the two calls interleaved, CUDA-synchronised) and its peak memory, kernels against PyTorch ops
(target: 1.3x faster, no more memory). Default shape: ADE20K ViT-T 512 (B 8, C 192, K 150, 32x32,
4 blocks). Writes the key figures as a flat JSON object (``problems``: why it failed); exit status 1
when a check fails.
"""
import argparse
import contextlib
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import structtoken_d2  # noqa: F401  (compat shims before any detectron2 import)
from structtoken_d2 import ops
from structtoken_d2.modeling import EXTRACTION_REGISTRY, StructTokenHead
from structtoken_d2.ops.timing import interleaved_times, peak_memory_bytes
from structtoken_d2.output_files import replace_file

SHAPES = {
    "ade20k-vitt-512": dict(batch=8, channels=192, num_classes=150, size=32, num_blocks=4),
    "tiny": dict(batch=1, channels=16, num_classes=5, size=4, num_blocks=1),
}
FACTOR, FLOOR = 3.0, 1e-3
IMPLEMENTATIONS = {"kernels": False, "pytorch ops": True}  # name -> forces the PyTorch reference


def training_step(head, feature, labels, autocast_dtype=None):
    """``(logits, {parameter name: gradient})`` of one forward + cross-entropy + backward, in float64."""
    head.zero_grad(set_to_none=True)
    autocast = (torch.autocast(feature.device.type, dtype=autocast_dtype) if autocast_dtype
                else contextlib.nullcontext())
    with autocast:
        logits = head({"res5": feature})
    F.cross_entropy(logits.float(), labels).backward()
    return logits.detach().double(), {n: p.grad.detach().double() for n, p in head.named_parameters()}


def step_error(result, truth) -> float:
    """Largest relative L2 error of the logits and of every parameter gradient that is not negligible."""
    logits, grads = result
    norms = {name: t.norm() for name, t in truth[1].items()}
    largest = max(norms.values())
    errors = [(logits - truth[0]).norm() / truth[0].norm()]
    errors += [(grads[n] - truth[1][n]).norm() / norms[n] for n in grads if norms[n] > 1e-3 * largest]
    return max(errors).item()


def check_variant(variant, shape, device, iters, warmup, dtype=torch.bfloat16):
    """Key figures and problems of one variant."""
    torch.manual_seed(0)
    head = StructTokenHead(in_feature="res5", in_channels=shape["channels"], num_classes=shape["num_classes"],
                           channels=shape["channels"], variant=variant, num_blocks=shape["num_blocks"],
                           token_size=(shape["size"],) * 2, drop_path_rate=0.0).to(device).train()
    size = (shape["batch"], shape["channels"], shape["size"], shape["size"])
    feature = torch.randn(*size, device=device)
    labels = torch.randint(shape["num_classes"], (shape["batch"], shape["size"], shape["size"]), device=device)
    truth = training_step(copy.deepcopy(head).double(), feature.double(), labels)
    figures, problems, steps = {}, [], {}
    for name, forced in IMPLEMENTATIONS.items():
        with ops.forced_pytorch(forced):
            figures[f"{variant}: error {name}"] = step_error(training_step(head, feature, labels, dtype), truth)

        def step(forced=forced):
            with ops.forced_pytorch(forced):
                training_step(head, feature, labels, dtype)
        steps[name] = step
    ours, eager = figures[f"{variant}: error kernels"], figures[f"{variant}: error pytorch ops"]
    if not ours <= FACTOR * eager + FLOOR:  # (a NaN fails too)
        problems.append(f"{variant}: the kernels' error {ours:.3g} is above {FACTOR:g} x the PyTorch ops' "
                        f"{eager:.3g} + {FLOOR:g}")
    times = interleaved_times(steps, device, iters, warmup)
    median = {name: statistics.median(t.wall) for name, t in times.items()}
    figures[f"{variant}: step s kernels"] = median["kernels"]
    figures[f"{variant}: kernels speed-up over pytorch ops"] = median["pytorch ops"] / median["kernels"]
    memory = {name: peak_memory_bytes(fn, device) for name, fn in steps.items()}
    if memory["kernels"] is not None and memory["pytorch ops"]:
        figures[f"{variant}: peak memory kernels / pytorch ops"] = memory["kernels"] / memory["pytorch ops"]
    return figures, problems


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, metavar="FILE", help="write the key figures here (replaced)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="ade20k-vitt-512")
    parser.add_argument("--tiny", action="store_const", dest="shape", const="tiny", help="the same as --shape tiny")
    parser.add_argument("--variants", nargs="+", choices=[name for name, _ in EXTRACTION_REGISTRY],
                        default=["CSE", "SSE", "PWE"])
    parser.add_argument("--iters", type=int, default=20, help="timed steps of each implementation")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--require-kernels", action="store_true",
                        help="fail when the compiled kernels do not run in bfloat16 on the device (a GPU run)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    kernels_run = (ops.active_implementation(device) == f"compiled-{device.type}"
                   and torch.bfloat16 in ops.KERNEL_DTYPES[device.type])
    figures = {"shape": args.shape, "kernels run in bf16": kernels_run}
    problems = []
    if args.require_kernels and not kernels_run:
        problems.append(f"the compiled kernels do not run in bfloat16 on {device.type} "
                        f"(ops: {ops.active_implementation(device)})")
    for variant in args.variants:
        print(f"gpu_check_head: {variant} ...", file=sys.stderr, flush=True)
        found, found_problems = check_variant(variant, SHAPES[args.shape], device, args.iters, args.warmup)
        figures.update(found)
        problems += found_problems
    replace_file(args.json, lambda tmp: Path(tmp).write_text(json.dumps({**figures, "problems": problems}, indent=1)))
    for key, value in figures.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    for problem in problems:
        print(f"gpu_check_head: FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
