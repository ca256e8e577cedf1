"""Extraction modules of StructToken (paper Sec. III-B): one decoder block each, chosen by
``MODEL.STRUCTTOKEN.VARIANT`` from :data:`EXTRACTION_REGISTRY`.

Every block maps ``(tokens [B, H, W, K], feature [B, H, W, C]) -> (tokens, feature)``,
channels-last, and is built as ``block(channels=C, num_classes=K, ffn_ratio, drop_path,
is_last, attn_scale, ln_eps, ffn_ln_eps)``. The structure follows the authors' code
(RockeyCoss/StructToken), which differs from the paper in places noted per class.
"""
import torch
import torch.nn as nn
from detectron2.utils.registry import Registry
from timm.layers import DropPath

from ... import ops
from ..layers import Conv1x1, DepthwiseProjection, GroupConvFFN

EXTRACTION_REGISTRY = Registry("STRUCTTOKEN_EXTRACTION")
EXTRACTION_REGISTRY.__doc__ = """Extraction blocks of the StructToken head, by MODEL.STRUCTTOKEN.VARIANT."""

ATTN_SCALES = ("spatial", "channel")


def build_extraction_block(variant: str, **kwargs) -> nn.Module:
    """The block registered as ``variant`` ("CSE", "SSE", "PWE"); a ValueError lists the valid names."""
    if variant not in EXTRACTION_REGISTRY:
        valid = ", ".join(sorted(name for name, _ in EXTRACTION_REGISTRY))
        raise ValueError(f"MODEL.STRUCTTOKEN.VARIANT={variant!r} is not an extraction module; valid: {valid}")
    return EXTRACTION_REGISTRY.get(variant)(**kwargs)


class SliceAttention(nn.Module):
    """Channel-wise ("slice") attention with local projections (Eq. 1-3 and 5-6; ``AttentionLayer``).

    Each channel slice of length N = H*W is one token:
    ``q = Phi_q(query) [B, M, N]``, ``k = Phi_k(kv), v = Phi_v(kv) [B, C_kv, N]``,
    ``out = query + DropPath(Phi_out(softmax(q k^T * scale) v))``, where the softmax runs over the
    C_kv key slices and the product goes through :func:`structtoken_d2.ops.slice_attention`.

    ``attn_scale``: "spatial" uses ``N ** -0.5`` as the authors' code does (the slices have length
    N); "channel" uses ``feature_channels ** -0.5``, the ``1/sqrt(C)`` that Eq. 2 and 6 write.
    The authors' attention / projection dropouts are 0 in every config and are left out.
    """

    def __init__(self, query_dim: int, kv_dim: int, feature_channels: int, drop_path: float = 0.0,
                 attn_scale: str = "spatial", eps: float = 1e-6):
        super().__init__()
        if attn_scale not in ATTN_SCALES:
            raise ValueError(f"MODEL.STRUCTTOKEN.ATTN_SCALE={attn_scale!r}; valid: {', '.join(ATTN_SCALES)}")
        self.attn_scale = attn_scale
        self.feature_channels = feature_channels
        self.query_map = DepthwiseProjection(query_dim, query_dim, eps)
        self.key_map = DepthwiseProjection(kv_dim, kv_dim, eps)
        self.value_map = DepthwiseProjection(kv_dim, kv_dim, eps)
        self.out_project = DepthwiseProjection(query_dim, query_dim, eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, query: torch.Tensor, key_value: torch.Tensor) -> torch.Tensor:
        b, h, w, m = query.shape
        n = h * w

        def slices(x):  # [B, H, W, C] -> [B, C, N]
            return x.reshape(b, n, x.shape[-1]).transpose(1, 2).contiguous()

        q = slices(self.query_map(query))
        k = slices(self.key_map(key_value))
        v = slices(self.value_map(key_value))
        scale = n ** -0.5 if self.attn_scale == "spatial" else self.feature_channels ** -0.5
        x = ops.slice_attention(q, k, v, scale)  # [B, M, N]
        x = x.transpose(1, 2).reshape(b, h, w, m)
        return query + self.drop_path(self.out_project(x))


