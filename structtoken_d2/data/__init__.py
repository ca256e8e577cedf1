"""Datasets, label reading and the training/test dataset mapper."""
from . import datasets
from .dataset_mapper import DATASET_MAPPER_REGISTRY, SemanticSegmentationMapper, build_dataset_mapper
from .labels import DataFileError, read_image_file, read_sem_seg_label

__all__ = [
    "DATASET_MAPPER_REGISTRY",
    "DataFileError",
    "SemanticSegmentationMapper",
    "build_dataset_mapper",
    "datasets",
    "read_image_file",
    "read_sem_seg_label",
]
