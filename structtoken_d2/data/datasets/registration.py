"""Shared pieces of dataset registration: the datasets root, lazy loading with a clear error on
a missing directory, and replacing a registration Detectron2 made under the same name."""
import os
from pathlib import Path
from typing import Callable, Dict, List, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

#: Label value ignored by training losses and by evaluation.
IGNORE_LABEL = 255


class DatasetNotFoundError(FileNotFoundError):
    """A registered dataset was used but its files are not where the registration expects them."""


def datasets_root() -> Path:
    """Root of all datasets: ``$DETECTRON2_DATASETS``, default ``./datasets`` (as in Detectron2)."""
    return Path(os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets")))


def require_directories(dataset_name: str, directories: Sequence[Path], layout: str, prepare: str) -> None:
    """Raise one :class:`DatasetNotFoundError` listing every missing directory of ``dataset_name``,
    with the expected ``layout`` (a tree relative to the root) and the ``prepare`` instructions."""
    missing = [str(d) for d in directories if not d.is_dir()]
    if missing:
        raise DatasetNotFoundError(
            f"Dataset '{dataset_name}' not found: missing {', '.join(missing)}.\n"
            f"Expected layout under $DETECTRON2_DATASETS (now '{datasets_root()}'):\n{layout}\n"
            f"To prepare it: {prepare}"
        )


def register_sem_seg_dataset(
    name: str, load: Callable[[], List[Dict]], metadata: Dict, replace_existing: bool = False
) -> None:
    """Register a semantic-segmentation dataset under ``name``.

    ``load`` runs lazily on ``DatasetCatalog.get(name)``. ``replace_existing`` removes a
    registration Detectron2 made under the same name (its builtin ADE20K/Cityscapes entries) so
    that ours, with its clear missing-data error and our metadata, is the one in use.
    """
    if replace_existing and name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        evaluator_type="sem_seg", ignore_label=IGNORE_LABEL, **metadata
    )
