// CUDA kernels of structtoken::slice_attention and slice_attention_backward: cuBLAS GEMMs (through ATen,
// fp32 accumulation and fp32 logits) around a fused softmax + logsumexp kernel (forward) and a fused
// softmax-backward kernel (backward); one warp per row of C logits.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/reduce.cuh"

namespace structtoken {
namespace {

constexpr const char* kFwd = "slice_attention";
constexpr const char* kBwd = "slice_attention_backward";
constexpr int kWarpsPerBlock = 8;

// probs[r, :] = softmax(logits[r, :] * scale) and lse[r] = logsumexp(logits[r, :] * scale), r < R.
template <typename scalar_t>
__global__ void softmax_lse_kernel(const float* __restrict__ logits, scalar_t* __restrict__ probs,
                                   float* __restrict__ lse, int64_t R, int C, float scale) {
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
  if (lane == 0) lse[row] = l;
}

// P = exp(logits * scale - lse) -> probs; grad_s = P * (grad_p - sum_c P * grad_p) * scale, per row.
template <typename scalar_t>
__global__ void softmax_backward_kernel(const float* __restrict__ logits, const float* __restrict__ grad_p,
                                        const float* __restrict__ lse, scalar_t* __restrict__ probs,
                                        scalar_t* __restrict__ grad_s, int64_t R, int C, float scale) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= R) return;
  const float* s = logits + row * C;
  const float* dp = grad_p + row * C;
  const float l = lse[row];
  float dot = 0.f;
  for (int c = lane; c < C; c += 32) dot += expf(s[c] * scale - l) * dp[c];
  dot = warp_sum(dot);
  for (int c = lane; c < C; c += 32) {
    const float p = expf(s[c] * scale - l);
    probs[row * C + c] = static_cast<scalar_t>(p);
    grad_s[row * C + c] = static_cast<scalar_t>(p * (dp[c] - dot) * scale);
  }
}

// a @ b in fp32 ([B, X, Y] x [B, Y, Z] -> [B, X, Z] float32), accumulating in fp32.
at::Tensor bmm_fp32(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kFloat ? at::bmm(a, b) : at::bmm(a, b, at::kFloat);
}

unsigned int row_blocks(int64_t rows) {
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= 0x7fffffff, "slice_attention: too many rows (B * M = ", rows, ")");
  return static_cast<unsigned int>(blocks);
}

std::tuple<at::Tensor, at::Tensor> slice_attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, double scale) {
  check_slice_attention(q, k, v, /*cuda=*/true, kFwd);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), M = q.size(1), C = k.size(1);
  TORCH_CHECK(C <= 0x7fffffff, kFwd, ": too many channels C = ", C);
  auto lse = at::empty({B, M}, q.options().dtype(at::kFloat));
  auto probs = at::empty({B, M, C}, q.options());
  if (B * M > 0) {
    const auto logits = bmm_fp32(q, k.transpose(1, 2)).contiguous();  // [B, M, C]
    ST_DISPATCH_CUDA_TYPES(q.scalar_type(), kFwd, [&] {
      softmax_lse_kernel<scalar_t><<<row_blocks(B * M), kWarpsPerBlock * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
          logits.data_ptr<float>(), probs.data_ptr<scalar_t>(), lse.data_ptr<float>(), B * M, static_cast<int>(C),
          static_cast<float>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {at::bmm(probs, v), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> slice_attention_backward_cuda(const at::Tensor& grad_out,
                                                                        const at::Tensor& q, const at::Tensor& k,
                                                                        const at::Tensor& v, const at::Tensor& lse,
                                                                        double scale) {
  check_slice_attention_backward(grad_out, q, k, v, lse, /*cuda=*/true, kBwd);
  const int64_t B = q.size(0), M = q.size(1), C = k.size(1);
  const c10::cuda::CUDAGuard guard(q.device());
  auto probs = at::empty({B, M, C}, q.options());
  auto grad_s = at::empty({B, M, C}, q.options());
  if (B * M > 0) {
    const auto lse_f = lse.to(at::kFloat).contiguous();
    const auto logits = bmm_fp32(q, k.transpose(1, 2)).contiguous();         // [B, M, C]
    const auto grad_p = bmm_fp32(grad_out, v.transpose(1, 2)).contiguous();  // [B, M, C]
    ST_DISPATCH_CUDA_TYPES(q.scalar_type(), kBwd, [&] {
      softmax_backward_kernel<scalar_t>
          <<<row_blocks(B * M), kWarpsPerBlock * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
              logits.data_ptr<float>(), grad_p.data_ptr<float>(), lse_f.data_ptr<float>(), probs.data_ptr<scalar_t>(),
              grad_s.data_ptr<scalar_t>(), B * M, static_cast<int>(C), static_cast<float>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {at::bmm(grad_s, k), at::bmm(grad_s.transpose(1, 2), q), at::bmm(probs.transpose(1, 2), grad_out)};
}

}  // namespace

TORCH_LIBRARY_IMPL(structtoken, CUDA, m) {
  m.impl("slice_attention", &slice_attention_cuda);
  m.impl("slice_attention_backward", &slice_attention_backward_cuda);
}

}  // namespace structtoken
