// Schemas of the StructToken ops (namespace ``structtoken``) and the Python module ``structtoken_d2._C``
// whose import registers them. Kernels: csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA); autograd and
// fake (meta) kernels: structtoken_d2/ops/registrations.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(structtoken, m) {
  // softmax(q @ k^T * scale, dim=C) @ v for q [B, M, N], k, v [B, C, N]; lse [B, M] is the logsumexp
  // of the scaled logits, kept for the backward.
  m.def("slice_attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "slice_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor lse, float scale)"
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

static PyModuleDef structtoken_module = {PyModuleDef_HEAD_INIT, "_C", "StructToken compiled ops", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&structtoken_module); }
