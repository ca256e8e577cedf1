"""Checks of the configured datasets that run BEFORE the model is built, so that a dataset that is
not registered, not on disk or of another class count is reported in seconds, not after building
a ViT-L."""
from typing import List, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..data.datasets import DatasetNotFoundError, register_folder_datasets_from_config
from ..modeling.checkpoint import ClassCountMismatchError


def datasets_used(cfg, training: bool) -> List[str]:
    """The datasets a run reads: ``DATASETS.TRAIN`` plus, when training evaluates (``TEST.EVAL_PERIOD``
    > 0 or ``TEST.EVAL_AFTER_TRAIN``), ``DATASETS.TEST``; only ``DATASETS.TEST`` for evaluation."""
    if not training:
        return list(cfg.DATASETS.TEST)
    evaluates = cfg.TEST.EVAL_PERIOD > 0 or cfg.TEST.EVAL_AFTER_TRAIN
    return list(cfg.DATASETS.TRAIN) + (list(cfg.DATASETS.TEST) if evaluates else [])


def _sem_seg_datasets(names) -> List[str]:
    return sorted(n for n in names if MetadataCatalog.get(n).get("evaluator_type", None) == "sem_seg")


def check_datasets(cfg, names: Sequence[str]) -> None:
    """Register the ``DATASETS.FOLDER`` datasets, then check that each dataset of ``names`` is
    registered, has ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` class names and has records (its files are
    where its registration expects them: the loader's own error otherwise).

    Raises:
        DatasetNotFoundError: a dataset is not registered, its files are missing, or it is empty.
        ClassCountMismatchError: its metadata ``stuff_classes`` has another length than NUM_CLASSES.
    """
    register_folder_datasets_from_config(cfg)
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    registered = set(DatasetCatalog.list())
    for name in dict.fromkeys(names):
        if name not in registered:
            raise DatasetNotFoundError(
                f"Dataset '{name}' (DATASETS.TRAIN / DATASETS.TEST) is not registered. Register your own data with "
                f"structtoken_d2.data.datasets.register_folder_dataset(...) or DATASETS.FOLDER.ROOT (which registers "
                f"folder_<split>); registered semantic-segmentation datasets: {', '.join(_sem_seg_datasets(registered))}"
            )
        classes = MetadataCatalog.get(name).get("stuff_classes", None)
        if classes is None:
            raise ValueError(f"Dataset '{name}' has no metadata stuff_classes: register it with its class names")
        if len(classes) != num_classes:
            raise ClassCountMismatchError(
                f"dataset '{name}' has {len(classes)} classes (metadata stuff_classes) but "
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {num_classes}: set MODEL.SEM_SEG_HEAD.NUM_CLASSES {len(classes)}"
            )
        if not DatasetCatalog.get(name):
            raise DatasetNotFoundError(f"Dataset '{name}' has no images")
