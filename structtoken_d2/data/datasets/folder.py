"""Your own data: a folder of images and a folder of PNG label maps, registered with Detectron2's
``DatasetCatalog`` / ``MetadataCatalog`` from Python (:func:`register_folder_dataset`) or from the
config (``DATASETS.FOLDER.*``, :func:`register_folder_datasets_from_config`).

Labels are 8-bit single-channel PNGs of train ids ``0..K-1`` with 255 = ignore; an image and its
label map are matched by their path relative to their folder, without the extension
(``images/a/x.jpg`` <-> ``labels/a/x.png``).
"""
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .registration import (
    IGNORE_LABEL, DatasetNotFoundError, evenly_spaced_colors, register_sem_seg_dataset, require_directories,
)

#: Image extensions accepted when no ``image_ext`` is given.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp")
#: Name of the dataset registered for split ``<split>`` of ``DATASETS.FOLDER.ROOT``.
FOLDER_DATASET_NAME = "folder_{split}"

logger = logging.getLogger(__name__)


def _require_folders(name: str, image_dir: Path, label_dir: Path, image_ext: str, label_ext: str) -> None:
    """:class:`DatasetNotFoundError` when the image or the label folder of dataset ``name`` is missing."""
    root = Path(os.path.commonpath([image_dir.absolute(), label_dir.absolute()]))
    layout = (f"  {image_dir.absolute().relative_to(root)}/<name>.<{image_ext or '|'.join(IMAGE_EXTENSIONS)}>   "
              f"(sub-folders allowed)\n  {label_dir.absolute().relative_to(root)}/<name>.{label_ext}   "
              f"(train ids 0..K-1, {IGNORE_LABEL} = ignore)")
    require_directories(name, [image_dir, label_dir], layout, root=str(root),
                        prepare="check the folders given to register_folder_dataset or DATASETS.FOLDER.ROOT")


def _files_by_stem(directory: Path, extensions: Sequence[str]) -> Dict[str, Path]:
    """Relative path without extension -> file, for the files under ``directory`` (recursively)
    with one of ``extensions`` (case-insensitive)."""
    suffixes = {"." + e.lower().lstrip(".") for e in extensions}
    return {
        str(p.relative_to(directory).with_suffix("")): p
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.suffix.lower() in suffixes
    }


def load_folder_dataset(
    name: str, image_dir: str, label_dir: str, image_ext: str = "", label_ext: str = "png",
    reduce_zero_label: bool = False,
) -> List[Dict]:
    """Detectron2 records (``file_name``, ``sem_seg_file_name``, ``image_id``) of every label map
    of ``label_dir`` with its image of ``image_dir``. Raises :class:`DatasetNotFoundError` naming
    what is missing: a folder, any label map, or the image of a label map."""
    image_dir, label_dir = Path(image_dir), Path(label_dir)
    _require_folders(name, image_dir, label_dir, image_ext, label_ext)
    labels = _files_by_stem(label_dir, [label_ext])
    if not labels:
        raise DatasetNotFoundError(f"Dataset '{name}': no *.{label_ext} label map in {label_dir}")
    images = _files_by_stem(image_dir, [image_ext] if image_ext else IMAGE_EXTENSIONS)
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise DatasetNotFoundError(
            f"Dataset '{name}': {len(orphans)} of {len(labels)} label maps have no image of the same name in "
            f"{image_dir} (extensions {image_ext or ', '.join(IMAGE_EXTENSIONS)}), e.g. "
            f"{', '.join(str(labels[s]) for s in orphans[:3])}"
        )
    unlabelled = len(set(images) - set(labels))
    if unlabelled:
        logger.warning("Dataset '%s': %d images of %s have no label map in %s and are not used",
                       name, unlabelled, image_dir, label_dir)
    records = []
    for stem in sorted(labels):
        record = {"file_name": str(images[stem]), "sem_seg_file_name": str(labels[stem]), "image_id": stem}
        if reduce_zero_label:
            record["reduce_zero_label"] = True
        records.append(record)
    return records


