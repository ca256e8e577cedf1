"""Plain ViT backbone from timm, wrapped as a Detectron2 ``Backbone`` (the authors' mmseg ViT).

What matches mmseg's ``VisionTransformer`` as the authors configure it: patch 16, class token,
qkv bias, LayerNorm eps 1e-6, stochastic depth, the output of the *last* block with the class
token removed and no final LayerNorm (``final_norm=False``), reshaped to ``[B, C, H/16, W/16]``;
position embeddings resized bicubically (``align_corners=False``, no antialiasing) both when
loading a checkpoint of another grid and, at run time, to the input's grid; inputs whose sides
are not multiples of 16 are zero-padded at the bottom / right (mmseg's "corner" padding).

Weights come only from a local file (``MODEL.VIT.WEIGHTS``: timm, mmseg or augreg layout);
nothing is downloaded, ever.
"""
import logging
import math
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from ..checkpoint import CheckpointMismatchError, WeightsNotFoundError
from ..mmseg_names import is_mmseg_vit_layout, vit_name_to_ours

logger = logging.getLogger(__name__)

# Keys of a timm ViT checkpoint that a backbone without classifier (and, with final_norm=False,
# without final norm) does not use.
_UNUSED_PREFIXES = ("head.", "fc_norm.", "pre_logits.")
_WRAPPER_KEYS = ("state_dict", "model", "module")
_KEY_PREFIXES = ("module.", "backbone.", "vit.")


