"""Shared pieces of dataset registration: the datasets root, a dataset's folder layout, lazy
loading with a clear error on a missing directory (also checkable on its own, in a moment, before a
model is built), default class colours, and replacing a registration Detectron2 made under the
same name."""
import colorsys
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

#: Label value ignored by training losses and by evaluation.
IGNORE_LABEL = 255


class DatasetNotFoundError(FileNotFoundError):
    """A registered dataset was used but its files are not where the registration expects them."""


def datasets_root() -> Path:
    """Root of all datasets: ``$DETECTRON2_DATASETS``, default ``./datasets`` (as in Detectron2)."""
    return Path(os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets")))


def evenly_spaced_colors(num_colors: int) -> List[Tuple[int, int, int]]:
    """``num_colors`` RGB colours of evenly spaced hues (classes without colours of their own)."""
    return [tuple(int(255 * v) for v in colorsys.hsv_to_rgb(i / max(num_colors, 1), 0.65, 0.95))
            for i in range(num_colors)]


def require_directories(
    dataset_name: str, directories: Sequence[Path], layout: str, prepare: str, root: Optional[str] = None
) -> None:
    """Raise one :class:`DatasetNotFoundError` listing every missing directory of ``dataset_name``,
    with the expected ``layout`` (a tree relative to ``root``, default ``$DETECTRON2_DATASETS``)
    and the ``prepare`` instructions."""
    missing = [str(d) for d in directories if not d.is_dir()]
    if missing:
        root = root or f"$DETECTRON2_DATASETS (now '{datasets_root()}')"
        raise DatasetNotFoundError(
            f"Dataset '{dataset_name}' not found: missing {', '.join(missing)}.\n"
            f"Expected layout under {root}:\n{layout}\n"
            f"To prepare it: {prepare}"
        )


@dataclass(frozen=True)
class DatasetLayout:
    """Where a dataset's splits lie under ``$DETECTRON2_DATASETS``: images in
    ``<root>/<images>/<split>``, labels in ``<root>/<labels>/<split>``. ``tree`` (the expected
    layout) and ``prepare`` (how to get it) go into the error when a folder is missing."""

    root: str
    images: str
    labels: str
    tree: str
    prepare: str

    def split_directories(self, dataset_name: str, split: str) -> Tuple[Path, Path]:
        """(image folder, label folder) of ``split``; :class:`DatasetNotFoundError` naming
        ``dataset_name`` when one is missing."""
        root = datasets_root() / self.root
        directories = root / self.images / split, root / self.labels / split
        require_directories(dataset_name, directories, self.tree, self.prepare)
        return directories


class _Loader:
    """What ``DatasetCatalog`` calls to load a dataset; it also carries the dataset's quick check."""

    def __init__(self, load: Callable[[], List[Dict]], require_files: Callable[[], object]):
        self.load, self.require_files = load, require_files

    def __call__(self) -> List[Dict]:
        return self.load()


def require_dataset_files(name: str) -> None:
    """The quick check registered with dataset ``name`` (its directories exist, without loading
    it): raises :class:`DatasetNotFoundError` as loading would. Datasets registered without one
    (elsewhere, or generated on use) are not checked."""
    require_files = getattr(DatasetCatalog[name], "require_files", None)
    if require_files is not None:
        require_files()


def register_sem_seg_dataset(
    name: str, load: Callable[[], List[Dict]], metadata: Dict, replace_existing: bool = False,
    require_files: Optional[Callable[[], object]] = None,
) -> None:
    """Register a semantic-segmentation dataset under ``name``.

    ``load`` runs lazily on ``DatasetCatalog.get(name)``. ``require_files``, when given, checks
    in a moment that the files are where ``load`` expects them (``load`` calls it too), for
    :func:`require_dataset_files`. ``replace_existing`` removes a registration Detectron2 made
    under the same name (its builtin ADE20K/Cityscapes entries) so that ours, with its clear
    missing-data error and our metadata, is the one in use.
    """
    if replace_existing and name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, _Loader(load, require_files) if require_files is not None else load)
    MetadataCatalog.get(name).set(
        evaluator_type="sem_seg", ignore_label=IGNORE_LABEL, **metadata
    )


def register_dataset_splits(
    splits: Dict[str, str], layout: DatasetLayout, load: Callable[[Path, Path], List[Dict]], metadata: Dict,
    replace_existing: bool = False,
) -> None:
    """Register each ``name -> split`` of ``splits`` (:func:`register_sem_seg_dataset`), loaded
    lazily by ``load(image folder, label folder)`` from ``layout``, whose folders are also the
    registration's quick check."""
    for name, split in splits.items():
        register_sem_seg_dataset(
            name,
            lambda name=name, split=split: load(*layout.split_directories(name, split)),
            metadata,
            replace_existing=replace_existing,
            require_files=lambda name=name, split=split: layout.split_directories(name, split),
        )