def register_folder_dataset(
    name: str,
    image_dir: str,
    label_dir: str,
    classes: Sequence[str],
    colors: Optional[Sequence[Sequence[int]]] = None,
    image_ext: str = "",
    label_ext: str = "png",
    reduce_zero_label: bool = False,
) -> None:
    """Register ``name`` (replacing an earlier registration of that name) as the images of
    ``image_dir`` with the label maps of ``label_dir``, files read on first use.

    Args:
        classes: the K class names, index = train id (MODEL.SEM_SEG_HEAD.NUM_CLASSES must be K).
        colors: K RGB colours for prediction images; default: evenly spaced hues.
        image_ext: image extension, e.g. "jpg"; "" accepts any of :data:`IMAGE_EXTENSIONS`.
        label_ext: label-map extension.
        reduce_zero_label: labels are 0 = other, 1..K = classes (mmseg ``reduce_zero_label``:
            0 becomes ignore, l becomes l - 1), as ADE20K's.
    """
    classes = [str(c) for c in classes]
    if not classes:
        raise ValueError(f"register_folder_dataset('{name}'): give the class names (classes is empty)")
    colors = [tuple(int(v) for v in c) for c in colors] if colors is not None else evenly_spaced_colors(len(classes))
    if len(colors) != len(classes):
        raise ValueError(f"register_folder_dataset('{name}'): {len(colors)} colors for {len(classes)} classes")
    register_sem_seg_dataset(
        name,
        lambda: load_folder_dataset(name, image_dir, label_dir, image_ext, label_ext, reduce_zero_label),
        dict(stuff_classes=classes, stuff_colors=colors, image_root=str(image_dir), sem_seg_root=str(label_dir)),
        replace_existing=True,
        require_files=lambda: _require_folders(name, Path(image_dir), Path(label_dir), image_ext, label_ext),
    )


def register_folder_datasets_from_config(cfg) -> List[str]:
    """Register ``folder_<split>`` for every split folder of ``DATASETS.FOLDER.ROOT``/images that
    has its ``labels/<split>`` folder; the names registered (none when ROOT is "")."""
    if not cfg.DATASETS.FOLDER.ROOT:
        return []
    root = Path(cfg.DATASETS.FOLDER.ROOT).expanduser()
    require_directories(
        FOLDER_DATASET_NAME.format(split="<split>"), [root / "images", root / "labels"],
        f"  images/<split>/<name>.<{cfg.DATASETS.FOLDER.IMAGE_EXT or '|'.join(IMAGE_EXTENSIONS)}>\n"
        f"  labels/<split>/<name>.png   (train ids 0..K-1, {IGNORE_LABEL} = ignore)",
        "put your data there, or set DATASETS.FOLDER.ROOT to the folder that holds images/ and labels/",
        root=f"{root} (DATASETS.FOLDER.ROOT)",
    )
    if not cfg.DATASETS.FOLDER.CLASSES:
        raise ValueError(f"DATASETS.FOLDER.ROOT is {root} but DATASETS.FOLDER.CLASSES is empty: list the class names")
    names = []
    for split_dir in sorted(p for p in (root / "images").iterdir() if p.is_dir() and (root / "labels" / p.name).is_dir()):
        name = FOLDER_DATASET_NAME.format(split=split_dir.name)
        register_folder_dataset(name, str(split_dir), str(root / "labels" / split_dir.name),
                                cfg.DATASETS.FOLDER.CLASSES, image_ext=cfg.DATASETS.FOLDER.IMAGE_EXT)
        names.append(name)
    if not names:
        raise DatasetNotFoundError(
            f"DATASETS.FOLDER.ROOT {root}: no split folder in both images/ and labels/ (e.g. images/train and labels/train)"
        )
    return names
