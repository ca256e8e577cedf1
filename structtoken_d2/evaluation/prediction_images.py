"""Saving predictions as images: input | ground truth | prediction, colourised by class."""
import os
from typing import Dict, List, Sequence

import cv2
import numpy as np
from detectron2.data import MetadataCatalog, detection_utils
from detectron2.evaluation import DatasetEvaluator

from ..data import read_sem_seg_label
from ..data.datasets import IGNORE_LABEL


def colorize(label: np.ndarray, colors: Sequence[Sequence[int]], ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """[H, W] class ids -> [H, W, 3] uint8 RGB; ignored pixels white."""
    palette = np.full((256, 3), 255, np.uint8)
    palette[: len(colors)] = np.asarray(colors, np.uint8)
    palette[ignore_label] = 255
    return palette[label.astype(np.uint8)]


def prediction_panel(image_rgb: np.ndarray, pred: np.ndarray, colors, gt: np.ndarray = None) -> np.ndarray:
    """[H, (2 or 3) * W, 3] uint8 RGB: the image, the ground truth (when given), the prediction."""
    panels = [image_rgb] + ([colorize(gt, colors)] if gt is not None else []) + [colorize(pred, colors)]
    return np.concatenate(panels, axis=1)


class PredictionImageWriter(DatasetEvaluator):
    """Writes the first ``max_images`` predictions of the evaluation to ``output_dir`` as
    ``<image name>.png`` panels (image | ground truth | prediction). ``evaluate`` returns nothing."""

    def __init__(self, dataset_name: str, output_dir: str, max_images: int = 8):
        self._colors = MetadataCatalog.get(dataset_name).stuff_colors
        self._output_dir = output_dir
        self._max_images = max_images
        self._written = 0

    def reset(self) -> None:
        self._written = 0

    def process(self, inputs: List[Dict], outputs: List[Dict]) -> None:
        for inp, out in zip(inputs, outputs):
            if self._written >= self._max_images:
                return
            pred = out["sem_seg"].argmax(dim=0).cpu().numpy()
            image = detection_utils.read_image(inp["file_name"], format="RGB")
            gt = read_sem_seg_label(inp) if "sem_seg_file_name" in inp else None
            panel = prediction_panel(image, pred, self._colors, gt)
            os.makedirs(self._output_dir, exist_ok=True)
            name = os.path.splitext(os.path.basename(inp["file_name"]))[0] + ".png"
            cv2.imwrite(os.path.join(self._output_dir, name), panel[:, :, ::-1])
            self._written += 1

    def evaluate(self):
        return None
