"""Saving predictions as images: input | ground truth | prediction, colourised by class, over a
legend strip of the classes shown."""
import os
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
from detectron2.data import MetadataCatalog, detection_utils
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from ..data import read_sem_seg_label
from ..data.datasets import IGNORE_LABEL


def colorize(label: np.ndarray, colors: Sequence[Sequence[int]], ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """[H, W] class ids -> [H, W, 3] uint8 RGB; ignored pixels white."""
    palette = np.full((256, 3), 255, np.uint8)
    palette[: len(colors)] = np.asarray(colors, np.uint8)
    palette[ignore_label] = 255
    return palette[label.astype(np.uint8)]


def shown_classes(pred: np.ndarray, gt: Optional[np.ndarray] = None, ignore_label: int = IGNORE_LABEL) -> List[int]:
    """The class ids, ascending, that ``pred [H, W]`` or ``gt [H, W]`` (when given) contain, without
    ``ignore_label``: the classes a panel of them shows, and so its legend's entries."""
    ids = set(np.unique(pred).tolist()) | (set(np.unique(gt).tolist()) if gt is not None else set())
    return sorted(int(k) for k in ids - {ignore_label})


_FONT, _FONT_SCALE, _SWATCH, _LINE, _MARGIN = cv2.FONT_HERSHEY_SIMPLEX, 0.4, 12, 18, 6


def legend_strip(class_ids: Sequence[int], class_names: Sequence[str], colors, width: int) -> np.ndarray:
    """[h, width, 3] uint8 RGB, white: one colour swatch and name per class of ``class_ids``, left to
    right, wrapped onto more lines when ``width`` is full."""
    entries, x, y = [], _MARGIN, _MARGIN
    for k in class_ids:
        (text_w, _), _ = cv2.getTextSize(class_names[k], _FONT, _FONT_SCALE, 1)
        entry_w = _SWATCH + 4 + text_w + 2 * _MARGIN
        if x + entry_w > width and x > _MARGIN:
            x, y = _MARGIN, y + _LINE
        entries.append((k, x, y))
        x += entry_w
    strip = np.full((y + _LINE + _MARGIN // 2, width, 3), 255, np.uint8)
    for k, x, y in entries:
        cv2.rectangle(strip, (x, y), (x + _SWATCH - 1, y + _SWATCH - 1), tuple(int(c) for c in colors[k]), -1)
        cv2.putText(strip, class_names[k], (x + _SWATCH + 4, y + _SWATCH - 2), _FONT, _FONT_SCALE, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return strip


def prediction_panel(image_rgb: np.ndarray, pred: np.ndarray, colors, gt: np.ndarray = None,
                     class_names: Optional[Sequence[str]] = None) -> np.ndarray:
    """[H (+ legend), (2 or 3) * W, 3] uint8 RGB: the image, the ground truth (when given), the
    prediction; with ``class_names``, a :func:`legend_strip` of the :func:`shown_classes` below."""
    panels = [image_rgb] + ([colorize(gt, colors)] if gt is not None else []) + [colorize(pred, colors)]
    panel = np.concatenate(panels, axis=1)
    if class_names is None:
        return panel
    legend = legend_strip(shown_classes(pred, gt), class_names, colors, panel.shape[1])
    return np.concatenate([panel, legend], axis=0)


class PredictionImageWriter(DatasetEvaluator):
    """Writes the first ``max_images`` predictions of the evaluation to ``output_dir`` as
    ``<image name>.png`` panels (image | ground truth | prediction, legend of the classes shown).
    ``evaluate`` returns nothing."""

    def __init__(self, dataset_name: str, output_dir: str, max_images: int = 8):
        self._colors = MetadataCatalog.get(dataset_name).stuff_colors
        self._class_names = MetadataCatalog.get(dataset_name).stuff_classes
        self._output_dir = output_dir
        self._max_images = max_images
        self._written = 0

    def reset(self) -> None:
        self._written = 0

    def process(self, inputs: List[Dict], outputs: List[Dict]) -> None:
        if not comm.is_main_process():  # rank 0's share of the test set starts with its first images
            return
        for inp, out in zip(inputs, outputs):
            if self._written >= self._max_images:
                return
            pred = out["sem_seg"].argmax(dim=0).cpu().numpy()
            image = detection_utils.read_image(inp["file_name"], format="RGB")
            gt = read_sem_seg_label(inp, len(self._class_names)) if "sem_seg_file_name" in inp else None
            panel = prediction_panel(image, pred, self._colors, gt, self._class_names)
            os.makedirs(self._output_dir, exist_ok=True)
            name = os.path.splitext(os.path.basename(inp["file_name"]))[0] + ".png"
            cv2.imwrite(os.path.join(self._output_dir, name), panel[:, :, ::-1])
            self._written += 1

    def evaluate(self):
        return None
