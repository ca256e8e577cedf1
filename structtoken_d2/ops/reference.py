"""Pure-PyTorch reference implementations of the StructToken ops.

These define the semantics the compiled kernels in ``csrc/`` must reproduce, and they are the
path used wherever no kernel is built for a tensor's device.
"""
import torch
import torch.nn.functional as F


def slice_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Channel-wise ("slice") attention: each channel slice of length N = H*W is one token.

    Args:
        q: queries ``[B, M, N]`` (M = K structure tokens for CSE, K + C for SSE).
        k: keys ``[B, C, N]``.
        v: values ``[B, C, N]``.
        scale: multiplier of the logits ``q @ k^T``.

    Returns:
        ``softmax(q @ k^T * scale, dim=C) @ v``, shape ``[B, M, N]``.
    """
    attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * scale, dim=-1)  # [B, M, C]
    return torch.matmul(attn, v)


def depthwise_projection(
    x: torch.Tensor,
    norm1_weight: torch.Tensor,
    norm1_bias: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor,
    norm2_weight: torch.Tensor,
    norm2_bias: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The memory-bound middle of a StructToken projection / FFN, channels-last.

    ``GELU(LN2(conv3x3(GELU(LN1(x)))))`` with LayerNorm over channels, exact (erf) GELU and a
    3x3 grouped convolution (padding 1, stride 1). ``groups = C // conv_weight.shape[1]``: a
    depthwise conv for the projections Phi/Psi/Upsilon (``[C, 1, 3, 3]``), a group conv with
    ``C / groups`` channels per group for the FFN (``[4D, 4, 3, 3]`` with groups = D).

    Args:
        x: ``[B, H, W, C]`` channels-last input (the output of the first 1x1 convolution).
        norm1_weight, norm1_bias: ``[C]``.
        conv_weight: ``[C, C // groups, 3, 3]``; conv_bias: ``[C]``.
        norm2_weight, norm2_bias: ``[C]``.
        eps: LayerNorm epsilon.

    Returns:
        ``[B, H, W, C]``.
    """
    channels = x.shape[-1]
    groups = channels // conv_weight.shape[1]
    y = F.gelu(F.layer_norm(x, (channels,), norm1_weight, norm1_bias, eps))
    y = F.conv2d(y.permute(0, 3, 1, 2), conv_weight, conv_bias, padding=1, groups=groups)
    y = y.permute(0, 2, 3, 1)
    return F.gelu(F.layer_norm(y, (channels,), norm2_weight, norm2_bias, eps))
