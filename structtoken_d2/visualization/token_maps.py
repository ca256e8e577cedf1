"""The structure-token maps of a StructToken head (paper Fig. 4), read with forward hooks.

Stages, in order: ``S`` the learned tokens resized to the feature grid (what the first block
receives), ``S1`` ... ``SL`` the tokens each extraction block outputs, ``Y`` the score map of the
final ResBlock (the head's logits). Each map is ``[K, h, w]`` on the stride-16 feature grid.
"""
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F


def stage_names(num_blocks: int) -> List[str]:
    """``["S", "S1", ..., "S<num_blocks>", "Y"]``."""
    return ["S"] + [f"S{i}" for i in range(1, num_blocks + 1)] + ["Y"]


class TokenMapRecorder:
    """Context manager that hooks a StructTokenHead and records one forward's token maps.

    ``with TokenMapRecorder(head) as rec: model(...)``; then ``rec.maps()`` is
    ``{stage: [B, K, h, w] float32}`` (channels-first, detached). The blocks pass tokens
    channels-last ``[B, h, w, K]``; ``S`` is the first block's input, ``S<i>`` block i's output
    tokens, ``Y`` the ResBlock's output. ``rec.feature()`` is the backbone feature the head
    decoded, ``[B, C, h, w]``.
    """

    def __init__(self, head: torch.nn.Module):
        if not hasattr(head, "layers") or not hasattr(head, "residual_block"):
            raise TypeError(f"{type(head).__name__} is not a StructTokenHead (no 'layers' / 'residual_block')")
        self.head = head
        self.names = stage_names(len(head.layers))
        self._records: Dict[str, List[torch.Tensor]] = {}
        self._features: List[torch.Tensor] = []
        self._handles = []

    def _record(self, name: str, tokens: torch.Tensor, channels_last: bool) -> None:
        maps = tokens.detach().float()
        self._records[name].append(maps.permute(0, 3, 1, 2) if channels_last else maps)

    def __enter__(self) -> "TokenMapRecorder":
        self._records = {name: [] for name in self.names}
        self._features = []
        self._handles.append(self.head.register_forward_pre_hook(
            lambda module, args: self._features.append(args[0][module.in_feature].detach().float())))
        layers = self.head.layers
        self._handles.append(layers[0].register_forward_pre_hook(
            lambda module, args: self._record("S", args[0], channels_last=True)))
        for i, layer in enumerate(layers, 1):
            self._handles.append(layer.register_forward_hook(
                lambda module, args, out, name=f"S{i}": self._record(name, out[0], channels_last=True)))
        self._handles.append(self.head.residual_block.register_forward_hook(
            lambda module, args, out: self._record("Y", out, channels_last=False)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def maps(self) -> Dict[str, torch.Tensor]:
        """``{stage: [B, K, h, w]}`` of the one forward recorded; a RuntimeError when the head ran
        another number of times (e.g. sliding-window inference)."""
        counts = {name: len(v) for name, v in self._records.items()}
        if set(counts.values()) != {1}:
            raise RuntimeError(f"expected exactly one head forward while recording, got {counts}")
        return {name: v[0] for name, v in self._records.items()}

    def feature(self) -> torch.Tensor:
        """The backbone feature ``[B, C, h, w]`` of the one forward recorded."""
        if len(self._features) != 1:
            raise RuntimeError(f"expected exactly one head forward while recording, got {len(self._features)}")
        return self._features[0]


class TokenMaps(NamedTuple):
    """One image's maps at its original size: ``maps [S, K, H, W]`` and ``logits [K, H, W]``;
    ``names``: the S stages; ``feature [C, H, W]``: the backbone feature, when asked for."""

    names: List[str]
    maps: torch.Tensor
    logits: torch.Tensor
    feature: Optional[torch.Tensor] = None


@torch.no_grad()
def predict_token_maps(model, inputs: Dict, with_feature: bool = False) -> TokenMaps:
    """One whole-image pass of ``model`` (a StructTokenSegmentor in eval mode) on a mapped input
    (``"image" [3, H', W']``, optional original ``"height"``, ``"width"``).

    The stride-16 maps are brought to the image the way the logits are: the model's
    :meth:`resize_logits` (``TEST.LOGITS_RESIZE``) to ``(H', W')``, then bilinear to ``(height,
    width)``, as the segmentor does in "whole" mode; so ``maps[-1]`` equals ``logits``, the pass's
    output. ``with_feature``: the backbone feature too, brought to the image the same way (C maps
    of the image's size: 1 GB for a 512 x 512 image and C = 1024)."""
    image = inputs["image"]
    with TokenMapRecorder(model.sem_seg_head) as recorder:
        logits = model.inference_logits(image[None], mode="whole")
    recorded = recorder.maps()
    size = (inputs.get("height", image.shape[-2]), inputs.get("width", image.shape[-1]))

    def to_image(grid):  # [N, D, h, w] -> [N, D, height, width]
        grid = model.resize_logits(grid, image.shape[-2:])
        if tuple(grid.shape[-2:]) != tuple(size):
            grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
        return grid

    maps = to_image(torch.stack([recorded[name][0] for name in recorder.names]))  # [S, K, H, W]
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    feature = to_image(recorder.feature())[0].cpu() if with_feature else None
    return TokenMaps(recorder.names, maps.cpu(), logits[0].float().cpu(), feature)
