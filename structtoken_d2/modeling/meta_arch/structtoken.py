"""StructToken semantic segmentor: ViT backbone + StructToken head, mmseg ``EncoderDecoder`` semantics."""
import logging
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, build_sem_seg_head
from detectron2.structures import ImageList
from structtoken_runtime.protocol import slide_windows

from ... import ops
from ..bilinear_matmul import resize_bilinear
from ..checkpoint import ClassCountMismatchError

logger = logging.getLogger(__name__)

TEST_MODES = ("whole", "slide")
#: SOLVER.AMP.SCOPE: what the training step's autocast covers (the head in float32 with "backbone").
AMP_SCOPES = ("model", "backbone")


def _resize_logits_aligned(logits: torch.Tensor, size: Tuple[int, int], stride: int) -> torch.Tensor:
    """``TEST.LOGITS_RESIZE "aligned"``: upsample the stride-``stride`` logits ``[B, K, h, w]`` to the
    padded size ``(h * stride, w * stride)``, then crop to ``size``: each logit stays centred on the
    patch it was computed from."""
    padded = (logits.shape[-2] * stride, logits.shape[-1] * stride)
    logits = F.interpolate(logits.float(), size=padded, mode="bilinear", align_corners=False)
    return logits[..., : size[0], : size[1]]


def _resize_logits_mmseg(logits: torch.Tensor, size: Tuple[int, int], stride: int) -> torch.Tensor:
    """``TEST.LOGITS_RESIZE "mmseg"``: resize the logits ``[B, K, h, w]`` straight to the unpadded
    ``size``, as mmseg's ``EncoderDecoder.encode_decode`` does."""
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)


#: TEST.LOGITS_RESIZE -> f(head logits [B, K, h, w], window size (H, W), stride) -> [B, K, H, W].
LOGITS_RESIZE_RULES = {"aligned": _resize_logits_aligned, "mmseg": _resize_logits_mmseg}


