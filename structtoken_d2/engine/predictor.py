"""A Detectron2 ``DefaultPredictor`` that predicts exactly as the evaluation does."""
import os
from typing import Dict

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from ..data import build_dataset_mapper
from ..modeling.checkpoint import StructTokenCheckpointer


class StructTokenPredictor(DefaultPredictor):
    """``DefaultPredictor`` whose preprocessing is the evaluation's: the test mapper's transforms
    (keep-ratio resize to ``TEST.SCALE``, with the same interpolation) instead of Detectron2's
    ``ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)``, and weights loaded with the
    class-count check of :class:`StructTokenCheckpointer`. So its prediction equals the one the
    evaluation scores for the same image.

    ::

        predictor = StructTokenPredictor(cfg)             # cfg.MODEL.WEIGHTS: a trained model
        logits = predictor(cv2.imread("x.jpg"))["sem_seg"]  # [K, H, W] at the image's size
        classes = logits.argmax(0)                          # [H, W] train ids
    """

    def __init__(self, cfg):
        self.cfg = cfg.clone()
        if cfg.MODEL.WEIGHTS and "://" not in cfg.MODEL.WEIGHTS and not os.path.isfile(cfg.MODEL.WEIGHTS):
            raise FileNotFoundError(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}: no such file (a trained model_final.pth)")
        self.model = build_model(self.cfg)
        self.model.eval()
        if len(cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        StructTokenCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be RGB or BGR, got {self.input_format!r}")
        self.augmentations = build_dataset_mapper(self.cfg, is_train=False).augmentations

    def __call__(self, original_image: np.ndarray) -> Dict[str, torch.Tensor]:
        """``original_image`` [H, W, 3] uint8 BGR (as ``cv2.imread``) -> ``{"sem_seg": logits [K, H, W]}``."""
        with torch.no_grad():
            image = original_image[:, :, ::-1] if self.input_format == "RGB" else original_image
            height, width = image.shape[:2]
            aug_input = T.AugInput(np.ascontiguousarray(image))
            self.augmentations(aug_input)
            tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
            return self.model([{"image": tensor, "height": height, "width": width}])[0]
