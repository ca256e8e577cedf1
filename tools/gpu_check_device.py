#!/usr/bin/env python
"""Describe the device that tools/gpu_checks.sh runs on: GPU, compute capability, roofline peaks, active ops.

    python tools/gpu_check_device.py --json gpu_out/device.json
    python tools/gpu_check_device.py --json gpu_out/build.json --require-compiled-ops   # after the build

Writes a flat JSON object: the device's name, its compute capability and the ``TORCH_CUDA_ARCH_LIST``
that builds for it alone (``9.0`` on an H100 or H200), memory and multiprocessors, the peak memory
bandwidth (from the driver's memory clock and bus width where it reports them, else the datasheet
table of ``structtoken_d2/ops/timing.py``) and dense bfloat16 TFLOP/s (that table), the torch and
CUDA versions, and which ``structtoken_d2.ops`` implementation runs on the device. Without a GPU it
describes the CPU. ``--require-compiled-ops``: exit 1 when the ops on the device are not the compiled
kernels.
"""
import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone

import torch


def describe(device: torch.device) -> dict:
    """The flat description (see the module's docstring) of ``device``."""
    from structtoken_d2 import ops
    from structtoken_d2.ops.timing import PEAK_GBPS, device_label, device_roofline

    info = {"device": device_label(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "ops": ops.active_implementation(device), "extension_error": None if ops.EXTENSION_ERROR is None
            else str(ops.EXTENSION_ERROR)}
    if device.type != "cuda":
        return info
    props = torch.cuda.get_device_properties(device)
    roofline = device_roofline(device, torch.bfloat16)
    from_driver = bool(getattr(props, "memory_clock_rate", 0) and getattr(props, "memory_bus_width", 0))
    listed = any(key in props.name for key in PEAK_GBPS)
    info.update(
        compute_capability=f"{props.major}.{props.minor}", torch_cuda_arch_list=f"{props.major}.{props.minor}",
        memory_gib=props.total_memory / 2 ** 30, multiprocessors=props.multi_processor_count,
        peak_gbps=roofline.gbps, peak_tflops_bf16=roofline.tflops,
        peak_source="bandwidth from the driver" if from_driver else
        ("datasheet table" if listed else "unknown device: no roofline"))
    return info


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, metavar="FILE", help="write the description here (replaced)")
    parser.add_argument("--require-compiled-ops", action="store_true",
                        help="exit 1 when the structtoken_d2 ops on the device are not the compiled kernels")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = describe(device)
    tmp = f"{args.json}.partial"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, args.json)
    print(" ".join(f"{k}={v}" for k, v in info.items() if v is not None))
    if args.require_compiled_ops and info["ops"] != f"compiled-{device.type}":
        sys.exit(f"gpu_check_device: the ops on {device.type} are {info['ops']!r}, not the compiled kernels "
                 f"({info['extension_error'] or 'extension built without them'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
