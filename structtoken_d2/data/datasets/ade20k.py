"""ADE20K (SceneParsing, ``ADEChallengeData2016``): 150 classes, labels read with mmseg's
``reduce_zero_label`` (raw 0 -> ignore, 1..150 -> 0..149), as in the authors' setup."""
from pathlib import Path
from typing import Dict, List

from detectron2.data.datasets import load_sem_seg
from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES

from .registration import DatasetLayout, register_dataset_splits

# fmt: off
#: Colour of each of the 150 classes (RGB), the palette mmseg and the ADE20K toolkit use.
ADE20K_COLORS = [
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
]
# fmt: on

_LAYOUT = DatasetLayout(
    "ADEChallengeData2016", images="images", labels="annotations",
    tree="""ADEChallengeData2016/
  images/{training,validation}/*.jpg
  annotations/{training,validation}/*.png   (raw labels: 0 = other, 1..150 = classes)""",
    prepare="download ADEChallengeData2016.zip from http://sceneparsing.csail.mit.edu/ and unzip it "
            "under $DETECTRON2_DATASETS (no conversion needed)",
)
_SPLITS = {"ade20k_sem_seg_train": "training", "ade20k_sem_seg_val": "validation"}


def _load(image_dir: Path, label_dir: Path) -> List[Dict]:
    """The split's records, labels read with ``reduce_zero_label``."""
    records = load_sem_seg(str(label_dir), str(image_dir), gt_ext="png", image_ext="jpg")
    for record in records:
        record["reduce_zero_label"] = True
    return records


def register_ade20k() -> None:
    """Register ``ade20k_sem_seg_{train,val}``, replacing Detectron2's builtin entries (which
    expect labels preprocessed to ``annotations_detectron2``)."""
    class_names = [c.strip() for c in ADE20K_SEM_SEG_CATEGORIES]
    register_dataset_splits(_SPLITS, _LAYOUT, _load, dict(stuff_classes=class_names, stuff_colors=ADE20K_COLORS),
                            replace_existing=True)
