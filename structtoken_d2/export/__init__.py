"""Deployment: the segmentor exported to ONNX with its evaluation settings (:mod:`.onnx_export`) and
its int8 versions (:mod:`.onnx_quantization`); ``structtoken_runtime`` runs them."""
from .onnx_export import (
    DEFAULT_OPSET, DEFAULT_TOLERANCE, INPUT_DTYPES, ExportableSegmentor, ExportCheck, ExportError, class_names_of,
    compare_with_pytorch, export_onnx, fixed_image_size, runtime_metadata,
)

__all__ = [
    "DEFAULT_OPSET", "DEFAULT_TOLERANCE", "INPUT_DTYPES", "ExportCheck", "ExportError", "ExportableSegmentor",
    "class_names_of", "compare_with_pytorch", "export_onnx", "fixed_image_size", "runtime_metadata",
]
