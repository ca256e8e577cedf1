"""Evaluation: semantic-segmentation metrics and prediction images."""
from .prediction_images import PredictionImageWriter, colorize, prediction_panel, shown_classes
from .sem_seg_evaluation import SemSegEvaluator, confusion_matrix, metrics_from_confusion

__all__ = [
    "PredictionImageWriter",
    "SemSegEvaluator",
    "colorize",
    "confusion_matrix",
    "metrics_from_confusion",
    "prediction_panel",
    "shown_classes",
]
