"""Export of a StructToken segmentor to ONNX (``tools/export_model.py``): the network that the
evaluation runs on one window or whole image, with the metadata that ``structtoken_runtime`` reads.

Graph: ``images [B, 3, H, W]`` (pixels in ``INPUT.FORMAT``, uint8 or float32) ``->`` normalisation
(``MODEL.PIXEL_MEAN / PIXEL_STD``) ``->`` the ViT (zero-padded to a multiple of 16, its position
embeddings resized bicubically to the token grid) ``->`` the StructToken head (the learned tokens
resized to the grid) ``->`` the logits resized to ``H x W`` by the ``TEST.LOGITS_RESIZE`` rule
``-> logits [B, K, H, W]`` float32. Batch, height and width are dynamic (any size >= 1), or
height and width fixed (``image_size``). The StructToken ops export as their PyTorch reference
(standard ONNX operators), whatever kernels are built.
"""
import contextlib
import json
import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from torch import nn

from .. import ops
from ..modeling.meta_arch.structtoken import StructTokenSegmentor
from ..output_files import create_file

logger = logging.getLogger(__name__)

#: The opset written unless another is asked for: 23 has ONNX's Attention operator, which onnxruntime runs 1.1-1.4x
#: faster than the MatMul-Softmax-MatMul of opset 18 (the torch exporter's default) on this project's ViTs (CPU).
#: Opsets 17 to 23 export.
DEFAULT_OPSET = 23
#: Input dtypes of the graph: the test mapper's uint8 images, or float pixel values.
INPUT_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}
#: Largest max |ONNX - PyTorch| / max |PyTorch logit| the export accepts.
DEFAULT_TOLERANCE = 1e-4


class ExportError(ValueError):
    """A model, config, opset or file that cannot be exported; the message says which and why."""


class ExportableSegmentor(nn.Module):
    """What :meth:`StructTokenSegmentor.iter_inference_logits` does to one window (slide) or whole
    image, for a batch: ``images [B, 3, H, W]`` (unnormalised, ``INPUT.FORMAT``) ``->`` float32
    logits ``[B, K, H, W]`` (normalise, backbone, head, :meth:`~StructTokenSegmentor.resize_logits`)."""

    def __init__(self, segmentor: StructTokenSegmentor):
        super().__init__()
        self.segmentor = segmentor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        segmentor = self.segmentor
        logits = segmentor.decode(segmentor.normalize(images))
        return segmentor.resize_logits(logits, images.shape[-2:])


@dataclass
class ExportCheck:
    """The check of an exported graph against PyTorch: on ``batch`` images of ``size``, the largest
    ``|ONNX - PyTorch|`` over the largest ``|PyTorch logit|``."""

    batch: int
    size: Tuple[int, int]
    max_abs_diff: float
    max_abs_logit: float

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / max(self.max_abs_logit, 1e-30)


def trace_size(segmentor: StructTokenSegmentor) -> Tuple[int, int]:
    """The ``(H, W)`` the exporter traces the graph at: not multiples of the patch (the padding is
    traced), a token grid unlike the position embeddings' and the learned tokens' (their resizing is
    traced, not the shortcut of a matching grid), and ``H != W`` (two dynamic dimensions, not one)."""
    stride = segmentor.size_divisibility
    pos_grid = segmentor.backbone.pos_grid
    token_size = segmentor.sem_seg_head.token_size
    grid_h = max(pos_grid[0], token_size[0]) + 1
    grid_w = max(pos_grid[1], token_size[1]) + 2
    return stride * grid_h - 3, stride * grid_w - 5


def check_size(segmentor: StructTokenSegmentor, cfg, image_size: Optional[Sequence[int]]) -> Tuple[int, int]:
    """The size the export is checked at: ``image_size`` when fixed, else the size of most passes
    (the slide crop in slide mode; the test scale's short side, square, in whole mode)."""
    if image_size is not None:
        return tuple(image_size)
    if segmentor.test_mode == "slide":
        return segmentor.slide_crop_size
    return (min(cfg.TEST.SCALE),) * 2


