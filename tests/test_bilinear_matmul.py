"""The loss's bilinear upsampling as matrix products equals F.interpolate (float64), values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from structtoken_d2.modeling.bilinear_matmul import interpolation_matrix, resize_bilinear


@pytest.mark.parametrize("in_size, out_size", [((8, 8), (128, 128)), ((5, 7), (80, 112)), ((8, 8), (13, 29)),
                                               ((16, 12), (5, 7)), ((1, 3), (4, 4))])
def test_equals_f_interpolate_values_and_gradients(in_size, out_size):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *in_size, dtype=torch.float64, generator=generator)
    upstream = torch.randn(2, 3, *out_size, dtype=torch.float64, generator=generator)
    ours_in, ref_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = resize_bilinear(ours_in, out_size)
    ref = F.interpolate(ref_in, size=out_size, mode="bilinear", align_corners=False)
    assert ours.shape == ref.shape == (2, 3, *out_size)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    ours.backward(upstream)
    ref.backward(upstream)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=0, atol=1e-12)


def test_interpolation_matrix_rows_are_half_pixel_linear_weights():
    # 2 -> 4, align_corners=False: output centres at input coordinates -0.25, 0.25, 0.75, 1.25 (clamped).
    expected = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(interpolation_matrix(2, 4, torch.float64, "cpu"), expected, rtol=0, atol=1e-15)
