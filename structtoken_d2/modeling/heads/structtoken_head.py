"""The StructToken decode head (paper Sec. III-A, Fig. 2)."""
from typing import Dict, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from ..checkpoint import check_num_classes
from ..layers import Conv1x1, ResBlock, init_structtoken_weights
from .extraction import build_extraction_block

_ALIGNABLE_MODES = ("linear", "bilinear", "bicubic", "trilinear")


@SEM_SEG_HEADS_REGISTRY.register()
class StructTokenHead(nn.Module):
    """Learned structure tokens that progressively extract category structure from the feature.

    ``feature [B, C_in, H, W]`` (stride 16) ``-> dec_proj`` (1x1, C_in -> C) ``->`` ``num_blocks``
    extraction blocks (CSE / SSE / PWE, drop path linearly spaced from 0 to ``drop_path_rate``)
    that update the structure tokens ``[K, Hs, Ws]`` (resized to ``(H, W)`` when they differ)
    ``-> ResBlock(K, K) ->`` logits ``[B, K, H, W]`` at the feature's resolution; the segmentor
    upsamples them and computes the loss. The authors' base config has no auxiliary head, and
    neither has this one.

    Internally everything runs channels-last ``[B, H, W, C]``. Parameter names follow the
    authors' code (``dec_proj``, ``layers``, ``residual_block``; their ``kernels`` is ``tokens``).
    """

    @configurable
    def __init__(
        self,
        *,
        in_feature: str,
        in_channels: int,
        num_classes: int,
        channels: int = 0,
        variant: str = "CSE",
        num_blocks: int = 4,
        token_size: Sequence[int] = (32, 32),
        token_interpolation: str = "bicubic",
        token_init_std: float = 0.02,
        ffn_ratio: int = 4,
        drop_path_rate: float = 0.1,
        attn_scale: str = "spatial",
        ln_eps: float = 1e-6,
        ffn_ln_eps: float = 1e-5,
    ):
        """
        Args:
            in_feature: name of the backbone output to decode.
            in_channels: its channels.
            num_classes: K, the number of structure tokens (one per category).
            channels: decoder width C; 0 means ``in_channels``.
            variant: extraction module, a name in ``EXTRACTION_REGISTRY``.
            num_blocks: decoder blocks L.
            token_size: ``(Hs, Ws)`` of the learned tokens, crop / 16 in the authors' configs.
            token_interpolation: ``F.interpolate`` mode used to resize the tokens; ``align_corners``
                is True iff Hs or Ws is odd, as in the authors' code.
            token_init_std: std of the tokens' truncated-normal initialisation.
            ffn_ratio, drop_path_rate, attn_scale, ln_eps, ffn_ln_eps: see the config keys
                ``MODEL.STRUCTTOKEN.*`` of the same names.
        """
        super().__init__()
        channels = channels or in_channels
        self.in_feature = in_feature
        self.num_classes = num_classes
        self.token_size = tuple(int(s) for s in token_size)
        self.token_interpolation = token_interpolation
        self.token_init_std = token_init_std
        odd = any(s % 2 for s in self.token_size)
        self.align_corners = odd if token_interpolation in _ALIGNABLE_MODES else None

        self.dec_proj = Conv1x1(in_channels, channels)
        self.tokens = nn.Parameter(torch.zeros(1, num_classes, *self.token_size))
        rates = torch.linspace(0, drop_path_rate, num_blocks, device="cpu").tolist()
        self.layers = nn.ModuleList(
            build_extraction_block(
                variant, channels=channels, num_classes=num_classes, ffn_ratio=ffn_ratio,
                drop_path=rates[i], is_last=i == num_blocks - 1, attn_scale=attn_scale,
                ln_eps=ln_eps, ffn_ln_eps=ffn_ln_eps,
            )
            for i in range(num_blocks)
        )
        self.residual_block = ResBlock(num_classes, num_classes)
        self.init_weights()

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        in_features = list(cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES)
        if len(in_features) != 1 or in_features[0] not in input_shape:
            raise ValueError(
                f"StructTokenHead decodes one backbone feature: MODEL.SEM_SEG_HEAD.IN_FEATURES must name "
                f"one of {sorted(input_shape)}, got {in_features}"
            )
        st = cfg.MODEL.STRUCTTOKEN
        return {
            "in_feature": in_features[0],
            "in_channels": input_shape[in_features[0]].channels,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "channels": st.CHANNELS,
            "variant": st.VARIANT,
            "num_blocks": st.NUM_BLOCKS,
            "token_size": st.TOKEN_SIZE,
            "token_interpolation": st.TOKEN_INTERPOLATION,
            "token_init_std": st.TOKEN_INIT_STD,
            "ffn_ratio": st.FFN_RATIO,
            "drop_path_rate": st.DROP_PATH_RATE,
            "attn_scale": st.ATTN_SCALE,
            "ln_eps": st.LN_EPS,
            "ffn_ln_eps": st.FFN_LN_EPS,
        }

    def init_weights(self) -> None:
        """Tokens: truncated normal (std ``token_init_std``); layers: :func:`init_structtoken_weights`."""
        nn.init.trunc_normal_(self.tokens, std=self.token_init_std)
        init_structtoken_weights(self)

    def structure_tokens(self, size) -> torch.Tensor:
        """The learned tokens ``[1, K, H, W]`` resized to the feature size ``(H, W)``."""
        if tuple(size) == self.token_size:
            return self.tokens
        return F.interpolate(self.tokens, size=tuple(size), mode=self.token_interpolation,
                             align_corners=self.align_corners)

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``features[in_feature] [B, C_in, H, W] -> logits [B, K, H, W]``."""
        x = features[self.in_feature]
        b, _, h, w = x.shape
        feature = self.dec_proj(x.permute(0, 2, 3, 1))
        tokens = self.structure_tokens((h, w)).permute(0, 2, 3, 1).expand(b, -1, -1, -1)
        for layer in self.layers:
            tokens, feature = layer(tokens, feature)
        return self.residual_block(tokens)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "tokens"
        if key in state_dict:
            check_num_classes(tuple(state_dict[key].shape), self.num_classes, key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
