"""Bilinear resizing written as two matrix products, for the training loss.

``F.interpolate(x, size, mode="bilinear", align_corners=False)`` is separable: each output row is a
fixed mix of two input rows, each output column of two input columns. So it equals
``A_h @ x @ A_wᵀ`` with ``A_h [H, h]`` and ``A_w [W, w]`` the 1-D interpolation matrices, whose
backward is two more matrix products. The loss upsamples the stride-16 logits 16x: there PyTorch's
CPU ``upsample_bilinear2d`` forward + backward took 2.8 ms and the matrix products 0.7 ms (the main
job's ``[8, 6, 8, 8] -> [8, 6, 128, 128]``, 2 threads; docs/speed.md). Equal up to float rounding
(``tests/test_bilinear_matmul.py``); inference keeps ``F.interpolate``, which mmseg's numbers are
checked against bit for bit.
"""
from typing import Sequence

import torch
import torch.nn.functional as F


def interpolation_matrix(in_size: int, out_size: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The ``[out_size, in_size]`` matrix of 1-D linear interpolation with half-pixel centres
    (``align_corners=False``), taken from ``F.interpolate`` itself applied to the identity."""
    eye = torch.eye(in_size, dtype=dtype, device=device).unsqueeze(1)  # [in, 1, in]: in signals
    return F.interpolate(eye, size=out_size, mode="linear", align_corners=False).squeeze(1).t()


def resize_bilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``[..., h, w] -> [..., H, W]``, as ``F.interpolate(x, size, mode="bilinear",
    align_corners=False)`` on a ``[B, K, h, w]`` tensor (floating point)."""
    rows = interpolation_matrix(x.shape[-2], int(size[0]), x.dtype, x.device)  # [H, h]
    same = (x.shape[-1], int(size[1])) == (x.shape[-2], int(size[0]))  # a square resize: one matrix
    cols = rows if same else interpolation_matrix(x.shape[-1], int(size[1]), x.dtype, x.device)  # [W, w]
    return torch.matmul(torch.matmul(rows, x), cols.t())
