"""The final ConvBlock of StructToken (``ResBlock`` in the authors' code)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ResBlock(nn.Module):
    """Pre-activation residual block [He et al., "Identity mappings"]:
    ``LN -> GELU -> 3x3 conv -> LN -> GELU -> 3x3 conv``, plus the identity (a 1x1 convolution
    when the channel counts differ). LayerNorms over channels, eps 1e-6.

    Input channels-last ``[B, H, W, C_in]``; output channels-first ``[B, C_out, H, W]`` (the
    head's logits).
    """

    def __init__(self, in_channels: int, channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.norm2 = nn.LayerNorm(channels, eps=eps)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.identity_map = nn.Conv2d(in_channels, channels, 1) if channels != in_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x.permute(0, 3, 1, 2)
        out = self.conv1(F.gelu(self.norm1(x)).permute(0, 3, 1, 2))
        out = F.gelu(self.norm2(out.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.conv2(out) + self.identity_map(identity)
