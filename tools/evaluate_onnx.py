#!/usr/bin/env python
"""Evaluate an exported ONNX model on a registered dataset with structtoken_runtime, as --eval-only does.

    python tools/evaluate_onnx.py --model shapes.onnx              # DATASETS.TEST, TEST.AUG.ENABLED of its config
    python tools/evaluate_onnx.py --model shapes.onnx --no-tta --threads 2         # single scale
    python tools/evaluate_onnx.py --model shapes_int8.onnx --tta --dataset shapes_sem_seg_val --num 50

The network runs in onnxruntime; the protocol around it (test resize, sliding windows, multi-scale +
flip, softmax averaging) is structtoken_runtime's, with the settings the file's metadata holds. Images
and labels are read and scored as tools/train_net.py --eval-only reads and scores them (the project's
dataset registry and SemSegEvaluator), and the metrics printed as Detectron2's `copypaste:` lines.
"""
import argparse
import os
import sys
import time
from collections import OrderedDict

import structtoken_d2  # noqa: F401  (compat shims and dataset registrations)
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog
from detectron2.evaluation.testing import print_csv_format
from detectron2.utils.logger import setup_logger
from structtoken_d2 import add_structtoken_config
from structtoken_d2.data import read_image_file
from structtoken_d2.data.datasets import register_folder_datasets_from_config
from structtoken_d2.engine.dataset_checks import check_datasets
from structtoken_d2.engine.user_errors import exit_on_user_error
from structtoken_d2.evaluation import SemSegEvaluator
from structtoken_runtime import RuntimeModelError, StructTokenONNX


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="F.onnx", help="a file written by tools/export_model.py")
    parser.add_argument("--dataset", default=None, help="a registered dataset (default: DATASETS.TEST of its config)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="multi-scale + flip (default: TEST.AUG.ENABLED of its config)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    parser.add_argument("--num", type=int, default=0, help="evaluate the first N images only (0: all)")
    parser.add_argument("--output-dir", default=None, help="write the per-class JSON / CSV tables here")
    return parser


def exported_config(model: StructTokenONNX):
    """The config stored in the export's metadata, over this version's defaults (for the datasets)."""
    cfg = add_structtoken_config(get_cfg())
    cfg.set_new_allowed(True)  # a key of another version of the project is carried, not refused
    cfg.merge_from_other_cfg(CfgNode.load_cfg(model.metadata["config"]))
    return cfg


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    if not os.path.isfile(args.model):
        raise RuntimeModelError(f"--model {args.model}: no such file (write one with tools/export_model.py)")
    setup_logger(name="detectron2", abbrev_name="d2")
    setup_logger(name="structtoken_d2")
    model = StructTokenONNX(args.model, threads=args.threads)
    cfg = exported_config(model)
    register_folder_datasets_from_config(cfg)
    datasets = [args.dataset] if args.dataset else list(cfg.DATASETS.TEST)
    check_datasets(cfg, datasets)
    tta = model.metadata["aug_enabled"] if args.tta is None else args.tta
    how = (f"multi-scale {list(model.protocol.ratios)} + flip={model.protocol.flip}" if tta else "single scale") + \
        f", TEST.MODE {model.protocol.mode}" + (f" (quantization: {model.metadata['quantization']})"
                                              if model.metadata["quantization"] else "")
    results = OrderedDict()
    for name in datasets:
        records = DatasetCatalog.get(name)
        records = records[: args.num] if args.num > 0 else records
        evaluator = SemSegEvaluator(name, distributed=False, output_dir=args.output_dir)
        evaluator.reset()
        print(f"Evaluating {args.model} on {len(records)} images of {name}: {how}", flush=True)
        start = time.perf_counter()
        for i, record in enumerate(records):
            image = read_image_file(record["file_name"], format=model.input_format)
            scores = model.predict(image, image_format=model.input_format, tta=tta)
            evaluator.process([record], [{"sem_seg": torch.from_numpy(scores)}])
            if (i + 1) % 50 == 0 or i + 1 == len(records):
                elapsed = time.perf_counter() - start
                print(f"  {i + 1}/{len(records)} images, {(i + 1) / elapsed:.2f} images/s", flush=True)
        results[f"{name}_TTA" if tta else name] = evaluator.evaluate()
        print(f"Evaluation results for {name}{' with test-time augmentation' if tta else ''} in csv format:",
              flush=True)
        print_csv_format(results[f"{name}_TTA" if tta else name])
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
