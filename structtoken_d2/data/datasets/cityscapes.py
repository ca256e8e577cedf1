"""Cityscapes fine annotations: 19 train ids read from ``*_gtFine_labelTrainIds.png``."""
from detectron2.data.datasets.builtin_meta import CITYSCAPES_CATEGORIES
from detectron2.data.datasets.cityscapes import load_cityscapes_semantic

from .registration import datasets_root, register_sem_seg_dataset, require_directories

_LAYOUT = """cityscapes/
  leftImg8bit/{train,val}/<city>/*_leftImg8bit.png
  gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png"""
_PREPARE = (
    "download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
    "https://www.cityscapes-dataset.com/, unzip them under $DETECTRON2_DATASETS/cityscapes, then "
    "`pip install cityscapesscripts && CITYSCAPES_DATASET=$DETECTRON2_DATASETS/cityscapes "
    "csCreateTrainIdLabelImgs`"
)
_SPLITS = {"cityscapes_fine_sem_seg_train": "train", "cityscapes_fine_sem_seg_val": "val"}


def _split_directories(name: str, split: str):
    """(image folder, label folder) of ``split``; :class:`DatasetNotFoundError` when one is missing."""
    root = datasets_root() / "cityscapes"
    directories = root / "leftImg8bit" / split, root / "gtFine" / split
    require_directories(name, directories, _LAYOUT, _PREPARE)
    return directories


def _load_split(name: str, split: str):
    image_dir, label_dir = _split_directories(name, split)
    return load_cityscapes_semantic(str(image_dir), str(label_dir))


def register_cityscapes() -> None:
    """Register ``cityscapes_fine_sem_seg_{train,val}``, replacing Detectron2's builtin entries of
    the same names (same records, plus our missing-data error and class colours)."""
    categories = sorted(CITYSCAPES_CATEGORIES, key=lambda c: c["trainId"])
    for name, split in _SPLITS.items():
        register_sem_seg_dataset(
            name,
            lambda name=name, split=split: _load_split(name, split),
            dict(
                stuff_classes=[c["name"] for c in categories],
                stuff_colors=[c["color"] for c in categories],
            ),
            replace_existing=True,
            require_files=lambda name=name, split=split: _split_directories(name, split),
        )
