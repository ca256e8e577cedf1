"""The feed-forward network of StructToken (Sec. III-C; ``GroupConvBlock`` in the authors' code)."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

from ... import ops
from .pointwise import Conv1x1


class GroupConvFFN(nn.Module):
    """``1x1 (D->rD) -> LN -> GELU -> 3x3 group conv (rD->rD, groups=D) -> LN -> GELU -> 1x1 (rD->D) -> LN``,
    then ``x + DropPath(.)``, then GELU (the authors apply a final activation after the residual).

    The 3x3 group convolution (``r`` channels per group) between the two point-wise layers is the
    paper's "lightweight 3x3 group convolution" (Table III). The middle ``LN -> GELU -> 3x3 ->
    LN -> GELU`` runs through :func:`structtoken_d2.ops.depthwise_projection`.

    LayerNorm eps: the authors build these norms from the head's ``norm_cfg=dict(type='LN')``,
    which mmcv completes with eps 1e-5 (unlike the projections' hard-coded 1e-6); see
    ``MODEL.STRUCTTOKEN.FFN_LN_EPS``.

    Channels-last: ``[B, H, W, D] -> [B, H, W, D]``.
    """

    def __init__(self, embed_dims: int, expand_ratio: int = 4, drop_path: float = 0.0, eps: float = 1e-5):
        super().__init__()
        hidden = embed_dims * expand_ratio
        self.eps = eps
        self.pwconv1 = Conv1x1(embed_dims, hidden)
        self.norm1 = nn.LayerNorm(hidden, eps=eps)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=embed_dims)
        self.norm2 = nn.LayerNorm(hidden, eps=eps)
        self.pwconv2 = Conv1x1(hidden, embed_dims)
        self.norm3 = nn.LayerNorm(embed_dims, eps=eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        x = self.pwconv1(x)
        x = ops.depthwise_projection(
            x, self.norm1.weight, self.norm1.bias, self.dwconv.weight, self.dwconv.bias,
            self.norm2.weight, self.norm2.bias, self.eps,
        )
        x = self.norm3(self.pwconv2(x))
        return F.gelu(identity + self.drop_path(x))
