// CPU kernels of structtoken::slice_attention and slice_attention_backward: ATen GEMMs around a fused
// softmax row kernel (forward) and a fused softmax-backward row kernel (backward). The forward returns the
// probabilities [B, M, C] for the backward, which therefore needs no logits GEMM.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "checks.h"

namespace structtoken {
namespace {

constexpr const char* kFwd = "slice_attention";
constexpr const char* kBwd = "slice_attention_backward";

// In place: logits [R, C] -> softmax(logits * scale) along C.
template <typename T>
void softmax_rows(T* logits, int64_t R, int64_t C, double scale) {
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = logits + r * C;
      T mx = -std::numeric_limits<T>::infinity();
      for (int64_t c = 0; c < C; ++c) mx = std::max(mx, row[c] * T(scale));
      T sum = 0;
      for (int64_t c = 0; c < C; ++c) sum += (row[c] = std::exp(row[c] * T(scale) - mx));
      const T inv = T(1) / sum;
      for (int64_t c = 0; c < C; ++c) row[c] *= inv;
    }
  });
}

// In place: grad_p [R, C] -> dS = P * (dP - sum_c P * dP) * scale, P = probs [R, C].
template <typename T>
void softmax_backward_rows(const T* probs, T* grad_p, int64_t R, int64_t C, double scale) {
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* p = probs + r * C;
      T* dp = grad_p + r * C;
      T dot = 0;
      for (int64_t c = 0; c < C; ++c) dot += p[c] * dp[c];
      for (int64_t c = 0; c < C; ++c) dp[c] = p[c] * (dp[c] - dot) * T(scale);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> slice_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, double scale) {
  check_slice_attention(q, k, v, kCpuKernels, kFwd);
  const int64_t B = q.size(0), M = q.size(1), C = k.size(1);
  auto probs = at::bmm(q, k.transpose(1, 2)).contiguous();  // [B, M, C] logits, softmaxed in place
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), kFwd, [&] {
    softmax_rows<scalar_t>(probs.data_ptr<scalar_t>(), B * M, C, scale);
  });
  return {at::bmm(probs, v), probs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> slice_attention_backward_cpu(const at::Tensor& grad_out,
                                                                       const at::Tensor& q, const at::Tensor& k,
                                                                       const at::Tensor& v, const at::Tensor& probs,
                                                                       double scale) {
  check_slice_attention_backward(grad_out, q, k, v, probs, kCpuKernels, kBwd);
  const int64_t B = q.size(0), M = q.size(1), C = k.size(1);
  const auto p = probs.contiguous();
  auto grad_s = at::bmm(grad_out, v.transpose(1, 2)).contiguous();  // [B, M, C] dP, turned into dS in place
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), kBwd, [&] {
    softmax_backward_rows<scalar_t>(p.data_ptr<scalar_t>(), grad_s.data_ptr<scalar_t>(), B * M, C, scale);
  });
  return {at::bmm(grad_s, k), at::bmm(grad_s.transpose(1, 2), q), at::bmm(p.transpose(1, 2), grad_out)};
}

}  // namespace

TORCH_LIBRARY_IMPL(structtoken, CPU, m) {
  m.impl("slice_attention", &slice_attention_cpu);
  m.impl("slice_attention_backward", &slice_attention_backward_cpu);
}

}  // namespace structtoken
