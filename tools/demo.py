#!/usr/bin/env python
"""Predict with a trained StructToken model and save colourised predictions.

    # images of a registered dataset, saved as image | ground truth | prediction:
    python tools/demo.py --config-file configs/synthetic/structtoken_shapes.yaml --dataset shapes_sem_seg_val \\
        --num 8 --output output/demo MODEL.WEIGHTS output/structtoken_shapes/model_final.pth
    # any images, saved as image | prediction:
    python tools/demo.py --config-file CFG --input a.jpg b.jpg --output output/demo MODEL.WEIGHTS model.pth

Each panel is saved as ``<output>/<image name>_pred.png``; a name already taken (an input, an
earlier output, another input of the same name) gets ``_1``, ``_2``, ...: no file is ever
overwritten. Predictions are :class:`StructTokenPredictor`'s (the evaluation's); ``--tta`` adds
multi-scale + flip test-time augmentation (TEST.AUG.*; without it, none, whatever TEST.AUG.ENABLED).
"""
import argparse
import os
import sys

import cv2

import structtoken_d2  # noqa: F401  (compat shims and registrations, before detectron2 submodules)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger
from structtoken_d2.config_loading import load_config, move_swallowed_overrides, use_cpu_without_gpu
from structtoken_d2.data import read_image_file, read_sem_seg_label
from structtoken_d2.data.datasets import register_folder_datasets_from_config
from structtoken_d2.engine import StructTokenPredictor
from structtoken_d2.engine.dataset_checks import check_datasets
from structtoken_d2.engine.user_errors import exit_on_user_error
from structtoken_d2.evaluation import prediction_panel
from structtoken_d2.output_files import save_new_file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files")
    source.add_argument("--dataset", help="a registered dataset, e.g. shapes_sem_seg_val")
    parser.add_argument("--num", type=int, default=8, help="images of --dataset to predict (default 8)")
    parser.add_argument("--output", required=True, help="directory for the <image name>_pred.png panels")
    parser.add_argument("--tta", action="store_true", help="multi-scale + flip test-time augmentation")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    return parser


def parse_args(argv=None):
    return move_swallowed_overrides(build_parser().parse_args(argv), "input")


def write_png(path: str, image_bgr) -> None:
    if not cv2.imwrite(path, image_bgr):
        raise OSError(f"{path}: cv2.imwrite failed")


@exit_on_user_error
def main():
    args = parse_args()
    cfg = load_config(args.config_file, args.opts)
    use_cpu_without_gpu(cfg)
    cfg.TEST.AUG.ENABLED = args.tta  # the predictor's test-time augmentation: --tta's, not the config's
    cfg.freeze()
    for name in ("detectron2", "structtoken_d2"):
        setup_logger(name=name)
    register_folder_datasets_from_config(cfg)  # DATASETS.FOLDER datasets: their classes name the colours
    if args.dataset:
        check_datasets(cfg, [args.dataset])  # registered, on disk, K classes: before building the model
        records = DatasetCatalog.get(args.dataset)[: args.num]
        if not records:
            sys.exit(f"Dataset '{args.dataset}' has no images")
        meta = MetadataCatalog.get(args.dataset)
    else:
        records = [{"file_name": path} for path in args.input]
        if not cfg.DATASETS.TEST:
            sys.exit("DATASETS.TEST is empty: name the dataset whose classes and colours to use")
        meta = MetadataCatalog.get(cfg.DATASETS.TEST[0])

    predictor = StructTokenPredictor(cfg)
    num_classes = len(meta.stuff_classes)
    for record in records:
        image = read_image_file(record["file_name"], format="RGB")
        pred = predictor(image[:, :, ::-1])["sem_seg"].argmax(0).cpu().numpy()
        gt = read_sem_seg_label(record, num_classes) if "sem_seg_file_name" in record else None
        panel = prediction_panel(image, pred, meta.stuff_colors, gt, meta.stuff_classes)[:, :, ::-1]
        stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
        path = save_new_file(os.path.join(args.output, f"{stem}_pred.png"), lambda tmp: write_png(tmp, panel))
        print(f"{record['file_name']} -> {path}")
    print(f"Saved {len(records)} prediction panels to {args.output}")


if __name__ == "__main__":
    main()
