#!/usr/bin/env python
"""Compare runtimes of one model in one interleaved run: PyTorch eager, MODEL.COMPILE, onnxruntime fp32 and int8.

    python tools/benchmark_runtimes.py --config-file configs/synthetic/structtoken_shapes.yaml --threads 1,2 \\
        --int8 dynamic,static MODEL.WEIGHTS output/structtoken_shapes/model_final.pth
    python tools/benchmark_runtimes.py --config-file configs/ade20k/structtoken_cse_vit_t_512.yaml \\
        --image-size 512x512 --threads 1,2 --iters 5 --no-compile        # random weights: speed only
    python tools/benchmark_runtimes.py --config-file ... --scenario evaluation --image-size 96x160 MODEL.WEIGHTS ...

The model (MODEL.WEIGHTS, or random weights when unset) is exported to ONNX in a temporary folder
(checked against PyTorch as tools/export_model.py does) and quantized to int8 as asked (static: on
--calibration-images of the training set). Scenarios: `network`, a batch of --batch images of
--image-size through the network (what the ONNX file is: normalisation, ViT, head, logits resize);
`evaluation`, one image of --image-size through the single-scale evaluation (test resize, TEST.MODE
windows, resize back; structtoken_runtime vs the PyTorch segmentor); `multi-scale+flip`, the same with
TEST.AUG.RATIOS and TEST.AUG.FLIP (SemanticSegmentorWithTTA in PyTorch). Each thread count is one
interleaved run: a call of every runtime per round. Memory: the peak RSS (Linux VmHWM) of a fresh
process per runtime that imports what it needs (onnxruntime: structtoken_runtime alone, no torch),
loads the model and makes one call, with 1 thread. See docs/benchmarks.md.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from typing import Callable, Dict, List

import numpy as np

import structtoken_d2  # noqa: F401  (compat shims and registrations, before detectron2 submodules)
import torch
from detectron2.modeling import build_model
from structtoken_d2.config_loading import load_config
from structtoken_d2.data.datasets import register_folder_datasets_from_config
from structtoken_d2.engine import load_trained_model
from structtoken_d2.engine.user_errors import exit_on_user_error
from structtoken_d2.export import DEFAULT_OPSET, ExportError, class_names_of, export_onnx, fixed_image_size
from structtoken_d2.modeling import StructTokenCheckpointer
from structtoken_d2.modeling.test_time_augmentation import SemanticSegmentorWithTTA
from structtoken_d2.ops.timing import interleaved_times
from structtoken_runtime import StructTokenONNX

SCENARIOS = ("network", "evaluation", "multi-scale+flip")


def thread_counts(text: str) -> List[int]:
    try:
        counts = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected thread counts such as 1,2") from None
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: thread counts must be >= 1")
    return counts


def int8_modes(text: str) -> List[str]:
    modes = [] if text == "none" else text.split(",")
    if any(mode not in ("dynamic", "static") for mode in modes):
        raise argparse.ArgumentTypeError(f"{text!r}: expected dynamic, static, dynamic,static or none")
    return modes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--scenario", choices=SCENARIOS, default="network")
    parser.add_argument("--image-size", default=None, metavar="HxW",
                        help="image size (default: TEST.SLIDE_CROP_SIZE, one sliding window)")
    parser.add_argument("--batch", type=int, default=1, help="images per network call (scenario network)")
    parser.add_argument("--threads", type=thread_counts, default=[1], metavar="N[,N...]",
                        help="thread counts, one interleaved run each (default 1)")
    parser.add_argument("--int8", type=int8_modes, default=["dynamic"], metavar="MODE[,MODE]",
                        help="int8 models to time: dynamic, static (calibrated on the training set), both "
                             "(dynamic,static) or none (default dynamic)")
    parser.add_argument("--calibration-images", type=int, default=32, help="training images calibrating static int8")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--no-compile", action="store_true", help="leave out MODEL.COMPILE")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes (a process per runtime)")
    parser.add_argument("--iters", type=int, default=20, help="timed rounds per thread count")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (torch.compile compiles here)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ... (MODEL.WEIGHTS)")
    return parser


def say(line: str) -> None:
    print(f"[benchmark] {line}", flush=True)


def load_models(cfg, compile_model: bool) -> Dict[str, torch.nn.Module]:
    """The eager segmentor (MODEL.WEIGHTS, or random weights when unset) and, with ``compile_model``,
    the same weights with MODEL.COMPILE."""
    if cfg.MODEL.WEIGHTS:
        eager = load_trained_model(cfg)
    else:
        say("MODEL.WEIGHTS is unset: random weights (speed only)")
        torch.manual_seed(0)
        eager = build_model(cfg).eval()
    models = {"pytorch eager": eager}
    if compile_model:
        compiled_cfg = cfg.clone()
        compiled_cfg.defrost()
        compiled_cfg.MODEL.COMPILE = True
        compiled = build_model(compiled_cfg).eval()
        compiled.load_state_dict(eager.state_dict())
        models["pytorch MODEL.COMPILE"] = compiled
    return models


#: Run in a fresh process by :func:`process_peak_mib`: imports what one runtime needs (onnxruntime: the
#: runtime package alone, no torch), loads the model, makes one call, prints the process's peak RSS (VmHWM).
PROBE = r"""
import sys
import numpy as np
kind, model, scenario, shape = sys.argv[1:5]
dims = tuple(int(v) for v in shape.split("x"))
images = np.random.default_rng(0).integers(0, 256, dims, dtype=np.uint8)
hwc = np.ascontiguousarray(images[0].transpose(1, 2, 0))
if kind == "onnxruntime":
    from structtoken_runtime import StructTokenONNX
    session = StructTokenONNX(model, threads=1)
    if scenario == "network":
        session.network(images)
    else:
        session.predict(hwc, image_format=session.input_format, tta=scenario == "multi-scale+flip")
