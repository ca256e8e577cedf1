// Schemas of the StructToken ops, defined by csrc/ops.cpp in the namespace ``structtoken`` (and by the
// tests' CUDA emulation build in ``structtoken_emulated``).
#pragma once
#include <torch/library.h>

namespace structtoken {

inline void define_ops(torch::Library& m) {
  // softmax(q @ k^T * scale, dim=C) @ v for q [B, M, N], k, v [B, C, N]; probs [B, M, C] is the softmax,
  // kept for the backward.
  m.def("slice_attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor probs)");
  m.def(
      "slice_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor probs, float scale)"
      " -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // GELU(LN2(conv3x3(GELU(LN1(x))))) for channels-last x [B, H, W, C]; mean*/rstd* [B, H, W] are the
  // LayerNorm statistics and conv_out [B, H, W, C] the convolution output, kept for the backward.
  m.def(
      "depthwise_projection(Tensor x, Tensor norm1_weight, Tensor norm1_bias, Tensor conv_weight,"
      " Tensor conv_bias, Tensor norm2_weight, Tensor norm2_bias, float eps)"
      " -> (Tensor out, Tensor mean1, Tensor rstd1, Tensor conv_out, Tensor mean2, Tensor rstd2)");
  m.def(
      "depthwise_projection_backward(Tensor grad_out, Tensor x, Tensor norm1_weight, Tensor norm1_bias,"
      " Tensor conv_weight, Tensor norm2_weight, Tensor norm2_bias, Tensor mean1, Tensor rstd1,"
      " Tensor conv_out, Tensor mean2, Tensor rstd2)"
      " -> (Tensor grad_x, Tensor grad_norm1_weight, Tensor grad_norm1_bias, Tensor grad_conv_weight,"
      " Tensor grad_conv_bias, Tensor grad_norm2_weight, Tensor grad_norm2_bias)");
}

}  // namespace structtoken
