#!/usr/bin/env python
"""Time what a user waits for, a training iteration and the evaluation, for any config.

On random inputs (no dataset), with the compiled ops and with ``STRUCTTOKEN_D2_FORCE_PYTORCH_OPS=1`` (and
compiled vs eager with ``--compile``), calls interleaved in one run so that the ratios are fair on a
noisy machine. A progress line per round; a table at the end. See docs/benchmarks.md.

    python tools/benchmark_model.py --config-file configs/synthetic/structtoken_shapes.yaml --mode train --compile
    python tools/benchmark_model.py --config-file configs/ade20k/structtoken_cse_vit_t_512.yaml --mode infer \\
        --image-sizes 512x683 683x512 512x512 --vary TEST.SLIDE_BATCH "1 4 8" --ops kernels
    python tools/benchmark_model.py --config-file ... --json bench.json SOLVER.IMS_PER_BATCH 4

Trailing ``KEY VALUE`` pairs override the config, as with ``tools/train_net.py``. On a shared CPU, fix
the threads (``OMP_NUM_THREADS=1``): the CPU-time columns are then the steadier figures.
"""
import argparse
import json
import os
import sys
from dataclasses import asdict
from typing import Tuple

import structtoken_d2  # noqa: F401  (compat shims and registrations, before detectron2 submodules)
import torch
from structtoken_d2 import ops
from structtoken_d2.config_loading import load_config, use_cpu_without_gpu
from structtoken_d2.engine.model_benchmark import (
    INFERENCE_SCENARIOS, OPS_IMPLEMENTATIONS, ModelBenchmark, markdown_table, run_metadata, training_crop_size,
    variants,
)
from structtoken_d2.engine.user_errors import exit_on_user_error
from structtoken_d2.output_files import replace_file


def image_size(text: str) -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size {text!r}: expected HEIGHTxWIDTH, e.g. 512x683")
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"image size {text!r}: sides must be positive")
    return h, w


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--mode", choices=("train", "infer", "both"), default="both")
    parser.add_argument("--compile", action="store_true",
                        help="time each variant eager and with MODEL.COMPILE True (the same as --vary MODEL.COMPILE "
                             "False True)")
    parser.add_argument("--ops", nargs="+", choices=sorted(OPS_IMPLEMENTATIONS), default=["kernels", "pytorch"],
                        help="ops implementations to time: the compiled kernels and/or the PyTorch reference")
    parser.add_argument("--vary", nargs=2, action="append", default=[], metavar=("KEY", "'V1 V2 ...'"),
                        help="time the model with each of the space-separated values of the config KEY "
                             "(repeatable: every combination)")
    parser.add_argument("--inference", nargs="+", choices=sorted(INFERENCE_SCENARIOS),
                        default=list(INFERENCE_SCENARIOS),
                        help="inference scenarios (default both)")
    parser.add_argument("--image-sizes", nargs="+", type=image_size, default=None, metavar="HxW",
                        help="inference images, evaluated one at a time per call (default: one of the "
                             "training crop size)")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default SOLVER.IMS_PER_BATCH)")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant first (compilation)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the extra call per variant that measures its peak memory")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the run's metadata and rows here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    if args.json and os.path.exists(args.json) and not args.overwrite:
        parser.error(f"--json {args.json} exists; give another file or --overwrite")
    return args


@exit_on_user_error
def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    use_cpu_without_gpu(cfg)
    cfg.freeze()
    device = torch.device(cfg.MODEL.DEVICE)
    ops_names = list(dict.fromkeys(args.ops))
    if "kernels" in ops_names and device.type not in ops.COMPILED_DEVICE_TYPES:
        print(f"benchmark_model: no compiled structtoken ops for {device.type}: 'kernels' runs the PyTorch "
              f"reference too ({ops.EXTENSION_ERROR or 'extension built without these kernels'})", file=sys.stderr)
    vary = [[key] + values.split() for key, values in args.vary]
    vary += [["MODEL.COMPILE", "False", "True"]] if args.compile else []
    try:
        variant_list = variants(ops_names, vary)
    except ValueError as e:
        sys.exit(f"benchmark_model: {e}")
    for variant in variant_list:  # every varied value is checked before the first model is built
        load_config(args.config_file, list(args.opts) + [item for pair in variant.overrides for item in pair])
    metadata = run_metadata(sys.argv if argv is None else ["tools/benchmark_model.py"] + list(argv), device)

    def progress(line):
        print(f"benchmark_model: {line}", file=sys.stderr, flush=True)

    bench = ModelBenchmark(cfg, variant_list, args.iters, args.warmup, progress, memory=not args.no_memory)
    modes = ("train", "infer") if args.mode == "both" else (args.mode,)
    sizes = args.image_sizes or [training_crop_size(cfg)]
    rows = bench.run(modes, args.batch or cfg.SOLVER.IMS_PER_BATCH, sizes, args.inference)
    metadata["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    table = markdown_table(rows)
    print(f"\nDevice: {metadata['device']}, ops: {metadata['ops']}, torch {metadata['torch']}, "
          f"{metadata['date']}, load average before {metadata['load_average_1_5_15min']}, "
          f"after {metadata['load_average_after']}\n")
    print(table)
    if args.json:
        def write(tmp):
            with open(tmp, "w") as f:
                json.dump({**metadata, "rows": [asdict(r) for r in rows]}, f, indent=1)
        replace_file(args.json, write)
        print(f"benchmark_model: wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
