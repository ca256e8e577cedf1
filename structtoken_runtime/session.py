"""A StructToken model exported by ``tools/export_model.py``, run by onnxruntime: what its metadata
says (:data:`METADATA_KEYS`) and :class:`StructTokenONNX`, the class applications use.

::

    from structtoken_runtime import StructTokenONNX
    model = StructTokenONNX("shapes.onnx", threads=2)
    labels = model.segment(cv2.imread("x.png"))         # [H, W] class indices (train ids)
    scores = model.predict(cv2.imread("x.png"), tta=True)  # [K, H, W] mean probabilities
    print(model.class_names[labels[0, 0]])
"""
import dataclasses
import json
from typing import Dict, List, Optional, Sequence

import numpy as np

from .protocol import EvaluationProtocol, multi_scale_flip_probabilities, single_scale_logits

#: Metadata the exporter writes into the ONNX file (``metadata_props``, values JSON) and the runtime reads.
METADATA_KEYS = {
    "config": "the full config (YAML) the model was built and exported with",
    "class_names": "K class names, index = train id (the test dataset's stuff_classes)",
    "input_format": "channel order of the input pixels: INPUT.FORMAT (RGB or BGR)",
    "pixel_mean": "MODEL.PIXEL_MEAN (the normalisation is inside the graph)",
    "pixel_std": "MODEL.PIXEL_STD",
    "test_scale": "TEST.SCALE: (long side, short side) of the keep-ratio test resize",
    "test_mode": "TEST.MODE: whole or slide",
    "slide_crop_size": "TEST.SLIDE_CROP_SIZE (h, w)",
    "slide_stride": "TEST.SLIDE_STRIDE (h, w)",
    "slide_batch": "TEST.SLIDE_BATCH: windows per network call",
    "logits_resize": "TEST.LOGITS_RESIZE: the rule inside the graph (for information)",
    "aug_enabled": "TEST.AUG.ENABLED: whether the config evaluates with multi-scale + flip",
    "aug_ratios": "TEST.AUG.RATIOS",
    "aug_flip": "TEST.AUG.FLIP",
    "image_size": "[h, w] the graph is fixed to (--image-size), or null: any size",
    "quantization": "null (float32), or how the weights were quantized to int8",
}


class RuntimeModelError(ValueError):
    """An ONNX file that is not a structtoken-d2 export, or an input it cannot take; the message says which."""


def read_metadata(session, path: str) -> Dict:
    """The structtoken-d2 metadata (:data:`METADATA_KEYS`, decoded) of the model of the onnxruntime ``session``, read
    from the ONNX file ``path`` (named in errors)."""
    props = session.get_modelmeta().custom_metadata_map
    missing = [key for key in METADATA_KEYS if key not in props]
    if missing:
        raise RuntimeModelError(f"{path}: not a structtoken-d2 export (metadata {', '.join(missing)} missing): "
                                f"export it with tools/export_model.py")
    return {key: props[key] if key == "config" else json.loads(props[key]) for key in METADATA_KEYS}