def pad_to_label(image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Zero-pad a *normalised* image ``[C, h, w]`` at the bottom / right to its label's ``[H, W]``
    (``H >= h``, ``W >= w``): mmseg pads after ``Normalize``, so the padding is the mean colour."""
    pad_h, pad_w = label.shape[-2] - image.shape[-2], label.shape[-1] - image.shape[-1]
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"label {tuple(label.shape[-2:])} is smaller than its image {tuple(image.shape[-2:])}: "
                         f"the mapper may pad labels, never crop them")
    return F.pad(image, (0, pad_w, 0, pad_h)) if pad_h or pad_w else image


def check_dataset_num_classes(cfg, names: Optional[Sequence[str]] = None) -> None:
    """Raise :class:`ClassCountMismatchError` when a registered dataset of ``names`` (default:
    ``DATASETS.TRAIN`` and ``DATASETS.TEST``) has ``stuff_classes`` of another length than
    ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` (datasets not registered yet, or without ``stuff_classes``,
    are not checked)."""
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    registered = set(MetadataCatalog.list())
    for name in names if names is not None else list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        classes = getattr(MetadataCatalog.get(name), "stuff_classes", None) if name in registered else None
        if classes is not None and len(classes) != num_classes:
            raise ClassCountMismatchError(
                f"dataset {name!r} has {len(classes)} classes (metadata stuff_classes) but "
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {num_classes}: set MODEL.SEM_SEG_HEAD.NUM_CLASSES {len(classes)}"
            )


@META_ARCH_REGISTRY.register()
class StructTokenSegmentor(nn.Module):
    """``MODEL.META_ARCHITECTURE: "StructTokenSegmentor"``.

    Training: images normalised with ``MODEL.PIXEL_MEAN / PIXEL_STD`` (channel order
    ``INPUT.FORMAT``, RGB for the ViT weights), then zero-padded (0 = the mean colour, as mmseg's
    Normalize -> Pad) to their label's size (the crop) and to a multiple of 16, the labels
    padded with ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``; the head's stride-16 logits are upsampled
    bilinearly (``align_corners=False``) to the padded size; loss = cross-entropy ignoring
    ``IGNORE_VALUE`` times ``MODEL.SEM_SEG_HEAD.LOSS_WEIGHT``, averaged over *all* pixels as mmseg
    does by default (``avg_non_ignore=False``) unless ``MODEL.STRUCTTOKEN.LOSS_AVG_NON_IGNORE``.
    There is no auxiliary head (the authors' base config has none).

    Inference (``TEST.MODE``): ``whole`` (one pass) or ``slide`` (mmseg's sliding window:
    ``TEST.SLIDE_CROP_SIZE`` / ``TEST.SLIDE_STRIDE``, overlapping logits averaged); each pass's
    stride-16 logits are resized to its input by the ``TEST.LOGITS_RESIZE`` rule
    (:data:`LOGITS_RESIZE_RULES`); each image is processed at its own size and its logits resized
    bilinearly to the input dict's ``(height, width)``. Inputs of equal size are stacked, and the
    passes (windows, or whole images) go through the network ``TEST.SLIDE_BATCH`` at a time; the
    full-size logits are made one input at a time (:meth:`iter_inference`).
    Output: ``[{"sem_seg": logits [K, height, width]}]`` (pre-softmax).

    ``MODEL.COMPILE``: the backbone and the head are ``torch.compile``-d in place.
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
        logits_resize: str = "aligned",
        slide_batch: int = 1,
        compile_model: bool = False,
        head_in_float32: bool = False,
    ):
        super().__init__()
        if test_mode not in TEST_MODES:
            raise ValueError(f"TEST.MODE={test_mode!r}; valid: {', '.join(TEST_MODES)}")
        if logits_resize not in LOGITS_RESIZE_RULES:
            raise ValueError(f"TEST.LOGITS_RESIZE={logits_resize!r}; valid: {', '.join(LOGITS_RESIZE_RULES)}")
        if slide_batch < 1:
            raise ValueError(f"TEST.SLIDE_BATCH={slide_batch}: must be >= 1 (1 = one window per forward pass)")
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
        self.logits_resize = logits_resize
        self.slide_batch = slide_batch
        self.head_in_float32 = head_in_float32
        if compile_model:  # in place: parameter names, and so checkpoints, stay those of the eager model
            self.backbone.compile()
            self.sem_seg_head.compile()

    @classmethod
    def from_config(cls, cfg):
        check_dataset_num_classes(cfg)
        if cfg.SOLVER.AMP.SCOPE not in AMP_SCOPES:
            raise ValueError(f"SOLVER.AMP.SCOPE={cfg.SOLVER.AMP.SCOPE!r}; valid: {', '.join(AMP_SCOPES)}")
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
            "logits_resize": cfg.TEST.LOGITS_RESIZE,
            "slide_batch": cfg.TEST.SLIDE_BATCH,
            "compile_model": cfg.MODEL.COMPILE,
            "head_in_float32": cfg.SOLVER.AMP.SCOPE == "backbone",
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
            batched_inputs: dicts with "image" ``[3, h, w]`` (unnormalised, ``INPUT.FORMAT``), and
                for training "sem_seg" ``[H, W]`` (long, ``IGNORE_VALUE`` = ignore; ``H >= h``,
                ``W >= w``: a label padded to the crop size, the image padded here after
                normalisation); at inference optionally "height", "width" (output size, default
                the image's).

        Returns:
            training: ``{"loss_sem_seg": loss}``; inference: ``[{"sem_seg": logits [K, h, w]}]``.
        """
        if not self.training:
            return self.inference(batched_inputs)
        if any("sem_seg" not in x for x in batched_inputs):
            raise ValueError("StructTokenSegmentor in training mode needs 'sem_seg' in every input dict")
        targets = [x["sem_seg"].to(self.device) for x in batched_inputs]
        images = [
            pad_to_label(self.normalize(x["image"].to(self.device)), target)
            for x, target in zip(batched_inputs, targets)
        ]
        images = ImageList.from_tensors(images, self.size_divisibility)  # 0 = the mean colour
        targets = ImageList.from_tensors(targets, self.size_divisibility, self.ignore_value).tensor
        logits = self.decode(images.tensor)
        return {"loss_sem_seg": self.losses(logits, targets)}

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.pixel_mean) / self.pixel_std

    def decode(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B, 3, H, W]`` ``->`` the head's logits ``[B, K, ceil(H/16), ceil(W/16)]``. With
        ``head_in_float32`` (``SOLVER.AMP.SCOPE "backbone"``) an enclosing autocast covers the backbone only."""
        features = self.backbone(images)
        if not (self.head_in_float32 and torch.is_autocast_enabled(images.device.type)):
            return self.sem_seg_head(features)
        with torch.autocast(images.device.type, enabled=False):
            return self.sem_seg_head({name: f.float() for name, f in features.items()})

    def losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of stride-16 ``logits`` upsampled (bilinear, as two matrix products:
        :mod:`..bilinear_matmul`) to the ``targets [B, H, W]`` size."""
        logits = resize_bilinear(logits.float(), targets.shape[-2:])
        loss = F.cross_entropy(logits, targets, ignore_index=self.ignore_value, reduction="none")
        if self.loss_avg_non_ignore:
            loss = loss.sum() / (targets != self.ignore_value).sum().clamp(min=1)
        else:
            loss = loss.mean()
        return loss * self.loss_weight

    # ---------------------------------------------------------------- inference
    def inference(self, batched_inputs: List[Dict]) -> List[Dict[str, torch.Tensor]]:
        """The eval ``forward``: :meth:`iter_inference`'s outputs, in input order."""
        results: List[Dict[str, torch.Tensor]] = [{} for _ in batched_inputs]
        for index, output in self.iter_inference(batched_inputs):
            results[index] = output
        return results

    def iter_inference(self, batched_inputs: List[Dict]) -> Iterator[Tuple[int, Dict[str, torch.Tensor]]]:
        """Yields ``(index, {"sem_seg": logits [K, height, width]})`` for each input, one at a time:
        inputs whose images have the same size (an image and its flip, say) are stacked and go through
        :meth:`iter_inference_logits` together; each one's logits are resized to its ``(height, width)``
        as it comes. A caller that lets go of each output before asking for the next keeps one
        input's full-size logits alive, however many inputs (the test-time augmentation's views)."""
        groups: Dict[Tuple[int, ...], List[int]] = {}
        for index, inputs in enumerate(batched_inputs):
            groups.setdefault(tuple(inputs["image"].shape), []).append(index)
        for indices in groups.values():
            group_logits = self.iter_inference_logits(torch.stack([batched_inputs[i]["image"] for i in indices]))
            for i in indices:  # next() inline: no local name holds the previous input's logits
                yield i, {"sem_seg": self._resize_to_output_size(next(group_logits), batched_inputs[i])[0]}

    @staticmethod
    def _resize_to_output_size(logits: torch.Tensor, inputs: Dict) -> torch.Tensor:
        """``[1, K, H, W]`` ``->`` ``[1, K, height, width]`` (bilinear) for an input dict's optional
        ``height`` / ``width`` (default: unchanged)."""
        size = (inputs.get("height", logits.shape[-2]), inputs.get("width", logits.shape[-1]))
        if tuple(logits.shape[-2:]) == tuple(size):
            return logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def inference_logits(self, images: torch.Tensor, mode: Optional[str] = None) -> torch.Tensor:
        """Logits of a batch of images at their own size, ``[B, K, H, W]``: :meth:`iter_inference_logits`
        of the images, concatenated (B full-size logits at once)."""
        return torch.cat(list(self.iter_inference_logits(images, mode)))

    def iter_inference_logits(self, images: torch.Tensor, mode: Optional[str] = None) -> Iterator[torch.Tensor]:
        """Logits of a batch of images at their own size, yielded one image at a time.

        Args:
            images: ``[B, 3, H, W]``, any float or uint8 dtype, *unnormalised* pixel values in the
                channel order ``INPUT.FORMAT`` (what the dataset mapper puts in ``"image"``), on
                any device (moved to the model's). Any ``H, W`` (not necessarily multiples of 16).
            mode: "whole" or "slide"; None uses ``TEST.MODE``.

        Yields:
            for each image in order, ``[1, K, H, W]`` float logits (pre-softmax; mmseg averages
            *softmax* probabilities over augmentations). Normalisation, padding, sliding windows and
            the upsampling to ``(H, W)`` all happen here; resizing to the original image size is the
            caller's. No gradient is disabled here: wrap in ``torch.no_grad()`` for inference.

        The network's passes (slide: the windows of every image, image after image; whole: the
        images) go through it ``TEST.SLIDE_BATCH`` at a time, so one forward may hold windows of two
        images (an image and its flip). Their stride-16 logits wait until an image has all its
        windows; its full-size logits are then made and yielded, so one image's ``[K, H, W]`` is
        alive at a time (plus what the caller keeps), whatever B and ``TEST.SLIDE_BATCH``. The result
        is that of one pass at a time, to float rounding.
        """
        mode = mode or self.test_mode
        if mode not in TEST_MODES:
            raise ValueError(f"inference mode {mode!r}; valid: {', '.join(TEST_MODES)}")
        x = self.normalize(images.to(self.device))
        h, w = x.shape[-2:]
        windows = self.slide_windows(h, w) if mode == "slide" else [(0, h, 0, w)]
        count = x.new_zeros((1, 1, h, w))
        for y1, y2, x1, x2 in windows:
            count[..., y1:y2, x1:x2] += 1
        passes = [(n, window) for n in range(len(x)) for window in windows]
        image_windows: List[Tuple[Tuple[int, int, int, int], torch.Tensor]] = []  # of the current image
        for start in range(0, len(passes), self.slide_batch):
            batch = passes[start:start + self.slide_batch]
            head_logits = self.decode(torch.stack([x[n, :, y1:y2, x1:x2] for n, (y1, y2, x1, x2) in batch]))
            for window_and_logits in zip((window for _, window in batch), head_logits.split(1)):
                image_windows.append(window_and_logits)
                if len(image_windows) == len(windows):
                    yield self._average_windows(image_windows, count)
                    image_windows = []

    def _average_windows(self, windows: List[Tuple[Tuple[int, int, int, int], torch.Tensor]],
                         count: torch.Tensor) -> torch.Tensor:
        """One image's ``(y1, y2, x1, x2)`` windows and their head logits ``[1, K, h, w]`` ``->`` its
        logits ``[1, K, H, W]``: each window's resized (:meth:`resize_logits`) and summed, divided by
        ``count [1, 1, H, W]`` (windows covering each pixel). The sum is kept channels-last, the
        head's layout: adding channels-last windows into a channels-first sum reads them across the
        grain (8x slower on a CPU at K=150). A single window covers the image: its logits, resized."""
        if len(windows) == 1:
            return self.resize_logits(windows[0][1], count.shape[-2:])
        h, w = count.shape[-2:]
        logits = count.new_zeros((1, h, w, self.num_classes)).permute(0, 3, 1, 2)
        for (y1, y2, x1, x2), window_logits in windows:
            logits[..., y1:y2, x1:x2] += self.resize_logits(window_logits, (y2 - y1, x2 - x1))
        return logits.div_(count)  # in place: a second full-size tensor costs time on a CPU

    def resize_logits(self, logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """The head's stride-16 logits ``[B, K, h, w]`` of inputs of ``size = (H, W)`` ``->`` float
        ``[B, K, H, W]``, by the ``TEST.LOGITS_RESIZE`` rule (:data:`LOGITS_RESIZE_RULES`): what
        whole-mode inference does to the network's output, and slide mode to each window's."""
        return LOGITS_RESIZE_RULES[self.logits_resize](logits, tuple(size), self.size_divisibility)

    def slide_windows(self, height: int, width: int) -> List[Tuple[int, int, int, int]]:
        """mmseg's sliding-window grid over an image of ``height x width``: ``(y1, y2, x1, x2)`` of
        each ``TEST.SLIDE_CROP_SIZE`` window every ``TEST.SLIDE_STRIDE`` (the exported runtime's grid)."""
        return slide_windows(height, width, self.slide_crop_size, self.slide_stride)
