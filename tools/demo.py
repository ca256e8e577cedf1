#!/usr/bin/env python
"""Predict with a trained StructToken model and save colourised predictions.

    # images of a registered dataset, saved as image | ground truth | prediction:
    python tools/demo.py --config-file configs/synthetic/structtoken_shapes.yaml --dataset shapes_sem_seg_val \
        --num 8 --output output/demo MODEL.WEIGHTS output/structtoken_shapes/model_final.pth
    # any images, saved as image | prediction:
    python tools/demo.py --config-file CFG --input a.jpg b.jpg --output output/demo MODEL.WEIGHTS model.pth

``--tta`` predicts with multi-scale + flip test-time augmentation (TEST.AUG.*).
"""
import argparse
import os
import sys

import cv2
import torch

import structtoken_d2  # noqa: F401  (compat shims and registrations, before detectron2 submodules)
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from structtoken_d2 import add_structtoken_config
from structtoken_d2.data import build_dataset_mapper, read_sem_seg_label
from structtoken_d2.engine import Trainer
from structtoken_d2.evaluation import prediction_panel
from structtoken_d2.modeling.checkpoint import StructTokenCheckpointer
from structtoken_d2.modeling.test_time_augmentation import SemanticSegmentorWithTTA


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files")
    source.add_argument("--dataset", help="a registered dataset, e.g. shapes_sem_seg_val")
    parser.add_argument("--num", type=int, default=8, help="images of --dataset to predict (default 8)")
    parser.add_argument("--output", required=True, help="directory for the <image name>.png panels")
    parser.add_argument("--tta", action="store_true", help="multi-scale + flip test-time augmentation")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    return parser.parse_args()


def main():
    args = parse_args()
    cfg = get_cfg()
    add_structtoken_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    if not cfg.MODEL.WEIGHTS or not os.path.isfile(cfg.MODEL.WEIGHTS):
        sys.exit(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS!r} is not a file: pass MODEL.WEIGHTS path/to/model_final.pth")

    model = Trainer.build_model(cfg)
    StructTokenCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    predictor = SemanticSegmentorWithTTA(cfg, model) if args.tta else model
    mapper = build_dataset_mapper(cfg, is_train=False, resize_to_test_scale=not args.tta)
    if args.dataset:
        records = DatasetCatalog.get(args.dataset)[: args.num]
        colors = MetadataCatalog.get(args.dataset).stuff_colors
    else:
        records = [{"file_name": path} for path in args.input]
        colors = MetadataCatalog.get(cfg.DATASETS.TEST[0]).stuff_colors

    os.makedirs(args.output, exist_ok=True)
    for record in records:
        inp = mapper(record)
        with torch.no_grad():
            pred = predictor([inp])[0]["sem_seg"].argmax(0).cpu().numpy()
        image = cv2.imread(record["file_name"], cv2.IMREAD_COLOR)[:, :, ::-1]
        gt = read_sem_seg_label(record) if "sem_seg_file_name" in record else None
        name = os.path.splitext(os.path.basename(record["file_name"]))[0] + ".png"
        cv2.imwrite(os.path.join(args.output, name), prediction_panel(image, pred, colors, gt)[:, :, ::-1])
    print(f"Saved {len(records)} prediction panels to {args.output}")


if __name__ == "__main__":
    main()
