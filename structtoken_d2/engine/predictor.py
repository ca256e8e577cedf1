"""Inference with a trained model: :func:`load_trained_model` (what the tools use) and
:class:`StructTokenPredictor`, a Detectron2 ``DefaultPredictor`` that predicts as the evaluation does."""
from typing import Dict

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor
from torch import nn

from ..data import build_dataset_mapper
from ..data.datasets import register_folder_datasets_from_config
from ..modeling.checkpoint import StructTokenCheckpointer, check_trained_weights
from ..modeling.test_time_augmentation import SemanticSegmentorWithTTA
from .trainer import Trainer


def load_trained_model(cfg) -> nn.Module:
    """``cfg``'s model (:meth:`Trainer.build_model`) with the weights ``MODEL.WEIGHTS`` (a file, or a
    URL Detectron2's checkpointer fetches) loaded by :class:`StructTokenCheckpointer`, which refuses
    a checkpoint that does not fit the model; in eval mode. Raises :class:`WeightsNotFoundError` when
    ``MODEL.WEIGHTS`` is empty or not a file."""
    check_trained_weights(cfg.MODEL.WEIGHTS)
    model = Trainer.build_model(cfg)
    StructTokenCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


class StructTokenPredictor(DefaultPredictor):
    """``DefaultPredictor`` that predicts as ``tools/train_net.py --eval-only`` evaluates, so its
    prediction equals the one the evaluation scores for the same image:

    - preprocessing: the test mapper's (keep-ratio resize to ``TEST.SCALE``, with OpenCV's
      interpolation) instead of Detectron2's ``ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)``;
    - with ``TEST.AUG.ENABLED``, multi-scale + flip test-time augmentation
      (:class:`SemanticSegmentorWithTTA` on the original image): ``"sem_seg"`` then holds mean
      probabilities instead of logits (the same argmax use);
    - weights: :func:`load_trained_model` (a missing file or another class count is an error).

    It does not call ``DefaultPredictor.__init__`` (which would build and load a second model), but
    sets the same attributes: ``cfg``, ``model`` (the segmentor, or its TTA wrapper), ``metadata``
    (of ``DATASETS.TEST[0]``, when there is one), ``input_format`` and ``aug``: here a
    ``T.AugmentationList`` (empty with TTA), applied as ``aug(T.AugInput(image))`` (an
    ``AugmentationList`` has no ``get_transform``).

    ::

        predictor = StructTokenPredictor(cfg)             # cfg.MODEL.WEIGHTS: a trained model
        scores = predictor(cv2.imread("x.jpg"))["sem_seg"]  # [K, H, W] at the image's size
        classes = scores.argmax(0)                          # [H, W] train ids
    """

    def __init__(self, cfg):
        self.cfg = cfg.clone()
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be RGB or BGR, got {self.input_format!r}")
        register_folder_datasets_from_config(self.cfg)  # DATASETS.FOLDER datasets: metadata, class count
        if len(cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        model = load_trained_model(self.cfg)
        tta = cfg.TEST.AUG.ENABLED
        self.model = (SemanticSegmentorWithTTA(self.cfg, model) if tta else model).eval()
        self.aug = build_dataset_mapper(self.cfg, is_train=False, resize_to_test_scale=not tta).augmentations

    def model_input(self, original_image: np.ndarray) -> Dict:
        """``original_image`` [H, W, 3] uint8 BGR ``->`` the model's input dict, as the test mapper
        makes it from the image's file: ``"image"`` [3, h, w] uint8 in ``INPUT.FORMAT`` (resized
        by :attr:`aug`), ``"height"`` H, ``"width"`` W."""
        image = original_image[:, :, ::-1] if self.input_format == "RGB" else original_image
        height, width = image.shape[:2]
        aug_input = T.AugInput(np.ascontiguousarray(image))
        self.aug(aug_input)
        tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        return {"image": tensor, "height": height, "width": width}

    def __call__(self, original_image: np.ndarray) -> Dict[str, torch.Tensor]:
        """``original_image`` [H, W, 3] uint8 BGR (as ``cv2.imread``) -> ``{"sem_seg": [K, H, W]}``."""
        with torch.no_grad():
            return self.model([self.model_input(original_image)])[0]
