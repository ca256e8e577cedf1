// CPU kernels of structtoken::slice_attention and slice_attention_backward: ATen GEMMs around a fused
// softmax + logsumexp row kernel (forward) and a fused softmax-backward row kernel (backward).
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

// In place: logits [R, C] -> softmax(logits * scale); lse [R] = logsumexp(logits * scale).
template <typename T>
void softmax_lse_rows(T* logits, T* lse, int64_t R, int64_t C, double scale) {
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = logits + r * C;
      T mx = -std::numeric_limits<T>::infinity();
      for (int64_t c = 0; c < C; ++c) mx = std::max(mx, row[c] * T(scale));
      T sum = 0;
      for (int64_t c = 0; c < C; ++c) sum += std::exp(row[c] * T(scale) - mx);
      const T l = mx + std::log(sum);
      for (int64_t c = 0; c < C; ++c) row[c] = std::exp(row[c] * T(scale) - l);
      lse[r] = l;
    }
  });
}

// In place: logits [R, C] -> P = exp(logits * scale - lse); grad_p [R, C] -> dS = P * (dP - sum(P * dP)) * scale.
template <typename T>
void softmax_backward_rows(T* logits, T* grad_p, const T* lse, int64_t R, int64_t C, double scale) {
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* p = logits + r * C;
      T* dp = grad_p + r * C;
      T dot = 0;
      for (int64_t c = 0; c < C; ++c) {
        p[c] = std::exp(p[c] * T(scale) - lse[r]);
        dot += p[c] * dp[c];
      }
      for (int64_t c = 0; c < C; ++c) dp[c] = p[c] * (dp[c] - dot) * T(scale);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> slice_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, double scale) {
  check_slice_attention(q, k, v, /*cuda=*/false, kFwd);
  const int64_t B = q.size(0), M = q.size(1), C = k.size(1);
  auto probs = at::bmm(q, k.transpose(1, 2)).contiguous();  // [B, M, C] logits, softmaxed in place
  auto lse = at::empty({B, M}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), kFwd, [&] {
    softmax_lse_rows<scalar_t>(probs.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), B * M, C, scale);
  });
  return {at::bmm(probs, v), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> slice_attention_backward_cpu(const at::Tensor& grad_out,
                                                                       const at::Tensor& q, const at::Tensor& k,
                                                                       const at::Tensor& v, const at::Tensor& lse,
                                                                       double scale) {
  check_slice_attention_backward(grad_out, q, k, v, lse, /*cuda=*/false, kBwd);
  const int64_t B = q.size(0), M = q.size(1), C = k.size(1);
  auto lse_c = lse.to(q.scalar_type()).contiguous();
  auto probs = at::bmm(q, k.transpose(1, 2)).contiguous();         // [B, M, C]
  auto grad_s = at::bmm(grad_out, v.transpose(1, 2)).contiguous();  // [B, M, C]
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), kBwd, [&] {
    softmax_backward_rows<scalar_t>(probs.data_ptr<scalar_t>(), grad_s.data_ptr<scalar_t>(),
                                    lse_c.data_ptr<scalar_t>(), B * M, C, scale);
  });
  return {at::bmm(grad_s, k), at::bmm(grad_s.transpose(1, 2), q), at::bmm(probs.transpose(1, 2), grad_out)};
}

}  // namespace

TORCH_LIBRARY_IMPL(structtoken, CPU, m) {
  m.impl("slice_attention", &slice_attention_cpu);
  m.impl("slice_attention_backward", &slice_attention_backward_cpu);
}

}  // namespace structtoken