def class_names_of(cfg) -> List[str]:
    """The class names of ``DATASETS.TEST[0]`` (its ``stuff_classes``), else ``class_0 ...``."""
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    if len(cfg.DATASETS.TEST) and cfg.DATASETS.TEST[0] in MetadataCatalog.list():
        names = getattr(MetadataCatalog.get(cfg.DATASETS.TEST[0]), "stuff_classes", None)
        if names is not None and len(names) == num_classes:
            return list(names)
    return [f"class_{k}" for k in range(num_classes)]


def runtime_metadata(cfg, class_names: Sequence[str], image_size: Optional[Sequence[int]] = None,
                     quantization: Optional[str] = None) -> Dict[str, str]:
    """The ONNX ``metadata_props`` of an export (``structtoken_runtime.METADATA_KEYS``; JSON values,
    the config as YAML): all the runtime needs to evaluate as the config does."""
    test = cfg.TEST
    values = {
        "class_names": list(class_names),
        "input_format": cfg.INPUT.FORMAT,
        "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
        "pixel_std": list(cfg.MODEL.PIXEL_STD),
        "test_scale": list(test.SCALE),
        "test_mode": test.MODE,
        "slide_crop_size": list(test.SLIDE_CROP_SIZE),
        "slide_stride": list(test.SLIDE_STRIDE),
        "slide_batch": int(test.SLIDE_BATCH),
        "logits_resize": test.LOGITS_RESIZE,
        "aug_enabled": bool(test.AUG.ENABLED),
        "aug_ratios": list(test.AUG.RATIOS),
        "aug_flip": bool(test.AUG.FLIP),
        "image_size": None if image_size is None else list(image_size),
        "quantization": quantization,
    }
    return {"config": cfg.dump(), **{key: json.dumps(value) for key, value in values.items()}}


