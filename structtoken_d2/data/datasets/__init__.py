"""Dataset registrations, done on ``import structtoken_d2``; data are only read on use."""
from .ade20k import register_ade20k
from .cityscapes import register_cityscapes
from .coco_stuff_10k import register_coco_stuff_10k
from .folder import register_folder_dataset, register_folder_datasets_from_config
from .registration import IGNORE_LABEL, DatasetNotFoundError, datasets_root, require_dataset_files
from .shapes import register_shapes

register_ade20k()
register_cityscapes()
register_coco_stuff_10k()
register_shapes()

__all__ = [
    "IGNORE_LABEL", "DatasetNotFoundError", "datasets_root", "register_folder_dataset",
    "register_folder_datasets_from_config", "require_dataset_files",
]
