// CUDA kernels of structtoken::slice_attention and slice_attention_backward: cuBLAS GEMMs (through ATen, fp32
// accumulation, fp32 logits and logit gradients) around one fused row kernel each, one warp per row of C:
//   forward:  logits = q k^T (fp32) -> softmax_kernel -> probs (kept for the backward) -> out = probs v
//   backward: dP = dO v^T (fp32) -> softmax_backward_kernel(probs, dP) -> dS; dq = dS k, dk = dS^T q,
//             dv = probs^T dO
// Keeping probs [B, M, C] (no larger than the logits, and what eager PyTorch keeps too) spares the backward
// the logits GEMM.
#include "cuda/device.cuh"

#include <torch/library.h>

#include "checks.h"
#include "cuda/reduce.cuh"

namespace structtoken {
namespace {

constexpr const char* kFwd = "slice_attention";
constexpr const char* kBwd = "slice_attention_backward";
constexpr int kWarpsPerBlock = 8;

// probs[r, :] = softmax(logits[r, :] * scale), r < R.
template <typename scalar_t>
__global__ void softmax_kernel(const float* __restrict__ logits, scalar_t* __restrict__ probs, int64_t R, int C,
                               float scale) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= R) return;  // whole warp leaves: no block-wide synchronisation below
  const float* s = logits + row * C;
  float mx = -INFINITY;
  for (int c = lane; c < C; c += 32) mx = fmaxf(mx, s[c] * scale);
  mx = warp_max(mx);
  float sum = 0.f;
  for (int c = lane; c < C; c += 32) sum += expf(s[c] * scale - mx);
  const float l = mx + logf(warp_sum(sum));
  for (int c = lane; c < C; c += 32) probs[row * C + c] = static_cast<scalar_t>(expf(s[c] * scale - l));
}

// grad_s[r, :] = P * (dP - sum_c P * dP) * scale with P = probs[r, :], dP = grad_p[r, :], r < R.
template <typename scalar_t>
__global__ void softmax_backward_kernel(const scalar_t* __restrict__ probs, const float* __restrict__ grad_p,
                                        scalar_t* __restrict__ grad_s, int64_t R, int C, float scale) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= R) return;
  const scalar_t* p = probs + row * C;
  const float* dp = grad_p + row * C;
  float dot = 0.f;
  for (int c = lane; c < C; c += 32) dot += static_cast<float>(p[c]) * dp[c];
  dot = warp_sum(dot);
  for (int c = lane; c < C; c += 32)
    grad_s[row * C + c] = static_cast<scalar_t>(static_cast<float>(p[c]) * (dp[c] - dot) * scale);
}

unsigned int row_blocks(int64_t rows) {
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= 0x7fffffff, "slice_attention: too many rows (B * M = ", rows, ")");
  return static_cast<unsigned int>(blocks);
}

std::tuple<at::Tensor, at::Tensor> slice_attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, double scale) {
  check_slice_attention(q, k, v, kDeviceKernels, kFwd);
  const DeviceGuard guard(q.device());
  const int64_t B = q.size(0), M = q.size(1), C = k.size(1);
  TORCH_CHECK(C <= 0x7fffffff, kFwd, ": too many channels C = ", C);
  auto probs = at::empty({B, M, C}, q.options());
  if (B * M > 0) {
    const auto logits = bmm_fp32(q, k.transpose(1, 2)).contiguous();  // [B, M, C]
    ST_DISPATCH_CUDA_TYPES(q.scalar_type(), kFwd, [&] {
      launch(softmax_kernel<scalar_t>, row_blocks(B * M), kWarpsPerBlock * 32, current_stream(),
             logits.data_ptr<float>(), probs.data_ptr<scalar_t>(), B * M, static_cast<int>(C),
             static_cast<float>(scale));
    });
  }
  return {at::bmm(probs, v), probs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> slice_attention_backward_cuda(const at::Tensor& grad_out,
                                                                        const at::Tensor& q, const at::Tensor& k,
                                                                        const at::Tensor& v, const at::Tensor& probs,
                                                                        double scale) {
  check_slice_attention_backward(grad_out, q, k, v, probs, kDeviceKernels, kBwd);
  const int64_t B = q.size(0), M = q.size(1), C = k.size(1);
  const DeviceGuard guard(q.device());
  const auto p = probs.contiguous();
  auto grad_s = at::empty({B, M, C}, q.options());
  if (B * M > 0) {
    const auto grad_p = bmm_fp32(grad_out, v.transpose(1, 2)).contiguous();  // [B, M, C]
    ST_DISPATCH_CUDA_TYPES(q.scalar_type(), kBwd, [&] {
      launch(softmax_backward_kernel<scalar_t>, row_blocks(B * M), kWarpsPerBlock * 32, current_stream(),
             p.data_ptr<scalar_t>(), grad_p.data_ptr<float>(), grad_s.data_ptr<scalar_t>(), B * M,
             static_cast<int>(C), static_cast<float>(scale));
    });
  }
  return {at::bmm(grad_s, k), at::bmm(grad_s.transpose(1, 2), q), at::bmm(p.transpose(1, 2), grad_out)};
}

}  // namespace

TORCH_LIBRARY_IMPL(structtoken, ST_CUDA_DISPATCH_KEY, m) {
  m.impl("slice_attention", &slice_attention_cuda);
  m.impl("slice_attention_backward", &slice_attention_backward_cuda);
}

}  // namespace structtoken