def resize_pos_embed(pos_embed: torch.Tensor, src_grid: Tuple[int, int], dst_grid: Tuple[int, int],
                     num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resize ``[1, prefix + Hs*Ws, C]`` position embeddings to ``dst_grid`` as mmseg does:
    bicubic, ``align_corners=False``, no antialiasing; prefix (class) tokens are kept."""
    if tuple(src_grid) == tuple(dst_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    c = grid.shape[-1]
    grid = grid.reshape(1, src_grid[0], src_grid[1], c).permute(0, 3, 1, 2)
    compute_dtype = torch.float64 if grid.dtype == torch.float64 else torch.float32  # no half-precision bicubic on CPU
    grid = F.interpolate(grid.to(compute_dtype), size=tuple(dst_grid), mode="bicubic", align_corners=False)
    grid = grid.to(pos_embed.dtype).flatten(2).transpose(1, 2)
    return torch.cat((prefix, grid), dim=1)


def _square_grid(num_tokens: int, num_prefix_tokens: int, path: str) -> Tuple[int, int]:
    side = math.isqrt(num_tokens - num_prefix_tokens)
    if side * side != num_tokens - num_prefix_tokens:
        raise ValueError(f"{path}: pos_embed has {num_tokens} tokens, not {num_prefix_tokens} + a square grid")
    return side, side


def patch_tokens(x: torch.Tensor, proj: nn.Conv2d) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """The patch embedding ``proj`` (kernel = stride, no padding) of ``x [B, C_in, H, W]`` (H, W
    multiples of the patch) as tokens ``[B, h*w, C]`` and the grid ``(h, w)``.

    Written as one matrix product of the flattened patches with ``proj``'s weight ``[C, C_in, p, p]``
    (the same sums as the convolution): on a CPU, oneDNN's backward of the 16x16 / 16 convolution
    took 2.8 ms of the main job's training step (bfloat16, 2 threads), the matrix product 0.75 ms
    (docs/speed.md). Any other convolution runs as it is."""
    kh, kw = proj.kernel_size
    if tuple(proj.stride) != (kh, kw) or tuple(proj.padding) != (0, 0) or tuple(proj.dilation) != (1, 1) \
            or proj.groups != 1:
        x = proj(x)
        return x.flatten(2).transpose(1, 2), tuple(x.shape[-2:])
    b, c_in, height, width = x.shape
    h, w = height // kh, width // kw
    patches = x.reshape(b, c_in, h, kh, w, kw).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c_in * kh * kw)
    return F.linear(patches, proj.weight.reshape(proj.out_channels, -1), proj.bias), (h, w)


@BACKBONE_REGISTRY.register()
class TimmViT(Backbone):
    """A timm ``VisionTransformer`` with one output, ``out_feature`` ``[B, C, H/p, W/p]`` (p = patch).

    ``MODEL.BACKBONE.NAME: "TimmViT"``, built from ``cfg.MODEL.VIT``.
    """

    @configurable
    def __init__(
        self,
        *,
        name: str,
        img_size: Sequence[int] = (512, 512),
        drop_path_rate: float = 0.1,
        final_norm: bool = False,
        weights: str = "",
        embed_dim: int = 0,
        depth: int = 0,
        num_heads: int = 0,
        fused_attention: bool = True,
        in_chans: int = 3,
        out_feature: str = "last_feat",
    ):
        """
        Args:
            name: timm architecture, e.g. ``vit_large_patch16_384`` (only the architecture is
                taken from timm; its pretrained weights are never fetched).
            img_size: input size the position embeddings are built for (the training crop).
            drop_path_rate: stochastic depth of the last block (linear from 0).
            final_norm: apply the ViT's final LayerNorm (False in the authors' configs).
            weights: local ImageNet checkpoint (see :func:`load_vit_weights`); "" = random init.
            embed_dim, depth, num_heads: override the architecture's values when non-zero (small
                models for tests).
            fused_attention: attention through ``F.scaled_dot_product_attention`` (timm's
                ``fused_attn``); False: the explicit ``softmax(q kᵀ) v`` (MODEL.VIT.FUSED_ATTENTION).
            in_chans: input channels.
            out_feature: name of the output feature.
        """
        super().__init__()
        overrides = {k: v for k, v in dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads).items() if v}
        self.arch = dict(name=name, in_chans=in_chans, **overrides)
        self.vit = timm.create_model(
            name, pretrained=False, img_size=tuple(img_size), num_classes=0, global_pool="",
            drop_path_rate=drop_path_rate, in_chans=in_chans, **overrides,
        )
        vit = self.vit
        if getattr(vit, "cls_token", None) is None or getattr(vit, "no_embed_class", False) or \
                getattr(vit, "reg_token", None) is not None or getattr(vit, "pos_embed", None) is None:
            raise ValueError(f"{name}: TimmViT needs a classic ViT (class token, absolute position "
                             f"embeddings covering it, no register tokens)")
        for block in vit.blocks:
            block.attn.fused_attn = fused_attention
        if not final_norm:
            vit.norm = nn.Identity()
        self.final_norm = final_norm
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.patch_size = tuple(vit.patch_embed.patch_size)
        self.pos_grid = tuple(vit.patch_embed.grid_size)
        self.embed_dim = vit.embed_dim
        self._out_feature = out_feature
        self._out_features = [out_feature]
        self._out_feature_channels = {out_feature: self.embed_dim}
        self._out_feature_strides = {out_feature: self.patch_size[0]}
        if weights:
            load_vit_weights(self, weights)
        else:
            logger.info(f"MODEL.VIT.WEIGHTS is empty: the {name} backbone is randomly initialised")

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        v = cfg.MODEL.VIT
        return {
            "name": v.NAME,
            "img_size": v.IMG_SIZE,
            "drop_path_rate": v.DROP_PATH_RATE,
            "final_norm": v.FINAL_NORM,
            "weights": v.WEIGHTS,
            "embed_dim": v.EMBED_DIM,
            "depth": v.DEPTH,
            "num_heads": v.NUM_HEADS,
            "fused_attention": v.FUSED_ATTENTION,
            "in_chans": input_shape.channels if input_shape is not None and input_shape.channels else 3,
        }

    @property
    def size_divisibility(self) -> int:
        return self.patch_size[0]

    def pos_embed_for(self, grid: Tuple[int, int]) -> torch.Tensor:
        """The position embeddings ``[1, 1 + h*w, C]`` for a ``grid = (h, w)`` token grid."""
        return resize_pos_embed(self.vit.pos_embed, self.pos_grid, grid, self.num_prefix_tokens)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``x [B, 3, H, W]`` (normalised) ``-> {out_feature: [B, C, ceil(H/16), ceil(W/16)]}``."""
        vit = self.vit
        ph, pw = self.patch_size
        pad_h, pad_w = -x.shape[-2] % ph, -x.shape[-1] % pw
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x, (h, w) = patch_tokens(x, vit.patch_embed.proj)  # [B, h*w, C]
        b, c = x.shape[0], x.shape[-1]
        x = vit.patch_embed.norm(x)
        x = torch.cat((vit.cls_token.expand(b, -1, -1), x), dim=1) + self.pos_embed_for((h, w))
        x = vit.norm_pre(vit.patch_drop(vit.pos_drop(x)))
        x = vit.norm(vit.blocks(x))
        x = x[:, self.num_prefix_tokens:].transpose(1, 2).reshape(b, c, h, w)
        return {self._out_feature: x}


