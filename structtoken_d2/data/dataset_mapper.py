"""Dataset mapper of the authors' mmseg pipeline, selected by ``cfg.INPUT.DATASET_MAPPER_NAME``.

Training: keep-ratio random resize (``INPUT.RESIZE_SCALE`` x ``INPUT.RESIZE_RATIO_RANGE``) ->
random crop ``INPUT.CROP.SIZE`` retried while one category covers more than
``INPUT.CROP.SINGLE_CATEGORY_MAX_AREA`` -> flip (p=0.5, ``INPUT.RANDOM_FLIP``) -> photometric distortion ->
label padded to the crop size with 255. The image is not padded here: the segmentor normalises it
and then pads it with 0 to its label's size (mmseg's Normalize -> Pad order), so padding is the
mean colour rather than black. Test: keep-ratio resize to ``TEST.SCALE`` (skipped for
multi-scale test-time augmentation, which resizes the original image itself).
"""
import copy
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.utils.registry import Registry

from .datasets.registration import IGNORE_LABEL
from .labels import DataFileError, read_image_file, read_sem_seg_label
from .transforms import CategoryAreaCrop, PhotometricDistortion, ResizeToScale

DATASET_MAPPER_REGISTRY = Registry("DATASET_MAPPER")
DATASET_MAPPER_REGISTRY.__doc__ = """Builders ``f(cfg, is_train, **kwargs) -> mapper``, by the name
used in ``cfg.INPUT.DATASET_MAPPER_NAME``."""


class SemanticSegmentationMapper:
    """Maps a dataset record to the model input: ``image`` [3, h, w] uint8 in ``INPUT.FORMAT``,
    ``sem_seg`` [H, W] int64 (training only; H >= h, W >= w when padded to the crop size) and the
    original ``height`` / ``width``."""

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: List[T.Augmentation],
        image_format: str,
        pad_size: Optional[List[int]] = None,
        num_classes: Optional[int] = None,
        cache_decoded: bool = False,
    ):
        """
        Args:
            is_train: whether to read and transform the label map.
            augmentations: applied to the image and (in training) the label map together.
            image_format: format of the image read (Detectron2 ``INPUT.FORMAT``).
            pad_size: [h, w] the transformed label is padded to (bottom/right) with 255 (the
                image is padded by the model, after normalisation); None: no padding.
            num_classes: K; label maps holding values outside 0..K-1 and 255 (ignore) are refused
                with an error naming the file (``MODEL.SEM_SEG_HEAD.NUM_CLASSES``; None: unchecked).
            cache_decoded: keep each file's decoded (and checked) image and label map after its first
                read, and hand out copies (``DATALOADER.CACHE_DECODED_IMAGES``).
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.pad_size = pad_size
        self.num_classes = num_classes
        self._decoded: Optional[Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]]] = {} if cache_decoded else None

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, resize_to_test_scale: bool = True) -> Dict:
        if is_train:
            augs = [ResizeToScale(cfg.INPUT.RESIZE_SCALE, cfg.INPUT.RESIZE_RATIO_RANGE)]
            pad_size = None
            if cfg.INPUT.CROP.ENABLED:
                if cfg.INPUT.CROP.TYPE != "absolute":
                    raise ValueError(
                        f"INPUT.CROP.TYPE must be 'absolute' (a crop size in pixels) for the "
                        f"'{cfg.INPUT.DATASET_MAPPER_NAME}' mapper, got {cfg.INPUT.CROP.TYPE!r}"
                    )
                augs.append(CategoryAreaCrop("absolute", cfg.INPUT.CROP.SIZE,
                                             cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA, IGNORE_LABEL))
                pad_size = list(cfg.INPUT.CROP.SIZE)
            if cfg.INPUT.RANDOM_FLIP != "none":  # Detectron2's key: "horizontal" (mmseg's), "vertical", "none"
                flip = cfg.INPUT.RANDOM_FLIP
                augs.append(T.RandomFlip(0.5, horizontal=flip == "horizontal", vertical=flip == "vertical"))
            if cfg.INPUT.PHOTOMETRIC_DISTORTION:
                augs.append(PhotometricDistortion(image_format=cfg.INPUT.FORMAT))
        else:
            augs = [ResizeToScale(cfg.TEST.SCALE)] if resize_to_test_scale else []
            pad_size = None
        return dict(is_train=is_train, augmentations=augs, image_format=cfg.INPUT.FORMAT, pad_size=pad_size,
                    num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
                    cache_decoded=is_train and cfg.DATALOADER.CACHE_DECODED_IMAGES)

    def _read(self, dataset_dict: Dict) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """The record's image ``[H, W, 3]`` uint8 and (training) label map ``[H, W]`` uint8, checked."""
        image = read_image_file(dataset_dict["file_name"], format=self.image_format)
        detection_utils.check_image_size(dataset_dict, image)
        label = read_sem_seg_label(dataset_dict, self.num_classes) if self.is_train else None
        if label is not None and label.shape != image.shape[:2]:
            raise DataFileError(
                f"Label {dataset_dict['sem_seg_file_name']} is {label.shape}, image "
                f"{dataset_dict['file_name']} is {image.shape[:2]}: they must have the same size"
            )
        return image, label

    def __call__(self, dataset_dict: Dict) -> Dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        if self._decoded is None:
            image, label = self._read(dataset_dict)
        else:
            key = dataset_dict["file_name"]
            if key not in self._decoded:
                self._decoded[key] = self._read(dataset_dict)
            image, label = (a if a is None else a.copy() for a in self._decoded[key])
        aug_input = T.AugInput(image, sem_seg=label)
        self.augmentations(aug_input)
        image = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        if label is not None:
            label = torch.as_tensor(aug_input.sem_seg.astype(np.int64))
        if self.pad_size is not None and label is not None:
            pad_h, pad_w = self.pad_size[0] - label.shape[0], self.pad_size[1] - label.shape[1]
            if pad_h > 0 or pad_w > 0:
                label = torch.nn.functional.pad(label, [0, max(pad_w, 0), 0, max(pad_h, 0)], value=IGNORE_LABEL)
        dataset_dict["image"] = image
        if label is not None:
            dataset_dict["sem_seg"] = label
        return dataset_dict


@DATASET_MAPPER_REGISTRY.register()
def structtoken_semantic(cfg, is_train: bool, **kwargs) -> Callable[[Dict], Dict]:
    """The authors' mmseg pipeline (:class:`SemanticSegmentationMapper`)."""
    return SemanticSegmentationMapper(cfg, is_train, **kwargs)


def build_dataset_mapper(cfg, is_train: bool, **kwargs) -> Callable[[Dict], Dict]:
    """The mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME``."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in DATASET_MAPPER_REGISTRY:
        raise KeyError(
            f"INPUT.DATASET_MAPPER_NAME {name!r} is not registered; known: "
            f"{sorted(k for k, _ in DATASET_MAPPER_REGISTRY)}"
        )
    return DATASET_MAPPER_REGISTRY.get(name)(cfg, is_train, **kwargs)
