#!/usr/bin/env python
"""Convert the official COCO-Stuff-10K release to the layout ``coco_stuff_10k_sem_seg_*`` reads.

    python tools/prepare_coco_stuff_10k.py /path/to/cocostuff-10k-v1.1      # -> $DETECTRON2_DATASETS/coco_stuff_10k
    python tools/prepare_coco_stuff_10k.py /path/to/cocostuff-10k-v1.1 --output datasets/coco_stuff_10k

Input (unzipped ``cocostuff-10k-v1.1.zip``): ``images/*.jpg``, ``annotations/*.mat`` (field ``S``:
COCO-Stuff ids, 0 = unlabeled) and ``imageLists/{train,test}.txt``. Output (default
``$DETECTRON2_DATASETS/coco_stuff_10k``): ``images/{train,test}/*.jpg`` and
``annotations/{train,test}/*.png`` with train ids 0..170 and 255 = ignore.
"""
import argparse
import shutil
import sys
from pathlib import Path

import cv2
import scipy.io

import structtoken_d2  # noqa: F401
from structtoken_d2.data.datasets import datasets_root
from structtoken_d2.data.datasets.coco_stuff_10k import coco_stuff_train_ids

SPLITS = ("train", "test")


def convert(source: Path, output: Path) -> None:
    for sub in ("images", "annotations", "imageLists"):
        if not (source / sub).is_dir():
            sys.exit(f"{source} is not an unzipped cocostuff-10k-v1.1 release: {source / sub} is missing")
    for split in SPLITS:
        names = (source / "imageLists" / f"{split}.txt").read_text().split()
        (output / "images" / split).mkdir(parents=True, exist_ok=True)
        (output / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            shutil.copyfile(source / "images" / f"{name}.jpg", output / "images" / split / f"{name}.jpg")
            ids = scipy.io.loadmat(str(source / "annotations" / f"{name}.mat"))["S"]
            cv2.imwrite(str(output / "annotations" / split / f"{name}.png"), coco_stuff_train_ids(ids))
            if (i + 1) % 1000 == 0 or i + 1 == len(names):
                print(f"{split}: {i + 1}/{len(names)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="unzipped cocostuff-10k-v1.1 directory")
    parser.add_argument("--output", type=Path, default=None, help="default: $DETECTRON2_DATASETS/coco_stuff_10k")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    convert(args.source, args.output or datasets_root() / "coco_stuff_10k")


if __name__ == "__main__":
    main()
