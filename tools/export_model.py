#!/usr/bin/env python
"""Export a trained StructToken model to ONNX, checked against PyTorch, for structtoken_runtime.

    python tools/export_model.py --config-file configs/synthetic/structtoken_shapes.yaml --output shapes.onnx \\
        MODEL.WEIGHTS output/structtoken_shapes/model_final.pth
    python tools/export_model.py --config-file ... --output shapes_int8.onnx --int8 --calibration-images 32 \\
        MODEL.WEIGHTS output/structtoken_shapes/model_final.pth
    python tools/export_model.py --config-file ... --output fixed.onnx --image-size 512x512 --opset 17 MODEL.WEIGHTS ...

The graph is the network the evaluation runs on one window (TEST.MODE slide) or whole image: pixels
[B, 3, H, W] in INPUT.FORMAT -> normalisation -> ViT -> head -> logits [B, K, H, W] resized by the
TEST.LOGITS_RESIZE rule. Batch, height and width are dynamic (--dynamic, the default) unless
--image-size fixes height and width. The file's metadata carries the config, the class names and the
test settings, so structtoken_runtime (numpy, OpenCV, onnxruntime) evaluates it as --eval-only does.
Before the file is written: onnx.checker and one onnxruntime run compared with PyTorch. --int8 writes
an int8 model instead: dynamic quantization, or static with --calibration-images N > 0 images of the
training set. Nothing is written when a step fails, and never over an existing file.
"""
import argparse
import os
import sys
import tempfile

import structtoken_d2  # noqa: F401  (compat shims and registrations, before detectron2 submodules)
from structtoken_d2.config_loading import load_config
from structtoken_d2.data.datasets import register_folder_datasets_from_config
from structtoken_d2.engine import load_trained_model
from structtoken_d2.engine.dataset_checks import check_datasets
from structtoken_d2.engine.user_errors import exit_on_user_error
from structtoken_d2.export import (
    DEFAULT_OPSET, INPUT_DTYPES, ExportError, class_names_of, compare_with_pytorch, export_onnx, fixed_image_size,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", required=True, metavar="F.onnx", help="the ONNX file to write (must not exist)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--dynamic", action="store_true", help="any batch, height and width (the default)")
    shape.add_argument("--image-size", default=None, metavar="HxW", help="fix the input height and width")
    parser.add_argument("--input-dtype", choices=sorted(INPUT_DTYPES), default="uint8",
                        help="dtype of the input pixels (default uint8, what images are)")
    parser.add_argument("--int8", action="store_true",
                        help="write an int8 model: dynamic quantization, or static with --calibration-images N")
    parser.add_argument("--calibration-images", type=int, default=0, metavar="N",
                        help="with --int8: static quantization calibrated on N training images (0: dynamic)")
    parser.add_argument("--calibration-dataset", default=None, metavar="NAME",
                        help="dataset of the calibration images (default DATASETS.TRAIN[0])")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ... (MODEL.WEIGHTS)")
    return parser


def say(line: str) -> None:
    print(f"[export] {line}", flush=True)


@exit_on_user_error
def main(argv=None) -> str:
    args = build_parser().parse_args(argv)
    if os.path.lexists(args.output):
        raise ExportError(f"--output {args.output} exists; it is not replaced (give another file)")
    if args.calibration_images < 0 or (args.calibration_images and not args.int8):
        raise ExportError("--calibration-images N needs --int8 and N >= 0")
    image_size = fixed_image_size(args.image_size) if args.image_size else None
    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"  # exported and checked on the CPU
    cfg.MODEL.COMPILE = False  # the eager modules are exported
    cfg.MODEL.VIT.WEIGHTS = ""  # MODEL.WEIGHTS holds the whole model
    cfg.freeze()
    register_folder_datasets_from_config(cfg)
    if args.int8 and args.calibration_images:
        check_datasets(cfg, [args.calibration_dataset or cfg.DATASETS.TRAIN[0]])  # before building the model
    model = load_trained_model(cfg)
    say(f"loaded {cfg.MODEL.WEIGHTS} ({cfg.MODEL.STRUCTTOKEN.VARIANT}, {model.num_classes} classes)")
    class_names = class_names_of(cfg)
    if not args.int8:
        check = export_onnx(model, cfg, args.output, class_names=class_names, opset=args.opset,
                            image_size=image_size, input_dtype=args.input_dtype, progress=say)
        say(f"onnxruntime vs PyTorch on {check.batch} images of {check.size[0]}x{check.size[1]}: max |diff| "
            f"{check.max_abs_diff:.3g}, max |logit| {check.max_abs_logit:.3g}, relative {check.relative_diff:.2e}")
    else:
        from structtoken_d2.export.onnx_quantization import calibration_windows, quantize_onnx

        calibration = (calibration_windows(cfg, args.calibration_images, args.calibration_dataset)
                       if args.calibration_images else None)
        with tempfile.TemporaryDirectory(prefix="structtoken_export_") as work:
            fp32 = os.path.join(work, "fp32.onnx")
            export_onnx(model, cfg, fp32, class_names=class_names, opset=args.opset, image_size=image_size,
                        input_dtype=args.input_dtype, progress=say)
            note = quantize_onnx(fp32, args.output, "static" if calibration else "dynamic", calibration, progress=say)
        size = image_size or model.slide_crop_size
        check = compare_with_pytorch(args.output, model, 1, size, args.input_dtype)
        say(f"{note}; vs PyTorch on 1 image of {size[0]}x{size[1]}: max |diff| / max |logit| "
            f"{check.relative_diff:.3g} (int8 rounding; measure its mIoU with tools/evaluate_onnx.py)")
    say(f"wrote {args.output} ({os.path.getsize(args.output) / 2 ** 20:.1f} MiB); run it with structtoken_runtime "
        f"or tools/evaluate_onnx.py --model {args.output}")
    return args.output


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
