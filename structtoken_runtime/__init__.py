"""structtoken-runtime: a StructToken model exported to ONNX (``tools/export_model.py``), run with the
evaluation protocol of its config, on numpy, OpenCV and onnxruntime only (neither torch nor
detectron2 is imported). See docs/deployment.md."""
from .protocol import EvaluationProtocol, multi_scale_flip_probabilities, network_logits, single_scale_logits
from .session import (
    METADATA_KEYS, RuntimeModelError, StructTokenONNX, open_session, protocol_from_metadata, read_metadata,
)

__all__ = [
    "EvaluationProtocol", "METADATA_KEYS", "RuntimeModelError", "StructTokenONNX", "multi_scale_flip_probabilities",
    "network_logits", "open_session", "protocol_from_metadata", "read_metadata", "single_scale_logits",
]