def _first_line(error: BaseException) -> str:
    """The gist of an exporter's error: its "Exception summary" line where it has one, else its first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    summary = next((line for line in lines if line.startswith("<class ")), None)
    return (summary or (lines[0] if lines else type(error).__name__))[:300]


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's warnings and its loggers' messages (an opset conversion it cannot do logs a traceback)
    held back: what fails is raised as one :class:`ExportError`."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "torch.onnx", "onnx_ir")]
    levels = [log.level for log in loggers]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for log in loggers:
                log.setLevel(logging.CRITICAL)
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


@contextlib.contextmanager
def _sdpa_attention(module: nn.Module):
    """The ViT's attention traced as ``F.scaled_dot_product_attention`` (timm's ``fused_attn``), whatever
    ``MODEL.VIT.FUSED_ATTENTION`` chose for training: the same function, which opset 23 writes as ONNX's
    ``Attention`` operator (faster in onnxruntime than the explicit products); restored after."""
    attentions = [m for m in module.modules() if hasattr(m, "fused_attn")]
    saved = [m.fused_attn for m in attentions]
    try:
        for m in attentions:
            m.fused_attn = True
        yield
    finally:
        for m, value in zip(attentions, saved):
            m.fused_attn = value


def export_program(segmentor: StructTokenSegmentor, opset: int, image_size: Optional[Sequence[int]],
                   input_dtype: str = "uint8"):
    """``torch.onnx.export`` (the dynamo exporter) of :class:`ExportableSegmentor`, the ops forced to
    their PyTorch reference, the attention as SDPA (:func:`_sdpa_attention`); batch dynamic, and height /
    width unless ``image_size`` fixes them.
    Returns the ``ONNXProgram``; :class:`ExportError` when it cannot be exported at ``opset``."""
    if input_dtype not in INPUT_DTYPES:
        raise ExportError(f"input dtype {input_dtype!r}; valid: {', '.join(INPUT_DTYPES)}")
    size = tuple(image_size) if image_size is not None else trace_size(segmentor)
    example = torch.zeros((2, 3) + size, dtype=INPUT_DTYPES[input_dtype])
    dynamic = torch.export.Dim.DYNAMIC
    shapes = {0: dynamic} if image_size is not None else {0: dynamic, 2: dynamic, 3: dynamic}
    wrapper = ExportableSegmentor(segmentor).eval()
    try:
        with ops.forced_pytorch(), torch.no_grad(), _sdpa_attention(segmentor), _quiet_exporter():
            program = torch.onnx.export(wrapper, (example,), dynamo=True, dynamic_shapes=(shapes,),
                                        input_names=["images"], output_names=["logits"], opset_version=opset,
                                        verbose=False)
    except Exception as e:  # the exporter raises its own types, and whatever torch.export raises
        raise ExportError(f"torch.onnx.export failed at opset {opset}: {_first_line(e)}") from None
    written = next((o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise ExportError(f"opset {opset}: the exporter could not convert the graph to it (it wrote opset {written}); "
                          f"use --opset {DEFAULT_OPSET}")
    return program


def compare_with_pytorch(path: str, segmentor: StructTokenSegmentor, batch: int, size: Sequence[int],
                         input_dtype: str = "uint8", seed: int = 0) -> ExportCheck:
    """One onnxruntime run of the ONNX file ``path`` and the PyTorch segmentor (its evaluation ops) on
    the same random ``[batch, 3, *size]`` images."""
    import onnxruntime as ort

    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3) + tuple(size), generator=generator, dtype=torch.uint8)
    images = images.to(INPUT_DTYPES[input_dtype])
    with torch.no_grad():
        reference = ExportableSegmentor(segmentor).eval()(images.to(segmentor.device)).float().cpu().numpy()
    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        exported = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    except Exception as e:  # onnxruntime's own exception types
        raise ExportError(f"onnxruntime cannot run the exported graph: {_first_line(e)}") from None
    if exported.shape != reference.shape:
        raise ExportError(f"the exported graph returns {exported.shape}, PyTorch {reference.shape}")
    return ExportCheck(batch, tuple(size), float(np.abs(exported - reference).max()), float(np.abs(reference).max()))


def export_onnx(segmentor: StructTokenSegmentor, cfg, path: str, *, class_names: Sequence[str],
                opset: int = DEFAULT_OPSET, image_size: Optional[Sequence[int]] = None, input_dtype: str = "uint8",
                tolerance: float = DEFAULT_TOLERANCE, progress: Callable[[str], None] = logger.info) -> ExportCheck:
    """Exports ``segmentor`` (built from ``cfg``, eval mode) to the new file ``path``, with
    :func:`runtime_metadata`. Before the file appears: ``onnx.checker`` (full check) and one
    onnxruntime run compared with PyTorch (:func:`compare_with_pytorch`, a batch of 2 where the batch
    is dynamic, at :func:`check_size`). Nothing is written when any step fails (:class:`ExportError`),
    nor over an existing file (``FileExistsError``). Returns the comparison."""
    import onnx

    if not isinstance(segmentor, StructTokenSegmentor):
        raise ExportError(f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE!r}: only StructTokenSegmentor "
                          f"models export")
    segmentor = segmentor.eval()
    progress(f"exporting at opset {opset}, "
             + (f"fixed {image_size[0]}x{image_size[1]} inputs" if image_size else "dynamic batch, height and width")
             + f", {input_dtype} pixels in {cfg.INPUT.FORMAT}")
    program = export_program(segmentor, opset, image_size, input_dtype)
    for key, value in runtime_metadata(cfg, class_names, image_size).items():
        program.model.metadata_props[key] = value
    check: List[ExportCheck] = []

    def write(tmp: str) -> None:
        program.save(tmp)
        try:
            onnx.checker.check_model(tmp, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise ExportError(f"onnx.checker rejects the exported graph: {_first_line(e)}") from None
        size = check_size(segmentor, cfg, image_size)
        progress(f"checked by onnx.checker; comparing onnxruntime with PyTorch on 2 images of {size[0]}x{size[1]}")
        result = compare_with_pytorch(tmp, segmentor, 2, size, input_dtype)
        if not result.relative_diff < tolerance:
            raise ExportError(
                f"the exported graph disagrees with PyTorch: max |diff| / max |logit| = {result.relative_diff:.3g} "
                f"(>= {tolerance:g}) on 2 images of {size[0]}x{size[1]}; nothing written")
        check.append(result)

    create_file(path, write)
    return check[0]


def fixed_image_size(text: str) -> Tuple[int, int]:
    """``"HxW"`` ``->`` ``(H, W)``; :class:`ExportError` unless both are positive integers."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ExportError(f"image size {text!r}: expected HEIGHTxWIDTH, e.g. 512x512") from None
    if h <= 0 or w <= 0:
        raise ExportError(f"image size {text!r}: sides must be positive")
    return h, w
