"""Checks of the configured datasets that run BEFORE the model is built, so that a dataset that is
not registered, not on disk or of another class count is reported in seconds, not after building
a ViT-L. They read the catalogs and look for the datasets' folders; no dataset is loaded."""
from typing import List, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..data.datasets import DatasetNotFoundError, require_dataset_files
from ..modeling import check_dataset_num_classes


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
    """Check that each dataset of ``names`` is registered (``DATASETS.FOLDER`` datasets are
    registered by :func:`~structtoken_d2.data.datasets.register_folder_datasets_from_config`, which
    must run first), has ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` class names and has its folders where
    its registration expects them (the error of its loader otherwise).

    Raises:
        DatasetNotFoundError: a dataset is not registered or its folders are missing.
        ClassCountMismatchError: its metadata ``stuff_classes`` has another length than NUM_CLASSES.
    """
    names = list(dict.fromkeys(names))
    registered = set(DatasetCatalog.list())
    for name in names:
        if name not in registered:
            raise DatasetNotFoundError(
                f"Dataset '{name}' (DATASETS.TRAIN / DATASETS.TEST) is not registered. Register your own data with "
                f"structtoken_d2.data.datasets.register_folder_dataset(...) or DATASETS.FOLDER.ROOT (which registers "
                f"folder_<split>); registered semantic-segmentation datasets: {', '.join(_sem_seg_datasets(registered))}"
            )
        if MetadataCatalog.get(name).get("stuff_classes", None) is None:
            raise ValueError(f"Dataset '{name}' has no metadata stuff_classes: register it with its class names")
    check_dataset_num_classes(cfg, names)
    for name in names:
        require_dataset_files(name)
