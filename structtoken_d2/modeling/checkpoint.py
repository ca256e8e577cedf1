"""Class-count checks for checkpoints, and a Detectron2 checkpointer that applies them.

Detectron2's (fvcore's) checkpointer drops parameters whose shapes differ from the model's with
only a warning, so a checkpoint trained for another dataset would load "successfully" with
randomly initialised structure tokens and final block. :class:`StructTokenCheckpointer` raises
instead; ``model.load_state_dict`` raises the same error through the head.
"""
from typing import Sequence

from detectron2.checkpoint import DetectionCheckpointer

TOKENS_KEY = "sem_seg_head.tokens"


class ClassCountMismatchError(ValueError):
    """A checkpoint or dataset has a different number of classes from MODEL.SEM_SEG_HEAD.NUM_CLASSES."""


def check_num_classes(tokens_shape: Sequence[int], num_classes: int, key: str = TOKENS_KEY) -> None:
    """Raise :class:`ClassCountMismatchError` unless the tokens ``[1, K, Hs, Ws]`` have K == num_classes."""
    if len(tokens_shape) != 4 or tokens_shape[1] != num_classes:
        found = tokens_shape[1] if len(tokens_shape) == 4 else "?"
        raise ClassCountMismatchError(
            f"checkpoint has {found} classes ({key} of shape {list(tokens_shape)}) but the model is built "
            f"for {num_classes} (MODEL.SEM_SEG_HEAD.NUM_CLASSES): use a checkpoint of this dataset, or set "
            f"NUM_CLASSES to match"
        )


def _unwrap(model):
    return getattr(model, "module", model)  # DistributedDataParallel


class StructTokenCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that refuses a checkpoint whose class count differs from the model's."""

    def _load_model(self, checkpoint):
        model = _unwrap(self.model)
        head = getattr(model, "sem_seg_head", None)
        state = checkpoint.get("model", {})
        for key in (TOKENS_KEY, "module." + TOKENS_KEY):
            if head is not None and key in state:
                check_num_classes(tuple(state[key].shape), head.num_classes, key)
        return super()._load_model(checkpoint)
