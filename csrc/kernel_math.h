// Scalar math shared by the CPU and CUDA kernels: exact (erf) GELU, its derivative, and the
// conv-tap geometry of the 3x3 (padding 1) convolution.
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define ST_HD __host__ __device__ __forceinline__
#else
#define ST_HD inline
#endif

namespace structtoken {

ST_HD float st_erf(float x) { return erff(x); }
ST_HD double st_erf(double x) { return erf(x); }
ST_HD float st_exp(float x) { return expf(x); }
ST_HD double st_exp(double x) { return exp(x); }

// GELU(u) = u * Phi(u), Phi the standard normal CDF.
template <typename T>
ST_HD T gelu(T u) {
  return T(0.5) * u * (T(1) + st_erf(u * T(0.70710678118654752440)));
}

// d GELU / du = Phi(u) + u * phi(u).
template <typename T>
ST_HD T gelu_grad(T u) {
  const T cdf = T(0.5) * (T(1) + st_erf(u * T(0.70710678118654752440)));
  const T pdf = st_exp(T(-0.5) * u * u) * T(0.39894228040143267794);
  return cdf + u * pdf;
}

// Tap t in [0, 9) of a 3x3 kernel reads input row h + t / 3 - 1, column w + t % 3 - 1.
ST_HD int tap_dh(int t) { return t / 3 - 1; }
ST_HD int tap_dw(int t) { return t % 3 - 1; }

}  // namespace structtoken
