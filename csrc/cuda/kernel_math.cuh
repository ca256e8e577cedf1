// Scalar device math of the CUDA kernels: exact (erf) GELU, its derivative, and the conv-tap geometry of the
// 3x3 (padding 1) convolution.
#pragma once
#include "cuda/device.cuh"

namespace structtoken {

// GELU(u) = u * Phi(u), Phi the standard normal CDF.
__device__ __forceinline__ float gelu(float u) { return 0.5f * u * (1.f + erff(u * 0.70710678118654752440f)); }

// d GELU / du = Phi(u) + u * phi(u).
__device__ __forceinline__ float gelu_grad(float u) {
  const float cdf = 0.5f * (1.f + erff(u * 0.70710678118654752440f));
  const float pdf = expf(-0.5f * u * u) * 0.39894228040143267794f;
  return cdf + u * pdf;
}

// Tap t in [0, 9) of a 3x3 kernel reads input row h + t / 3 - 1, column w + t % 3 - 1.
__device__ __forceinline__ int tap_dh(int t) { return t / 3 - 1; }
__device__ __forceinline__ int tap_dw(int t) { return t % 3 - 1; }

}  // namespace structtoken
