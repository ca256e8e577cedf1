"""Cityscapes fine annotations: 19 train ids read from ``*_gtFine_labelTrainIds.png``."""
from detectron2.data.datasets.builtin_meta import CITYSCAPES_CATEGORIES
from detectron2.data.datasets.cityscapes import load_cityscapes_semantic

from .registration import DatasetLayout, register_dataset_splits

_LAYOUT = DatasetLayout(
    "cityscapes", images="leftImg8bit", labels="gtFine",
    tree="""cityscapes/
  leftImg8bit/{train,val}/<city>/*_leftImg8bit.png
  gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png""",
    prepare="download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
            "https://www.cityscapes-dataset.com/, unzip them under $DETECTRON2_DATASETS/cityscapes, then "
            "`pip install cityscapesscripts && CITYSCAPES_DATASET=$DETECTRON2_DATASETS/cityscapes "
            "csCreateTrainIdLabelImgs`",
)
_SPLITS = {"cityscapes_fine_sem_seg_train": "train", "cityscapes_fine_sem_seg_val": "val"}


def register_cityscapes() -> None:
    """Register ``cityscapes_fine_sem_seg_{train,val}``, replacing Detectron2's builtin entries of
    the same names (same records, plus our missing-data error and class colours)."""
    categories = sorted(CITYSCAPES_CATEGORIES, key=lambda c: c["trainId"])
    metadata = dict(stuff_classes=[c["name"] for c in categories], stuff_colors=[c["color"] for c in categories])
    register_dataset_splits(
        _SPLITS, _LAYOUT, lambda image_dir, label_dir: load_cityscapes_semantic(str(image_dir), str(label_dir)),
        metadata, replace_existing=True,
    )
