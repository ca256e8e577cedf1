"""The local projection of StructToken (Phi, Psi, Upsilon in the paper; ``DepthWiseConvBlock`` in the authors' code)."""
import torch
import torch.nn as nn

from ... import ops
from .pointwise import Conv1x1


class DepthwiseProjection(nn.Module):
    """``1x1 (in->in) -> LN -> GELU -> 3x3 depthwise -> LN -> GELU -> 1x1 (in->out) -> LN``.

    Eq. 3 of the paper: a 3x3 depthwise convolution between two point-wise ones, so that the
    projection of each channel slice works at any spatial size. Every LayerNorm normalises over
    channels (eps 1e-6 in the authors' code). The middle ``LN -> GELU -> 3x3 dw -> LN -> GELU``
    runs through :func:`structtoken_d2.ops.depthwise_projection` (fused kernel where built).

    Input and output are channels-last: ``[B, H, W, in_channels] -> [B, H, W, out_channels]``.
    Parameters: ``in*in + in`` (conv1) ``+ 2*in`` (norm1) ``+ 10*in`` (conv2) ``+ 2*in`` (norm2)
    ``+ in*out + out`` (conv3) ``+ 2*out`` (norm3).
    """

    def __init__(self, in_channels: int, out_channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.conv1 = Conv1x1(in_channels, in_channels)
        self.norm1 = nn.LayerNorm(in_channels, eps=eps)
        self.conv2 = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels)
        self.norm2 = nn.LayerNorm(in_channels, eps=eps)
        self.conv3 = Conv1x1(in_channels, out_channels)
        self.norm3 = nn.LayerNorm(out_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = ops.depthwise_projection(
            x, self.norm1.weight, self.norm1.bias, self.conv2.weight, self.conv2.bias,
            self.norm2.weight, self.norm2.bias, self.eps,
        )
        return self.norm3(self.conv3(x))
