"""int8 versions of an exported model, by onnxruntime's quantization (``tools/export_model.py --int8``).

- ``dynamic``: the weights of the MatMuls (the ViT's and the head's linear layers, the 1x1
  convolutions) stored in int8; their activations quantized at run time, per call.
- ``static``: weights and activations of the MatMuls and convolutions in int8 (QDQ format, weights
  per channel), the activations' ranges calibrated on images of the training set, fed as the
  evaluation feeds them (the test resize, then each window).

Each keeps the float32 model's metadata, with ``quantization`` saying which was done.
"""
import json
import logging
import os
import tempfile
from typing import Callable, Iterable, Iterator, List, Optional

import numpy as np
from detectron2.data import DatasetCatalog

from structtoken_runtime.protocol import keep_ratio_size, resize_image, slide_windows

from ..data import read_image_file
from ..output_files import create_file
from .onnx_export import ExportError

logger = logging.getLogger(__name__)

#: int8 modes -> ONNX operators quantized. Dynamic quantization of convolutions (ConvInteger) is
#: slower than float32 on onnxruntime's CPU provider, so only the MatMuls are.
QUANTIZED_OPS = {"dynamic": ["MatMul"], "static": ["MatMul", "Conv"]}


def calibration_windows(cfg, num_images: int, dataset: Optional[str] = None) -> List[np.ndarray]:
    """The network inputs ``[1, 3, h, w]`` (uint8, ``INPUT.FORMAT``) of ``num_images`` images of
    ``dataset`` (default ``DATASETS.TRAIN[0]``), evenly spaced over it: each resized keep-ratio to
    ``TEST.SCALE``, then cut into the ``TEST.MODE`` windows, as the evaluation does."""
    name = dataset or cfg.DATASETS.TRAIN[0]
    records = DatasetCatalog.get(name)
    if num_images > len(records):
        raise ExportError(f"--calibration-images {num_images}: {name} has {len(records)} images")
    picks = np.linspace(0, len(records) - 1, num_images).round().astype(int)
    windows = []
    for index in picks:
        image = read_image_file(records[index]["file_name"], format=cfg.INPUT.FORMAT)
        image = resize_image(image, keep_ratio_size(*image.shape[:2], cfg.TEST.SCALE))
        h, w = image.shape[:2]
        grid = slide_windows(h, w, cfg.TEST.SLIDE_CROP_SIZE, cfg.TEST.SLIDE_STRIDE) if cfg.TEST.MODE == "slide" \
            else [(0, h, 0, w)]
        windows += [np.ascontiguousarray(image[y1:y2, x1:x2].transpose(2, 0, 1)[None]) for y1, y2, x1, x2 in grid]
    return windows


class _Windows:
    """onnxruntime's ``CalibrationDataReader`` protocol over a list of input arrays."""

    def __init__(self, input_name: str, windows: Iterable[np.ndarray]):
        self._feeds: Iterator = iter({input_name: window} for window in windows)

    def get_next(self):
        return next(self._feeds, None)


def _copy_metadata(src: str, dst_model, quantization: str) -> None:
    import onnx

    props = {p.key: p.value for p in onnx.load(src, load_external_data=False).metadata_props}
    props["quantization"] = json.dumps(quantization)
    del dst_model.metadata_props[:]
    for key, value in props.items():
        dst_model.metadata_props.add(key=key, value=value)


def quantize_onnx(src: str, dst: str, mode: str, calibration: Optional[List[np.ndarray]] = None,
                  progress: Callable[[str], None] = logger.info) -> str:
    """Writes the int8 version of the exported model ``src`` to the new file ``dst`` (never over an
    existing one): ``mode`` "dynamic", or "static" calibrated on the ``calibration`` inputs. Returns
    the ``quantization`` metadata written."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_dynamic, quantize_static,
    )

    if mode not in QUANTIZED_OPS:
        raise ExportError(f"int8 mode {mode!r}; valid: {', '.join(QUANTIZED_OPS)}")
    if mode == "static" and not calibration:
        raise ExportError("static int8 quantization needs calibration images (--calibration-images N, N > 0)")
    with tempfile.TemporaryDirectory(prefix="structtoken_int8_") as work:
        prepared = os.path.join(work, "prepared.onnx")
        quant_pre_process(src, prepared, skip_symbolic_shape=True)  # fused, shapes inferred, as onnxruntime advises
        quantized = os.path.join(work, "int8.onnx")
        if mode == "dynamic":
            progress("int8: dynamic quantization of the MatMul weights")
            quantize_dynamic(prepared, quantized, op_types_to_quantize=QUANTIZED_OPS[mode], per_channel=False,
                             weight_type=QuantType.QInt8)
            note = "dynamic int8: MatMul weights int8, activations quantized per call"
        else:
            progress(f"int8: static quantization, calibrating on {len(calibration)} windows")
            input_name = onnx.load(src, load_external_data=False).graph.input[0].name
            quantize_static(prepared, quantized, _Windows(input_name, calibration), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=QUANTIZED_OPS[mode], per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
            note = f"static int8 (QDQ): MatMul and Conv, activation ranges from {len(calibration)} windows"
        model = onnx.load(quantized)
        _copy_metadata(src, model, note)

        def write(tmp: str) -> None:
            onnx.save(model, tmp)
            onnx.checker.check_model(tmp)

        create_file(dst, write)
    return note
