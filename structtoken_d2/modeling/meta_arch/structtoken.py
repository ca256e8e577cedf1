"""StructToken semantic segmentor: ViT backbone + StructToken head, mmseg ``EncoderDecoder`` semantics."""
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, build_sem_seg_head
from detectron2.structures import ImageList

from ... import ops
from ..checkpoint import ClassCountMismatchError

logger = logging.getLogger(__name__)

TEST_MODES = ("whole", "slide")


def check_dataset_num_classes(cfg) -> None:
    """Raise :class:`ClassCountMismatchError` when a registered dataset of ``DATASETS.TRAIN`` /
    ``DATASETS.TEST`` has ``stuff_classes`` of another length than ``MODEL.SEM_SEG_HEAD.NUM_CLASSES``
    (datasets not registered yet, or without ``stuff_classes``, are not checked)."""
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    registered = set(MetadataCatalog.list())
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        classes = getattr(MetadataCatalog.get(name), "stuff_classes", None) if name in registered else None
        if classes is not None and len(classes) != num_classes:
            raise ClassCountMismatchError(
                f"dataset {name!r} has {len(classes)} classes (metadata stuff_classes) but "
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {num_classes}"
            )


@META_ARCH_REGISTRY.register()
class StructTokenSegmentor(nn.Module):
    """``MODEL.META_ARCHITECTURE: "StructTokenSegmentor"``.

    Training: images normalised with ``MODEL.PIXEL_MEAN / PIXEL_STD`` (channel order
    ``INPUT.FORMAT``, RGB for the ViT weights), zero-padded to a multiple of 16 with the labels
    padded with ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``; the head's stride-16 logits are upsampled
    bilinearly (``align_corners=False``) to the padded size; loss = cross-entropy ignoring
    ``IGNORE_VALUE`` times ``MODEL.SEM_SEG_HEAD.LOSS_WEIGHT``, averaged over *all* pixels as mmseg
    does by default (``avg_non_ignore=False``) unless ``MODEL.STRUCTTOKEN.LOSS_AVG_NON_IGNORE``.
    There is no auxiliary head (the authors' base config has none).

    Inference (``TEST.MODE``): ``whole`` (one pass) or ``slide`` (mmseg's sliding window:
    ``TEST.SLIDE_CROP_SIZE`` / ``TEST.SLIDE_STRIDE``, overlapping logits averaged); each image is
    processed at its own size and its logits resized bilinearly to the input dict's
    ``(height, width)``. Output: ``[{"sem_seg": logits [K, height, width]}]`` (pre-softmax).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        sem_seg_head: nn.Module,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        ignore_value: int = 255,
        loss_weight: float = 1.0,
        loss_avg_non_ignore: bool = False,
        test_mode: str = "slide",
        slide_crop_size: Sequence[int] = (512, 512),
        slide_stride: Sequence[int] = (341, 341),
    ):
        super().__init__()
        if test_mode not in TEST_MODES:
            raise ValueError(f"TEST.MODE={test_mode!r}; valid: {', '.join(TEST_MODES)}")
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        self.loss_avg_non_ignore = loss_avg_non_ignore
        self.test_mode = test_mode
        self.slide_crop_size = tuple(int(s) for s in slide_crop_size)
        self.slide_stride = tuple(int(s) for s in slide_stride)

    @classmethod
    def from_config(cls, cfg):
        check_dataset_num_classes(cfg)
        if cfg.MODEL.STRUCTTOKEN.FORCE_PYTORCH_OPS:
            os.environ[ops.FORCE_PYTORCH_ENV] = "1"
            logger.info("MODEL.STRUCTTOKEN.FORCE_PYTORCH_OPS: using the PyTorch reference ops")
        backbone = build_backbone(cfg)
        return {
            "backbone": backbone,
            "sem_seg_head": build_sem_seg_head(cfg, backbone.output_shape()),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "loss_weight": cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT,
            "loss_avg_non_ignore": cfg.MODEL.STRUCTTOKEN.LOSS_AVG_NON_IGNORE,
            "test_mode": cfg.TEST.MODE,
            "slide_crop_size": cfg.TEST.SLIDE_CROP_SIZE,
            "slide_stride": cfg.TEST.SLIDE_STRIDE,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def num_classes(self) -> int:
        return self.sem_seg_head.num_classes

    @property
    def size_divisibility(self) -> int:
        return self.backbone.size_divisibility

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: dicts with "image" ``[3, H, W]`` (unnormalised, ``INPUT.FORMAT``), and
                for training "sem_seg" ``[H, W]`` (long, ``IGNORE_VALUE`` = ignore); at inference
                optionally "height", "width" (output size, default the image's).

        Returns:
            training: ``{"loss_sem_seg": loss}``; inference: ``[{"sem_seg": logits [K, h, w]}]``.
        """
        if not self.training:
            return [self._inference_one(x) for x in batched_inputs]
        if any("sem_seg" not in x for x in batched_inputs):
            raise ValueError("StructTokenSegmentor in training mode needs 'sem_seg' in every input dict")
        images = [self.normalize(x["image"].to(self.device)) for x in batched_inputs]
        images = ImageList.from_tensors(images, self.size_divisibility)
        targets = [x["sem_seg"].to(self.device) for x in batched_inputs]
        targets = ImageList.from_tensors(targets, self.size_divisibility, self.ignore_value).tensor
        logits = self.decode(images.tensor)
        return {"loss_sem_seg": self.losses(logits, targets)}

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.pixel_mean) / self.pixel_std

    def decode(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B, 3, H, W]`` ``->`` the head's logits ``[B, K, ceil(H/16), ceil(W/16)]``."""
        return self.sem_seg_head(self.backbone(images))

    def losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of stride-16 ``logits`` upsampled to the ``targets [B, H, W]`` size."""
        logits = F.interpolate(logits.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, targets, ignore_index=self.ignore_value, reduction="none")
        if self.loss_avg_non_ignore:
            loss = loss.sum() / (targets != self.ignore_value).sum().clamp(min=1)
        else:
            loss = loss.mean()
        return loss * self.loss_weight

    # ---------------------------------------------------------------- inference
    def _inference_one(self, inputs: Dict) -> Dict[str, torch.Tensor]:
        image = inputs["image"].to(self.device)
        logits = self.inference_logits(image[None])[0]
        size = (inputs.get("height", image.shape[-2]), inputs.get("width", image.shape[-1]))
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
        return {"sem_seg": logits}

    def inference_logits(self, images: torch.Tensor, mode: Optional[str] = None) -> torch.Tensor:
        """Logits of a batch of images at their own size: the entry point for test-time augmentation.

        Args:
            images: ``[B, 3, H, W]``, any float or uint8 dtype, *unnormalised* pixel values in the
                channel order ``INPUT.FORMAT`` (what the dataset mapper puts in ``"image"``), on
                any device (moved to the model's). Any ``H, W`` (not necessarily multiples of 16).
            mode: "whole" or "slide"; None uses ``TEST.MODE``.

        Returns:
            ``[B, K, H, W]`` float logits (pre-softmax; mmseg averages *softmax* probabilities
            over augmentations). Normalisation, padding, sliding windows and the upsampling to
            ``(H, W)`` all happen here; resizing to the original image size is the caller's.
            No gradient is disabled here: wrap in ``torch.no_grad()`` for inference.
        """
        mode = mode or self.test_mode
        if mode not in TEST_MODES:
            raise ValueError(f"inference mode {mode!r}; valid: {', '.join(TEST_MODES)}")
        x = self.normalize(images.to(self.device))
        return self._whole_inference(x) if mode == "whole" else self._slide_inference(x)

    def _whole_inference(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B, 3, H, W]`` ``->`` logits ``[B, K, H, W]``: zero-pad to a multiple of 16,
        decode, upsample to the padded size, crop the padding off."""
        h, w = x.shape[-2:]
        d = self.size_divisibility
        padded = F.pad(x, (0, -w % d, 0, -h % d))
        logits = self.decode(padded)
        logits = F.interpolate(logits.float(), size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :h, :w]

    def slide_windows(self, height: int, width: int) -> List[Tuple[int, int, int, int]]:
        """mmseg's sliding-window grid: ``(y1, y2, x1, x2)`` of each crop, windows clipped to the
        image (``max(H - crop + stride - 1, 0) // stride + 1`` rows, likewise columns)."""
        (ch, cw), (sh, sw) = self.slide_crop_size, self.slide_stride
        rows = max(height - ch + sh - 1, 0) // sh + 1
        cols = max(width - cw + sw - 1, 0) // sw + 1
        windows = []
        for i in range(rows):
            for j in range(cols):
                y2, x2 = min(i * sh + ch, height), min(j * sw + cw, width)
                windows.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
        return windows

    def _slide_inference(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B, 3, H, W]`` ``->`` logits ``[B, K, H, W]`` averaged over the windows."""
        b, _, h, w = x.shape
        logits = x.new_zeros((b, self.num_classes, h, w))
        count = x.new_zeros((1, 1, h, w))
        for y1, y2, x1, x2 in self.slide_windows(h, w):
            logits[..., y1:y2, x1:x2] += self._whole_inference(x[..., y1:y2, x1:x2])
            count[..., y1:y2, x1:x2] += 1
        return logits / count
