"""COCO-Stuff-10K: 171 classes (80 things + 91 stuff), 9000 train / 1000 test images, labels
converted from the official ``.mat`` files by ``tools/prepare_coco_stuff_10k.py``."""
from typing import Dict

import numpy as np
from detectron2.data.datasets import load_sem_seg
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from .registration import IGNORE_LABEL, DatasetLayout, evenly_spaced_colors, register_dataset_splits

# fmt: off
#: The 91 stuff classes, COCO-Stuff ids 92..182 in order.
COCO_STUFF_STUFF_CLASSES = [
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter",
    "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other",
    "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit",
    "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves", "light", "mat",
    "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement",
    "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper",
    "snow", "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent",
    "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other",
    "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops",
    "window-blind", "window-other", "wood",
]
# fmt: on
_THINGS = [c for c in COCO_CATEGORIES if c["isthing"] == 1]
#: COCO-Stuff id (1..182, 0 = unlabeled) of each of the 171 train ids.
COCO_STUFF_IDS = [c["id"] for c in _THINGS] + list(range(92, 183))
COCO_STUFF_CLASSES = [c["name"] for c in _THINGS] + COCO_STUFF_STUFF_CLASSES
#: Things keep their COCO colours; stuff classes get evenly spaced hues.
COCO_STUFF_COLORS = [tuple(c["color"]) for c in _THINGS] + evenly_spaced_colors(len(COCO_STUFF_STUFF_CLASSES))


def coco_stuff_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """COCO-Stuff ids (0 = unlabeled, 1..182) -> train ids 0..170 as uint8; unlabeled and the 11
    ids COCO never uses become 255 (ignore). ``label_ids``: [H, W] integer array."""
    lookup = np.full(256, IGNORE_LABEL, np.uint8)
    lookup[COCO_STUFF_IDS] = np.arange(len(COCO_STUFF_IDS), dtype=np.uint8)
    ids = np.asarray(label_ids)
    if ids.min() < 0 or ids.max() > 182:
        raise ValueError(f"COCO-Stuff ids must be in 0..182, got {ids.min()}..{ids.max()}")
    return lookup[ids.astype(np.int64)]


_LAYOUT = DatasetLayout(
    "coco_stuff_10k", images="images", labels="annotations",
    tree="""coco_stuff_10k/
  images/{train,test}/*.jpg
  annotations/{train,test}/*.png   (train ids 0..170, 255 = unlabeled)""",
    prepare="download cocostuff-10k-v1.1.zip (https://github.com/nightrome/cocostuff10k), unzip it and run "
            "`python tools/prepare_coco_stuff_10k.py /path/to/cocostuff-10k-v1.1`",
)
_SPLITS: Dict[str, str] = {"coco_stuff_10k_sem_seg_train": "train", "coco_stuff_10k_sem_seg_test": "test"}


def register_coco_stuff_10k() -> None:
    """Register ``coco_stuff_10k_sem_seg_{train,test}``."""
    register_dataset_splits(
        _SPLITS, _LAYOUT,
        lambda image_dir, label_dir: load_sem_seg(str(label_dir), str(image_dir), gt_ext="png", image_ext="jpg"),
        dict(stuff_classes=COCO_STUFF_CLASSES, stuff_colors=COCO_STUFF_COLORS),
    )
