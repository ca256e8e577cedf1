#!/usr/bin/env python
"""Train the main job for a few iterations in several ways (ops, launcher) and check its loss and speed.

    python tools/gpu_check_train.py --output gpu_out/train_amp --json gpu_out/train_amp.json
    python tools/gpu_check_train.py --runs torchrun --iters 20 --output gpu_out/launch --json gpu_out/launch.json \\
        TEST.EVAL_AFTER_TRAIN True TEST.AUG.ENABLED False
    python tools/gpu_check_train.py --tiny --iters 3 --output out/train --json out/train.json   # dry run, CPU

Each run is one ``tools/train_net.py`` process of ``--config-file`` (the main job's by default) for
``--iters`` iterations under AMP (``--amp``, bfloat16 by default), with no evaluation and no periodic
checkpoint unless trailing ``KEY VALUE`` overrides ask for them; its OUTPUT_DIR is ``--output/<run>``,
its output in ``--output/<run>.out``. Runs: ``kernels`` (``--num-gpus 1``, the compiled ops),
``pytorch-ops`` (the same with ``MODEL.STRUCTTOKEN.FORCE_PYTORCH_OPS True``) and ``torchrun`` (one
process started by ``torchrun --standalone``: the NCCL process group on a GPU, gloo without one).
From each run's ``metrics.json`` (Detectron2 writes it every 20 iterations and at the end, each loss a
median over the last 20): the first and last total loss, whether all are finite and the last is
below the first, s/it (the last median iteration time) and data s/it; the mIoU if it evaluated; from
its output, which ops ran and the process-group backend. ``--tiny``: a 32-wide model on 32x32 crops
of a 10-image folder dataset of rectangles written into ``--output`` (seconds on a CPU). Writes the key
figures as a flat JSON object (``problems``: why it failed); exit status 1 when a check fails.
"""
import argparse
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

from structtoken_d2.output_files import replace_file

REPO = Path(__file__).resolve().parents[1]
MAIN_JOB = "configs/synthetic/structtoken_shapes.yaml"
#: run name -> (launcher, forces the PyTorch ops)
RUNS = {"kernels": ("plain", False), "pytorch-ops": ("plain", True), "torchrun": ("torchrun", False)}
TINY_OVERRIDES = [
    "MODEL.VIT.EMBED_DIM", "32", "MODEL.VIT.DEPTH", "1", "MODEL.VIT.NUM_HEADS", "2", "MODEL.VIT.IMG_SIZE", "[32, 32]",
    "MODEL.STRUCTTOKEN.NUM_BLOCKS", "1", "MODEL.STRUCTTOKEN.TOKEN_SIZE", "[2, 2]", "INPUT.CROP.SIZE", "[32, 32]",
    "INPUT.RESIZE_SCALE", "[32, 32]", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
    "DATALOADER.NUM_WORKERS", "0", "TEST.SLIDE_CROP_SIZE", "[32, 32]", "TEST.SLIDE_STRIDE", "[21, 21]",
    "TEST.SCALE", "[32, 32]", "INPUT.MIN_SIZE_TEST", "32", "INPUT.MAX_SIZE_TEST", "32", "TEST.PREDICTION_IMAGES", "0",
]
OPS_LINE = re.compile(r"structtoken_d2\.ops on (\w+): (.+?)\s*$", re.MULTILINE)
BACKEND_LINE = re.compile(r"Started by torchrun: \d+ processes \((\w+) backend\)")


def write_tiny_dataset(root: Path, num_classes: int, train: int = 8, val: int = 2, size: int = 32) -> List[str]:
    """A folder dataset under ``root``: ``size`` x ``size`` images of a noisy background (class 0) with a
    rectangle of class ``1 + i % (num_classes - 1)`` in its own colour; the config overrides that train
    and evaluate on it."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for kind in ("images", "labels"):
            (root / kind / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            cls = 1 + i % (num_classes - 1)
            y0, x0 = rng.integers(0, size // 2, 2)
            label = np.zeros((size, size), np.uint8)
            label[y0:y0 + size // 2, x0:x0 + size // 3] = cls
            image = rng.normal(90, 20, (size, size, 3)).clip(0, 255).astype(np.uint8)
            image[label == cls] = (40 * cls % 256, 255 - 40 * cls, 120)
            cv2.imwrite(str(root / "images" / split / f"{i}.png"), image)
            cv2.imwrite(str(root / "labels" / split / f"{i}.png"), label)
    classes = ["background"] + [f"class{c}" for c in range(1, num_classes)]
    return ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(num_classes), "DATASETS.FOLDER.ROOT", str(root),
            "DATASETS.FOLDER.CLASSES", repr(classes), "DATASETS.TRAIN", "('folder_train',)",
            "DATASETS.TEST", "('folder_val',)"]


def run_command(run: str, config_file: str, overrides: List[str]) -> List[str]:
    launcher, forced = RUNS[run]
    tool = [str(REPO / "tools" / "train_net.py"), "--config-file", config_file]
    overrides = overrides + ["MODEL.STRUCTTOKEN.FORCE_PYTORCH_OPS", str(forced)]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *tool,
                *overrides]
    return [sys.executable, *tool, "--num-gpus", "1", *overrides]


def metrics_figures(path: Path) -> Tuple[Dict, List[str]]:
    """Loss and time figures of a run's ``metrics.json`` and the problems they show."""
    if not path.exists():
        return {}, [f"no {path}"]
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    if not losses:
        return {}, [f"no total_loss in {path}"]
    timed = [r for r in records if "time" in r]
    figures = {"loss first": losses[0], "loss last": losses[-1], "losses logged": len(losses),
               "loss finite": all(math.isfinite(v) for v in losses),
               "loss decreasing": losses[-1] < losses[0] if len(losses) > 1 else None}
    if timed:
        figures["s/it"] = timed[-1]["time"]
        figures["data s/it"] = timed[-1].get("data_time")
    miou = [r["sem_seg/mIoU"] for r in records if "sem_seg/mIoU" in r]
    if miou:
        figures["mIoU"] = miou[-1]
    return figures, [] if figures["loss finite"] else [f"a non-finite loss in {path}"]