def open_session(path: str, threads: Optional[int] = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",), spinning: bool = True):
    """An ``onnxruntime.InferenceSession`` of ``path`` with every graph optimisation, ``threads``
    intra-op threads (None: onnxruntime's default, one per core) and one inter-op thread. ``spinning``:
    whether idle worker threads spin (onnxruntime's default; off, they leave the cores to other work
    at once, as when sharing the CPU with PyTorch's threads). (onnxruntime is imported here: the
    tools import this package for its error type only.)"""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(path, options, providers=list(providers))
    except Exception as e:  # onnxruntime raises its own exception types for a missing or invalid file
        raise RuntimeModelError(f"{path}: onnxruntime cannot load it: {' '.join(str(e).split())[:300]}") from None


def protocol_from_metadata(meta: Dict) -> EvaluationProtocol:
    """The :class:`EvaluationProtocol` that the exported config evaluates with."""
    return EvaluationProtocol(
        scale=tuple(meta["test_scale"]), mode=meta["test_mode"], crop_size=tuple(meta["slide_crop_size"]),
        stride=tuple(meta["slide_stride"]), batch=int(meta["slide_batch"]), ratios=tuple(meta["aug_ratios"]),
        flip=bool(meta["aug_flip"]))


class StructTokenONNX:
    """An exported StructToken model and the evaluation protocol of its config, on onnxruntime.

    :meth:`predict` gives what ``tools/train_net.py --eval-only`` scores for an image: logits (single
    scale) or mean probabilities (multi-scale + flip) ``[K, H, W]`` at the image's size.
    """

    def __init__(self, path: str, threads: Optional[int] = None, providers: Sequence[str] = ("CPUExecutionProvider",),
                 slide_batch: Optional[int] = None, spinning: bool = True):
        """
        Args:
            path: an ONNX file written by ``tools/export_model.py``.
            threads: onnxruntime's intra-op threads (None: its default, one per core).
            providers: onnxruntime execution providers, in order of preference.
            slide_batch: windows per network call (None: the config's ``TEST.SLIDE_BATCH``).
            spinning: whether onnxruntime's idle worker threads spin (see :func:`open_session`).
        """
        self.path = path
        self.session = open_session(path, threads, providers, spinning)
        self.metadata = read_metadata(self.session, path)
        graph_input = self.session.get_inputs()[0]
        self._input_name = graph_input.name
        self._input_dtype = np.uint8 if graph_input.type == "tensor(uint8)" else np.float32
        self.protocol = protocol_from_metadata(self.metadata)
        if slide_batch is not None:
            self.protocol = dataclasses.replace(self.protocol, batch=slide_batch)

    @property
    def class_names(self) -> List[str]:
        return list(self.metadata["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.metadata["class_names"])

    @property
    def input_format(self) -> str:
        """The channel order the network takes (``INPUT.FORMAT``)."""
        return self.metadata["input_format"]

    def network(self, images: np.ndarray) -> np.ndarray:
        """The exported network: ``[B, 3, h, w]`` pixels in :attr:`input_format` ``->`` logits
        ``[B, K, h, w]`` float32 (normalisation and the ``TEST.LOGITS_RESIZE`` rule inside)."""
        fixed = self.metadata["image_size"]
        if fixed is not None and tuple(images.shape[-2:]) != tuple(fixed):
            raise RuntimeModelError(
                f"{self.path} was exported for {fixed[0]}x{fixed[1]} inputs only, this pass is "
                f"{images.shape[-2]}x{images.shape[-1]}: export with --dynamic for any size")
        return self.session.run(None, {self._input_name: images.astype(self._input_dtype, copy=False)})[0]

    def predict(self, image: np.ndarray, image_format: str = "BGR", tta: Optional[bool] = None) -> np.ndarray:
        """Scores ``[K, H, W]`` float32 of ``image [H, W, 3]`` (uint8, channel order ``image_format``:
        BGR as ``cv2.imread`` reads, or RGB): logits, or with ``tta`` the mean multi-scale + flip
        probabilities (None: the config's ``TEST.AUG.ENABLED``). The argmax over K is the prediction."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise RuntimeModelError(f"expected an image [H, W, 3], got an array of shape {image.shape}")
        if image_format not in ("RGB", "BGR"):
            raise RuntimeModelError(f"image_format {image_format!r}: valid: RGB, BGR")
        if image_format != self.input_format:
            image = image[:, :, ::-1]
        image = np.ascontiguousarray(image)
        tta = self.metadata["aug_enabled"] if tta is None else tta
        if tta:
            return multi_scale_flip_probabilities(self.network, image, self.protocol)
        return single_scale_logits(self.network, image, self.protocol)

    def segment(self, image: np.ndarray, image_format: str = "BGR", tta: Optional[bool] = None) -> np.ndarray:
        """The predicted class of every pixel, ``[H, W]`` int64 (see :meth:`predict`)."""
        return self.predict(image, image_format, tta).argmax(0)
