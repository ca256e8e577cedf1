"""Reading a dataset record's files with errors that name the file: the image, and the
ground-truth label map shared by the mapper, the evaluator and the demo so that every consumer
sees the same, checked labels."""
from contextlib import contextmanager
from typing import Dict, Iterator, Optional

import numpy as np
from detectron2.data import detection_utils
from PIL import Image, ImageOps, UnidentifiedImageError

from .datasets.registration import IGNORE_LABEL

#: PIL modes of label files read exactly as 8-bit train ids (1-bit, 8-bit grey, 8-bit palette).
LABEL_MODES = ("1", "L", "P")


class DataFileError(ValueError):
    """An image or label file that cannot be used; the one-line message names the file and says why."""


@contextmanager
def _errors_naming(path: str) -> Iterator[None]:
    """Turns PIL's errors on reading ``path`` into a one-line :class:`DataFileError` naming it."""
    try:
        yield
    except FileNotFoundError:
        raise DataFileError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        reason = "not an image file" if isinstance(e, UnidentifiedImageError) else f"unreadable image ({e})"
        raise DataFileError(f"{path}: {reason}") from None


def read_image_file(path: str, format: Optional[str] = None) -> np.ndarray:
    """``detection_utils.read_image(path, format)``, raising :class:`DataFileError` naming ``path``
    when it is missing or not an image."""
    with _errors_naming(path):
        return detection_utils.read_image(path, format=format)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg ``reduce_zero_label``: label 0 ("other") becomes ignore, every other label ``l``
    becomes ``l - 1`` (ADE20K's 1..150 -> 0..149), except ignore (255), which stays ignore as in
    mmseg (whose 254 -> 255 step maps both 0 and 255 to 255). ``label``: [H, W] uint8."""
    reduced = label.astype(np.int32) - 1
    reduced[(label == 0) | (label == IGNORE_LABEL)] = IGNORE_LABEL
    return reduced.astype(np.uint8)


def check_label_values(label: np.ndarray, num_classes: int, ignore_label: int, path: str, note: str = "") -> None:
    """Raise :class:`DataFileError` naming ``path``, the offending values and the valid range
    unless every value of the [H, W] uint8 ``label`` is in ``0..num_classes-1`` or ``ignore_label``."""
    counts = np.bincount(label.ravel(), minlength=256)
    valid = np.zeros(len(counts), bool)
    valid[:num_classes] = True
    valid[ignore_label] = True
    bad = np.flatnonzero((counts > 0) & ~valid)
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if bad.size > 10 else "")
        raise DataFileError(
            f"{path}: label values {shown}{note} ({int(counts[bad].sum())} pixels) outside the valid range "
            f"0..{num_classes - 1} and {ignore_label} (ignore): fix the file, or check the dataset's classes "
            f"and MODEL.SEM_SEG_HEAD.NUM_CLASSES ({num_classes})"
        )


def read_sem_seg_label(
    dataset_dict: Dict, num_classes: Optional[int] = None, ignore_label: int = IGNORE_LABEL
) -> np.ndarray:
    """The [H, W] uint8 train-id label map of a dataset record (``sem_seg_file_name``), with
    ``reduce_zero_label`` applied when the record asks for it.

    Raises :class:`DataFileError` naming the file when it is missing, not an image, not an 8-bit
    single-channel map (PIL mode 1, L or P; 16-bit or colour maps are refused rather than wrapped
    modulo 256), or, when ``num_classes`` K is given, holds values outside ``0..K-1`` and
    ``ignore_label``. Pipeline callers pass K; ``None`` skips the range check.
    """
    path = dataset_dict["sem_seg_file_name"]
    with _errors_naming(path), Image.open(path) as image:  # one read: the mode, then the pixels
        if image.mode not in LABEL_MODES:
            raise DataFileError(
                f"{path}: label maps must be 8-bit single-channel images of train ids (PIL mode L or P), this "
                f"one is mode {image.mode}: convert it, e.g. cv2.imwrite(path, label.astype(np.uint8)) after "
                f"checking its values are 0..K-1 or {IGNORE_LABEL}"
            )
        ImageOps.exif_transpose(image, in_place=True)  # as detection_utils.read_image turns the image
        label = np.array(image, dtype=np.uint8)  # writable: consumers may change it in place
    if label.ndim != 2:
        raise DataFileError(f"{path}: a label map must be a single-channel PNG of train ids, got shape {label.shape}")
    reduce = dataset_dict.get("reduce_zero_label", False)
    if reduce:
        label = reduce_zero_label(label)
    if num_classes is not None:
        note = " (after reduce_zero_label: raw value - 1)" if reduce else ""
        check_label_values(label, num_classes, ignore_label, path, note)
    return label