def check_run(run: str, figures: Dict, output: str, args) -> List[str]:
    """Problems of a finished run beyond its metrics: decrease, ops and backend where required."""
    problems = []
    if args.require_decrease and figures.get("loss decreasing") is not True:
        problems.append(f"{run}: the loss did not decrease ({figures.get('loss first')} -> {figures.get('loss last')})")
    ops_lines = OPS_LINE.findall(output)
    if ops_lines:
        figures["ops"] = ops_lines[-1][1]
    if args.require_kernels and not RUNS[run][1] and not figures.get("ops", "").startswith("compiled-cuda"):
        problems.append(f"{run}: the ops were {figures.get('ops')!r}, not compiled-cuda")
    backend = BACKEND_LINE.search(output)
    if RUNS[run][0] == "torchrun":
        figures["backend"] = backend.group(1) if backend else None
        if args.require_backend and figures["backend"] != args.require_backend:
            problems.append(f"{run}: process-group backend {figures['backend']!r}, not {args.require_backend}")
    return problems


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=str(REPO / MAIN_JOB), metavar="FILE",
                        help="default: the main job's, configs/synthetic/structtoken_shapes.yaml")
    parser.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=["kernels", "pytorch-ops"])
    parser.add_argument("--iters", type=int, default=50, help="SOLVER.MAX_ITER of each run")
    parser.add_argument("--amp", choices=("bfloat16", "float16", "off"), default="bfloat16")
    parser.add_argument("--output", required=True, metavar="DIR", help="runs go to DIR/<run> (must not exist yet)")
    parser.add_argument("--json", required=True, metavar="FILE", help="write the key figures here (replaced)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on a tiny generated dataset (dry run)")
    parser.add_argument("--print-commands", action="store_true",
                        help="print each run's command and exit, writing nothing (checks the arguments)")
    parser.add_argument("--require-decrease", action="store_true", help="fail unless every run's loss decreased")
    parser.add_argument("--require-kernels", action="store_true",
                        help="fail unless the runs that use the kernels ran the compiled CUDA kernels")
    parser.add_argument("--require-backend", default=None, metavar="NAME",
                        help="fail unless the torchrun run's process group used this backend (nccl)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ..., after the tool's own")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    output = Path(args.output).resolve()  # (train_net.py runs in the repository's root)
    config_file = str(Path(args.config_file).resolve())
    if output.exists() and not args.print_commands:
        sys.exit(f"gpu_check_train: --output {output} exists; give a new folder")
    overrides = ["SOLVER.MAX_ITER", str(args.iters), "SOLVER.AMP.ENABLED", str(args.amp != "off"),
                 "TEST.EVAL_PERIOD", "0", "TEST.EVAL_AFTER_TRAIN", "False", "SOLVER.CHECKPOINT_PERIOD", "100000"]
    if args.amp != "off":
        overrides += ["SOLVER.AMP.DTYPE", args.amp]
    if args.tiny:
        overrides += TINY_OVERRIDES
        if not args.print_commands:
            overrides += write_tiny_dataset(output / "data", num_classes=3)
    commands = {run: run_command(run, config_file, overrides + list(args.opts) + ["OUTPUT_DIR", str(output / run)])
                for run in args.runs}
    for run, command in commands.items():
        print(f"gpu_check_train: {run}: {shlex.join(command)}", flush=True)
    if args.print_commands:
        return 0
    output.mkdir(parents=True, exist_ok=True)
    figures, problems = {"iterations": args.iters, "amp": args.amp}, []
    for run, command in commands.items():
        print(f"gpu_check_train: running {run} ...", flush=True)
        result = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        (output / f"{run}.out").write_text(result.stdout)
        if result.returncode != 0:
            print(result.stdout[-4000:], flush=True)
            problems.append(f"{run}: train_net.py exited with {result.returncode} (output: {output / run}.out)")
            continue
        found, found_problems = metrics_figures(output / run / "metrics.json")
        problems += found_problems + check_run(run, found, result.stdout, args)
        figures.update({f"{run}: {key}": value for key, value in found.items()})
    if "kernels: s/it" in figures and "pytorch-ops: s/it" in figures:
        figures["kernels speed-up over pytorch-ops"] = figures["pytorch-ops: s/it"] / figures["kernels: s/it"]
    replace_file(args.json, lambda tmp: Path(tmp).write_text(json.dumps({**figures, "problems": problems}, indent=1)))
    for key, value in figures.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    for problem in problems:
        print(f"gpu_check_train: FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