else:
    import structtoken_d2
    import torch
    from structtoken_d2.config_loading import load_config
    from structtoken_d2.engine import load_trained_model
    from structtoken_d2.modeling.test_time_augmentation import SemanticSegmentorWithTTA
    torch.set_num_threads(1)
    cfg = load_config(model, ["MODEL.COMPILE", str(kind == "compile")])
    segmentor = load_trained_model(cfg)
    tensor = torch.from_numpy(images)
    with torch.no_grad():
        if scenario == "network":
            segmentor.resize_logits(segmentor.decode(segmentor.normalize(tensor)), tensor.shape[-2:])
        else:
            ratios = None if scenario == "multi-scale+flip" else [1.0]
            flip = None if scenario == "multi-scale+flip" else False
            SemanticSegmentorWithTTA(cfg, segmentor, ratios=ratios, flip=flip)(
                [{"image": tensor[0], "height": dims[2], "width": dims[3]}])
with open("/proc/self/status") as f:
    print(next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024)
"""


def process_peak_mib(kind: str, model: str, scenario: str, shape) -> float:
    """Peak RSS (MiB) of a fresh process that runs one call of ``kind`` ("onnxruntime" on the file
    ``model``; "eager" / "compile" on the config file ``model``); NaN where it cannot be read."""
    result = subprocess.run([sys.executable, "-c", PROBE, kind, model, scenario, "x".join(map(str, shape))],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        return float(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        say(f"memory of {kind}: the probe process failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
        return float("nan")


def memory_probes(cfg, eager, work: str, files: Dict[str, str], scenario: str, shape, compiled: bool
                  ) -> Dict[str, float]:
    """:func:`process_peak_mib` of every runtime (PyTorch: ``eager``'s weights saved to ``work``)."""
    StructTokenCheckpointer(eager, save_dir=work).save("weights")
    probe_cfg = cfg.clone()
    probe_cfg.defrost()
    probe_cfg.MODEL.WEIGHTS = os.path.join(work, "weights.pth")
    config = os.path.join(work, "config.yaml")
    with open(config, "w") as f:
        f.write(probe_cfg.dump())
    peaks = {"pytorch eager": process_peak_mib("eager", config, scenario, shape)}
    if compiled:
        peaks["pytorch MODEL.COMPILE"] = process_peak_mib("compile", config, scenario, shape)
    for name, path in files.items():
        peaks[name] = process_peak_mib("onnxruntime", path, scenario, shape)
    return peaks


def export_models(cfg, eager, work: str, opset: int, int8: List[str], calibration_images: int) -> Dict[str, str]:
    """ONNX files in ``work``: fp32 (checked against ``eager``) and the int8 versions asked for."""
    from structtoken_d2.export.onnx_quantization import calibration_windows, quantize_onnx

    files = {"onnxruntime fp32": os.path.join(work, "fp32.onnx")}
    export_onnx(eager, cfg, files["onnxruntime fp32"], class_names=class_names_of(cfg), opset=opset, progress=say)
    for mode in int8:
        calibration = calibration_windows(cfg, calibration_images) if mode == "static" else None
        files[f"onnxruntime int8 {mode}"] = os.path.join(work, f"int8_{mode}.onnx")
        quantize_onnx(files["onnxruntime fp32"], files[f"onnxruntime int8 {mode}"], mode, calibration, progress=say)
    return files


def calls(scenario: str, cfg, models, sessions, images: np.ndarray) -> Dict[str, Callable[[], object]]:
    """One call per runtime: the network on ``images [B, 3, H, W]``, or the evaluation (single-scale, or
    multi-scale + flip) of ``images[0]``."""
    tensor = torch.from_numpy(images)
    inputs = [{"image": tensor[0], "height": images.shape[2], "width": images.shape[3]}]
    hwc = np.ascontiguousarray(images[0].transpose(1, 2, 0))
    fns = {}
    for name, model in models.items():
        if scenario == "network":
            def run(model=model):
                with torch.no_grad():
                    return model.resize_logits(model.decode(model.normalize(tensor)), tensor.shape[-2:])
        else:
            tta = (SemanticSegmentorWithTTA(cfg, model) if scenario == "multi-scale+flip"
                   else SemanticSegmentorWithTTA(cfg, model, ratios=[1.0], flip=False))

            def run(tta=tta):
                return tta(inputs)
        fns[name] = run
    for name, session in sessions.items():
        if scenario == "network":
            fns[name] = lambda session=session: session.network(images)
        else:
            fns[name] = lambda session=session: session.predict(hwc, image_format=session.input_format,
                                                                tta=scenario == "multi-scale+flip")
    return fns


def markdown(rows: List[Dict]) -> str:
    head = ["threads", "runtime", "median s/call", "IQR (s)", "images/s", "vs eager",
            "peak RSS of a process making one call (MiB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['runtime']} | {r['median']:.4g} | {r['p25']:.4g}-{r['p75']:.4g} | "
                     f"{r['images_per_s']:.3g} | {r['speedup']:.2f}x | {r['peak_mib']:.0f} |")
    return "\n".join(lines)


@exit_on_user_error
def main(argv=None) -> List[Dict]:
    args = build_parser().parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.batch < 1:
        raise ExportError("--iters and --batch must be >= 1 and --warmup >= 0")
    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE, cfg.MODEL.VIT.WEIGHTS, cfg.MODEL.COMPILE = "cpu", "", False
    cfg.freeze()
    register_folder_datasets_from_config(cfg)
    size = fixed_image_size(args.image_size) if args.image_size else tuple(cfg.TEST.SLIDE_CROP_SIZE)
    batch = args.batch if args.scenario == "network" else 1
    images = np.random.default_rng(0).integers(0, 256, (batch, 3) + tuple(size), dtype=np.uint8)
    models = load_models(cfg, not args.no_compile)
    rows = []
    with tempfile.TemporaryDirectory(prefix="structtoken_bench_") as work:
        files = export_models(cfg, models["pytorch eager"], work, args.opset, args.int8,
                              args.calibration_images)
        for threads in args.threads:
            torch.set_num_threads(threads)
            # onnxruntime's idle threads do not spin: spinning, they take the cores from PyTorch's next call
            sessions = {name: StructTokenONNX(path, threads=threads, spinning=False) for name, path in files.items()}
            fns = calls(args.scenario, cfg, models, sessions, images)
            say(f"{threads} thread(s): {args.scenario} on {batch}x3x{size[0]}x{size[1]}, {args.warmup} warm-up and "
                f"{args.iters} timed rounds of {', '.join(fns)}")

            def progress(timed, i, times):
                if timed and (i + 1) % max(1, args.iters // 5) == 0:
                    say(f"  round {i + 1}/{args.iters}: " + ", ".join(
                        f"{n} {statistics.median(t.wall):.4g}s" for n, t in times.items()))

            times = interleaved_times(fns, torch.device("cpu"), args.iters, args.warmup, progress)
            eager = statistics.median(times["pytorch eager"].wall)
            for name, t in times.items():
                quartiles = statistics.quantiles(t.wall, n=4) if len(t.wall) > 1 else [t.wall[0]] * 3
                median = statistics.median(t.wall)
                rows.append(dict(threads=threads, runtime=name, median=median, p25=quartiles[0], p75=quartiles[2],
                                 images_per_s=batch / median, speedup=eager / median))
            del sessions
        if not args.no_memory:
            say("memory: one fresh process per runtime, loading it and making one call")
            peaks = memory_probes(cfg, models["pytorch eager"], work, files, args.scenario, images.shape,
                                  "pytorch MODEL.COMPILE" in models)
            for row in rows:
                row["peak_mib"] = peaks[row["runtime"]]
        else:
            for row in rows:
                row["peak_mib"] = float("nan")
    load_avg = os.getloadavg() if hasattr(os, "getloadavg") else None
    command = " ".join([os.path.basename(sys.argv[0])] + list(argv or sys.argv[1:]))
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print(f"\n{args.scenario}, {batch}x3x{size[0]}x{size[1]}, {date}, "
          f"load average {load_avg}, torch {torch.__version__}, command: {command}")
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
