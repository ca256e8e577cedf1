"""Reading a dataset record's ground-truth label map, shared by the mapper, the evaluator and
the demo so that every consumer sees the same labels."""
from typing import Dict

import numpy as np
from detectron2.data import detection_utils

from .datasets.registration import IGNORE_LABEL


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg ``reduce_zero_label``: label 0 ("other") becomes ignore, every other label ``l``
    becomes ``l - 1`` (ADE20K's 1..150 -> 0..149). ``label``: [H, W] uint8."""
    reduced = label.astype(np.int32) - 1
    reduced[label == 0] = IGNORE_LABEL
    return reduced.astype(np.uint8)


def read_sem_seg_label(dataset_dict: Dict) -> np.ndarray:
    """The [H, W] uint8 train-id label map of a dataset record (``sem_seg_file_name``), with
    ``reduce_zero_label`` applied when the record asks for it."""
    label = detection_utils.read_image(dataset_dict["sem_seg_file_name"]).astype(np.uint8)
    if label.ndim != 2:
        raise ValueError(
            f"{dataset_dict['sem_seg_file_name']}: a label map must be a single-channel PNG of "
            f"train ids, got shape {label.shape}"
        )
    if dataset_dict.get("reduce_zero_label", False):
        label = reduce_zero_label(label)
    return label