# ---------------------------------------------------------------------------- weights
def _read_torch_state_dict(path: str) -> Dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path, device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    for prefix in _KEY_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _from_mmseg_layout(state: Dict[str, torch.Tensor], path: str) -> Dict[str, torch.Tensor]:
    """An mmseg ``VisionTransformer`` state dict (as mmseg's ``vit2mmseg`` writes it) -> timm names."""
    renamed = {k: vit_name_to_ours(k) for k in state}
    unknown = sorted(k for k, new in renamed.items() if new is None)
    if unknown:
        raise ValueError(f"{path}: mmseg ViT layout with keys no rule covers: {unknown}")
    logger.info(f"{path}: mmseg VisionTransformer layout, {len(state)} keys renamed to timm's")
    return {renamed[k]: v for k, v in state.items()}


def _read_npz_state_dict(backbone: TimmViT, path: str) -> Dict[str, torch.Tensor]:
    """Load a big_vision / augreg ``.npz`` with timm's own loader into a throw-away model of the
    same architecture at the checkpoint's grid, and return its state dict (so the position
    embeddings are then resized like those of every other checkpoint)."""
    with np.load(path) as npz:
        keys = [k for k in npz.files if k.endswith("pos_embedding")]
        if not keys:
            raise ValueError(f"{path}: no position embedding found; not a ViT .npz checkpoint")
        num_tokens = npz[keys[0]].shape[1]
    grid = _square_grid(num_tokens, backbone.num_prefix_tokens, path)
    arch = dict(backbone.arch)
    donor = timm.create_model(arch.pop("name"), pretrained=False, num_classes=0, global_pool="",
                              img_size=(grid[0] * backbone.patch_size[0], grid[1] * backbone.patch_size[1]), **arch)
    donor.load_pretrained(path)
    return donor.state_dict()


def check_vit_weights_file(path: str) -> None:
    """Raise :class:`WeightsNotFoundError` unless ``path`` (``MODEL.VIT.WEIGHTS``) is empty or a file."""
    if path and not os.path.isfile(path):
        raise WeightsNotFoundError(f"MODEL.VIT.WEIGHTS: no such file: {path!r} (weights are never downloaded; give a "
                                   f"local timm or mmseg .pth/.safetensors or augreg .npz, or '' for random init)")


def load_vit_weights(backbone: TimmViT, path: str) -> None:
    """Load ImageNet weights from a local file into ``backbone.vit``.

    Accepted: a timm ViT state dict saved as ``.pth`` / ``.pt`` / ``.bin`` (``torch.save``; may be
    wrapped in ``{"state_dict": ...}`` / ``{"model": ...}`` or prefixed ``module.``) or
    ``.safetensors``; the same in mmseg's ``VisionTransformer`` names (``patch_embed.projection``,
    ``layers.N``, as mmseg's ``vit2mmseg`` writes the ``vit_*_p16_384.pth`` the authors' configs
    load; detected from the keys, renamed by :mod:`..mmseg_names`); or a big_vision / augreg
    ``.npz`` (read by timm's loader). Position
    embeddings of another grid are resized (:func:`resize_pos_embed`). The classifier and, with
    ``final_norm=False``, the final norm are ignored; any other missing or unexpected key raises
    :class:`CheckpointMismatchError`, a missing file :class:`WeightsNotFoundError`.
    """
    check_vit_weights_file(path)
    state = _read_npz_state_dict(backbone, path) if path.endswith(".npz") else _read_torch_state_dict(path)
    if any(k.startswith(("decode_head.", "sem_seg_head.")) for k in state):
        raise CheckpointMismatchError(f"MODEL.VIT.WEIGHTS {path} is a whole segmentation model, not ViT weights: load it with "
                         f"MODEL.WEIGHTS (an mmseg checkpoint of the authors: convert it first with "
                         f"tools/convert_mmseg_checkpoint.py)")
    if is_mmseg_vit_layout(state):
        state = _from_mmseg_layout(state, path)
    unused = [k for k in state if k.startswith(_UNUSED_PREFIXES) or (not backbone.final_norm and k.startswith("norm."))]
    state = {k: v for k, v in state.items() if k not in unused}
    if "pos_embed" in state and state["pos_embed"].shape != backbone.vit.pos_embed.shape:
        src = _square_grid(state["pos_embed"].shape[1], backbone.num_prefix_tokens, path)
        logger.info(f"{path}: resizing pos_embed from grid {src} to {backbone.pos_grid}")
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], src, backbone.pos_grid, backbone.num_prefix_tokens)
    missing, unexpected = backbone.vit.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointMismatchError(f"MODEL.VIT.WEIGHTS {path} does not fit {backbone.arch}: missing keys {missing}, "
                                      f"unexpected keys {unexpected}")
    logger.info(f"Loaded ViT weights from {path}" + (f" (ignored: {', '.join(unused)})" if unused else ""))