@EXTRACTION_REGISTRY.register()
class CSE(nn.Module):
    """Cross-slice extraction (Sec. III-B1): the structure tokens query the feature.

    ``tokens = SliceAttention(q=tokens, kv=feature)`` (projections Phi_q, Phi_out over K channels,
    Phi_k, Phi_v over C); ``tokens = FFN_K(tokens)``; ``feature = FFN_C(feature)`` except in the
    last block, whose feature is not used afterwards.
    """

    def __init__(self, *, channels: int, num_classes: int, ffn_ratio: int = 4, drop_path: float = 0.0,
                 is_last: bool = False, attn_scale: str = "spatial", ln_eps: float = 1e-6, ffn_ln_eps: float = 1e-5):
        super().__init__()
        self.cross_attn = SliceAttention(num_classes, channels, channels, drop_path, attn_scale, ln_eps)
        self.ffn1 = GroupConvFFN(num_classes, ffn_ratio, drop_path, ffn_ln_eps)
        self.ffn2 = None if is_last else GroupConvFFN(channels, ffn_ratio, drop_path, ffn_ln_eps)

    def forward(self, tokens: torch.Tensor, feature: torch.Tensor):
        tokens = self.ffn1(self.cross_attn(tokens, feature))
        if self.ffn2 is not None:
            feature = self.ffn2(feature)
        return tokens, feature


class _ConcatExtraction(nn.Module):
    """Shared by SSE and PWE: ``G = cat(tokens, feature)`` over channels, ``G = interact(G)``,
    ``G = FFN_{K+C}(G)`` (one FFN over the concatenation, in every block, as in the authors' code;
    the paper describes two FFNs), then split back into tokens and feature."""

    def __init__(self, channels: int, num_classes: int, ffn_ratio: int, drop_path: float, ffn_ln_eps: float):
        super().__init__()
        self.num_classes = num_classes
        self.ffn1 = GroupConvFFN(channels + num_classes, ffn_ratio, drop_path, ffn_ln_eps)

    def interact(self, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, tokens: torch.Tensor, feature: torch.Tensor):
        g = self.ffn1(self.interact(torch.cat((tokens, feature), dim=-1)))
        return g[..., : self.num_classes], g[..., self.num_classes:]


@EXTRACTION_REGISTRY.register()
class SSE(_ConcatExtraction):
    """Self-slice extraction (Sec. III-B2): channel-wise self-attention over ``G = cat(S, F)``,
    all four projections over K+C channels, residual on G (Eq. 4-7)."""

    def __init__(self, *, channels: int, num_classes: int, ffn_ratio: int = 4, drop_path: float = 0.0,
                 is_last: bool = False, attn_scale: str = "spatial", ln_eps: float = 1e-6, ffn_ln_eps: float = 1e-5):
        super().__init__(channels, num_classes, ffn_ratio, drop_path, ffn_ln_eps)
        dim = channels + num_classes
        self.cross_attn = SliceAttention(dim, dim, channels, drop_path, attn_scale, ln_eps)

    def interact(self, g):
        return self.cross_attn(g, g)


class PointwiseInteraction(nn.Module):
    """``G + DropPath(Upsilon_out(Omega(Upsilon(G))))`` with Omega a 1x1 convolution with bias
    (Eq. 8-9; ``PWConvAttentionLayer`` in the authors' code, which adds the output projection
    Upsilon_out and the residual)."""

    def __init__(self, dim: int, drop_path: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.query_map = DepthwiseProjection(dim, dim, eps)
        self.attn_pw_conv = Conv1x1(dim, dim)
        self.out_project = DepthwiseProjection(dim, dim, eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return g + self.drop_path(self.out_project(self.attn_pw_conv(self.query_map(g))))


@EXTRACTION_REGISTRY.register()
class PWE(_ConcatExtraction):
    """Point-wise extraction (Sec. III-B3): a content-agnostic 1x1 convolution mixes the slices of
    ``G = cat(S, F)``. ``attn_scale`` is accepted for a uniform signature and unused."""

    def __init__(self, *, channels: int, num_classes: int, ffn_ratio: int = 4, drop_path: float = 0.0,
                 is_last: bool = False, attn_scale: str = "spatial", ln_eps: float = 1e-6, ffn_ln_eps: float = 1e-5):
        super().__init__(channels, num_classes, ffn_ratio, drop_path, ffn_ln_eps)
        self.attn = PointwiseInteraction(channels + num_classes, drop_path, ln_eps)

    def interact(self, g):
        return self.attn(g)
