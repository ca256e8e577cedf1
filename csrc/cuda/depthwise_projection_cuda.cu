// CUDA kernels of structtoken::depthwise_projection and depthwise_projection_backward, channels-last
// [B, H, W, C].
//
// Per-pixel kernels run one block of kThreads threads per pixel (grid-stride over pixels); thread t owns
// channels t, t + kThreads, ... (VPT of them, held in registers), so every LayerNorm reduction is one
// block_sum and every global access is coalesced along C.
//   forward:  norm_gelu_kernel         x -> a = GELU(LN1(x)), mean1, rstd1
//             conv_norm_gelu_kernel    a -> conv_out = conv3x3(a) + bias, out = GELU(LN2(conv_out)), mean2, rstd2
//   backward: norm_gelu_backward_kernel     grad_out -> grad_conv_out (fp32) + w2, b2, conv-bias partial sums
//             conv_norm_gelu_backward_kernel grad_conv_out -> grad_a (conv transpose) -> grad_x + w1, b1 partials;
//                                            recomputes a for the weight gradient
//             conv_weight_grad_kernel  grad_conv_out, a -> conv weight partial sums over pixel chunks
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "checks.h"
#include "cuda/reduce.cuh"
#include "kernel_math.h"

namespace structtoken {
namespace {

constexpr const char* kFwd = "depthwise_projection";
constexpr const char* kBwd = "depthwise_projection_backward";
constexpr int kThreads = 256;
constexpr int kMaxValuesPerThread = 16;  // C <= kThreads * kMaxValuesPerThread = 4096
constexpr int64_t kMaxPixelBlocks = 1024;
constexpr int kWeightGradBlocks = 2048;  // target grid size of conv_weight_grad_kernel

// Loads the thread's channels of row[0:C] as float (0 past C).
template <int VPT, typename T>
__device__ __forceinline__ void load_row(const T* __restrict__ row, int C, float (&v)[VPT]) {
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int c = threadIdx.x + j * kThreads;
    v[j] = c < C ? static_cast<float>(row[c]) : 0.f;
  }
}

// mean and rstd = 1 / sqrt(var + eps) of the block's row v (channels past C hold 0).
template <int VPT>
__device__ __forceinline__ void row_stats(const float (&v)[VPT], int C, float eps, float* scratch, float& mean,
                                          float& rstd) {
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < VPT; ++j) s += v[j];
  mean = block_sum(s, scratch) / C;
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const float d = threadIdx.x + j * kThreads < C ? v[j] - mean : 0.f;
    ss += d * d;
  }
  rstd = rsqrtf(block_sum(ss, scratch) / C + eps);
}

// Backward of GELU(xhat * w + b), xhat = (in - mean) * rstd, over one pixel: grad_in from grad; adds
// d w and d b to gw, gb. Channels past C must have grad = 0.
template <int VPT>
__device__ __forceinline__ void norm_gelu_backward_row(const float (&grad)[VPT], const float (&in)[VPT], float mean,
                                                       float rstd, const float (&w)[VPT], const float (&b)[VPT],
                                                       int C, float* scratch, float (&grad_in)[VPT],
                                                       float (&gw)[VPT], float (&gb)[VPT]) {
  float du[VPT], xhat[VPT], s1 = 0.f, s2 = 0.f;
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    xhat[j] = (in[j] - mean) * rstd;
    du[j] = grad[j] * gelu_grad(xhat[j] * w[j] + b[j]);
    gw[j] += du[j] * xhat[j];
    gb[j] += du[j];
    s1 += du[j] * w[j];
    s2 += du[j] * w[j] * xhat[j];
  }
  s1 = block_sum(s1, scratch) / C;
  s2 = block_sum(s2, scratch) / C;
#pragma unroll
  for (int j = 0; j < VPT; ++j) grad_in[j] = rstd * (du[j] * w[j] - s1 - xhat[j] * s2);
}

template <int VPT, typename T>
__device__ __forceinline__ void store_row(T* __restrict__ row, int C, const float (&v)[VPT]) {
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int c = threadIdx.x + j * kThreads;
    if (c < C) row[c] = static_cast<T>(v[j]);
  }
}

template <typename scalar_t, int VPT>
__global__ void __launch_bounds__(kThreads) norm_gelu_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ w1, const scalar_t* __restrict__ b1,
    scalar_t* __restrict__ a, float* __restrict__ mean1, float* __restrict__ rstd1, int64_t P, int C, float eps) {
  __shared__ float scratch[32];
  float w[VPT], b[VPT], v[VPT];
  load_row(w1, C, w);
  load_row(b1, C, b);
  for (int64_t p = blockIdx.x; p < P; p += gridDim.x) {
    float mean, rstd;
    load_row(x + p * C, C, v);
    row_stats(v, C, eps, scratch, mean, rstd);
#pragma unroll
    for (int j = 0; j < VPT; ++j) v[j] = gelu((v[j] - mean) * rstd * w[j] + b[j]);
    store_row(a + p * C, C, v);
    if (threadIdx.x == 0) {
      mean1[p] = mean;
      rstd1[p] = rstd;
    }
  }
}

template <typename scalar_t, int VPT>
__global__ void __launch_bounds__(kThreads) conv_norm_gelu_kernel(
    const scalar_t* __restrict__ a, const scalar_t* __restrict__ conv_w, const scalar_t* __restrict__ conv_b,
    const scalar_t* __restrict__ w2, const scalar_t* __restrict__ b2, scalar_t* __restrict__ conv_out,
    scalar_t* __restrict__ out, float* __restrict__ mean2, float* __restrict__ rstd2, int64_t P, int H, int W, int C,
    int cpg, float eps) {
  __shared__ float scratch[32];
  float w[VPT], b[VPT], y[VPT];
  load_row(w2, C, w);
  load_row(b2, C, b);
  for (int64_t p = blockIdx.x; p < P; p += gridDim.x) {
    const int h = static_cast<int>((p / W) % H), x_ = static_cast<int>(p % W);
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int c = threadIdx.x + j * kThreads;
      y[j] = 0.f;
      if (c >= C) continue;
      float acc = static_cast<float>(conv_b[c]);
      const int group_start = (c / cpg) * cpg;
      for (int t = 0; t < 9; ++t) {
        const int hh = h + tap_dh(t), ww = x_ + tap_dw(t);
        if (hh < 0 || hh >= H || ww < 0 || ww >= W) continue;
        const scalar_t* in = a + (p + tap_dh(t) * W + tap_dw(t)) * C + group_start;
        const scalar_t* wt = conv_w + static_cast<int64_t>(c) * cpg * 9 + t;
        for (int ci = 0; ci < cpg; ++ci) acc += static_cast<float>(wt[ci * 9]) * static_cast<float>(in[ci]);
      }
      // Round to the stored dtype first, so the backward sees exactly the values normalised here.
      y[j] = static_cast<float>(static_cast<scalar_t>(acc));
    }
    float mean, rstd;
    row_stats(y, C, eps, scratch, mean, rstd);
    store_row(conv_out + p * C, C, y);
#pragma unroll
    for (int j = 0; j < VPT; ++j) y[j] = gelu((y[j] - mean) * rstd * w[j] + b[j]);
    store_row(out + p * C, C, y);
    if (threadIdx.x == 0) {
      mean2[p] = mean;
      rstd2[p] = rstd;
    }
  }
}

// partial: [3, gridDim.x, C] sums over this block's pixels of d w2, d b2, d conv_bias.
template <typename scalar_t, int VPT>
__global__ void __launch_bounds__(kThreads) norm_gelu_backward_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ conv_out, const float* __restrict__ mean2,
    const float* __restrict__ rstd2, const scalar_t* __restrict__ w2, const scalar_t* __restrict__ b2,
    float* __restrict__ grad_y, float* __restrict__ partial, int64_t P, int C) {
  __shared__ float scratch[32];
  float w[VPT], b[VPT], g[VPT], y[VPT], dy[VPT], gw[VPT] = {}, gb[VPT] = {}, gcb[VPT] = {};
  load_row(w2, C, w);
  load_row(b2, C, b);
  for (int64_t p = blockIdx.x; p < P; p += gridDim.x) {
    load_row(grad_out + p * C, C, g);
    load_row(conv_out + p * C, C, y);
    norm_gelu_backward_row(g, y, mean2[p], rstd2[p], w, b, C, scratch, dy, gw, gb);
#pragma unroll
    for (int j = 0; j < VPT; ++j) gcb[j] += threadIdx.x + j * kThreads < C ? dy[j] : 0.f;
    store_row(grad_y + p * C, C, dy);
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * C;
  store_row(partial + blockIdx.x * static_cast<int64_t>(C), C, gw);
  store_row(partial + stride + blockIdx.x * static_cast<int64_t>(C), C, gb);
  store_row(partial + 2 * stride + blockIdx.x * static_cast<int64_t>(C), C, gcb);
}

// partial: [2, gridDim.x, C] sums over this block's pixels of d w1, d b1. Also writes a = GELU(LN1(x)).
template <typename scalar_t, int VPT>
__global__ void __launch_bounds__(kThreads) conv_norm_gelu_backward_kernel(
    const float* __restrict__ grad_y, const scalar_t* __restrict__ x, const float* __restrict__ mean1,
    const float* __restrict__ rstd1, const scalar_t* __restrict__ w1, const scalar_t* __restrict__ b1,
    const scalar_t* __restrict__ conv_w, scalar_t* __restrict__ grad_x, scalar_t* __restrict__ a,
    float* __restrict__ partial, int64_t P, int H, int W, int C, int cpg) {
  __shared__ float scratch[32];
  float w[VPT], b[VPT], ga[VPT], xin[VPT], dx[VPT], gw[VPT] = {}, gb[VPT] = {};
  load_row(w1, C, w);
  load_row(b1, C, b);
  for (int64_t p = blockIdx.x; p < P; p += gridDim.x) {
    const int h = static_cast<int>((p / W) % H), x_ = static_cast<int>(p % W);
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int c = threadIdx.x + j * kThreads;
      ga[j] = 0.f;
      if (c >= C) continue;
      const int group_start = (c / cpg) * cpg, ci = c - group_start;
      float acc = 0.f;
      for (int t = 0; t < 9; ++t) {  // output pixel (h - dh, w - dw) read this pixel through tap t
        const int hh = h - tap_dh(t), ww = x_ - tap_dw(t);
        if (hh < 0 || hh >= H || ww < 0 || ww >= W) continue;
        const float* gy = grad_y + (p - tap_dh(t) * W - tap_dw(t)) * C;
        for (int co = group_start; co < group_start + cpg; ++co)
          acc += static_cast<float>(conv_w[(static_cast<int64_t>(co) * cpg + ci) * 9 + t]) * gy[co];
      }
      ga[j] = acc;
    }
    const float mean = mean1[p], rstd = rstd1[p];
    load_row(x + p * C, C, xin);
    norm_gelu_backward_row(ga, xin, mean, rstd, w, b, C, scratch, dx, gw, gb);
    store_row(grad_x + p * C, C, dx);
#pragma unroll
    for (int j = 0; j < VPT; ++j) xin[j] = gelu((xin[j] - mean) * rstd * w[j] + b[j]);
    store_row(a + p * C, C, xin);
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * C;
  store_row(partial + blockIdx.x * static_cast<int64_t>(C), C, gw);
  store_row(partial + stride + blockIdx.x * static_cast<int64_t>(C), C, gb);
}

// partial[chunk, e], e = (t * cpg + ci) * C + co: sum over the chunk's pixels p of
// grad_y[p, co] * a[p + tap t, group_start(co) + ci].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) conv_weight_grad_kernel(
    const float* __restrict__ grad_y, const scalar_t* __restrict__ a, float* __restrict__ partial, int64_t P, int H,
    int W, int C, int cpg, int64_t pixels_per_chunk) {
  const int64_t E = 9LL * cpg * C;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= E) return;
  const int co = static_cast<int>(e % C);
  const int ci = static_cast<int>((e / C) % cpg);
  const int t = static_cast<int>(e / (static_cast<int64_t>(C) * cpg));
  const int dh = tap_dh(t), dw = tap_dw(t), in_channel = (co / cpg) * cpg + ci;
  const int64_t begin = blockIdx.y * pixels_per_chunk;
  const int64_t end = begin + pixels_per_chunk < P ? begin + pixels_per_chunk : P;
  float acc = 0.f;
  for (int64_t p = begin; p < end; ++p) {
    const int hh = static_cast<int>((p / W) % H) + dh, ww = static_cast<int>(p % W) + dw;
    if (hh < 0 || hh >= H || ww < 0 || ww >= W) continue;
    acc += grad_y[p * C + co] * static_cast<float>(a[(p + dh * W + dw) * C + in_channel]);
  }
  partial[blockIdx.y * E + e] = acc;
}

// Calls f(std::integral_constant<int, VPT>) with the smallest VPT in {1, 2, 4, 8, 16}, VPT * kThreads >= C.
template <typename F>
void dispatch_values_per_thread(int64_t C, const char* op, F&& f) {
  TORCH_CHECK(C <= kThreads * kMaxValuesPerThread, op, ": the CUDA kernel supports C <= ",
              kThreads * kMaxValuesPerThread, " channels, got C = ", C,
              "; set STRUCTTOKEN_D2_FORCE_PYTORCH_OPS=1 to use the PyTorch reference");
  const int64_t needed = (C + kThreads - 1) / kThreads;
  if (needed <= 1) f(std::integral_constant<int, 1>{});
  else if (needed <= 2) f(std::integral_constant<int, 2>{});
  else if (needed <= 4) f(std::integral_constant<int, 4>{});
  else if (needed <= 8) f(std::integral_constant<int, 8>{});
  else f(std::integral_constant<int, 16>{});
}

struct Geometry {
  int64_t P;  // pixels B * H * W
  int H, W, C, cpg;
  unsigned int pixel_blocks() const { return static_cast<unsigned int>(P < kMaxPixelBlocks ? P : kMaxPixelBlocks); }
};

Geometry geometry(const at::Tensor& x, const at::Tensor& conv_weight, const char* op) {
  TORCH_CHECK(x.size(1) <= 0x7fffffff && x.size(2) <= 0x7fffffff, op, ": H and W must fit in int32");
  return {x.numel() / x.size(3), static_cast<int>(x.size(1)), static_cast<int>(x.size(2)),
          static_cast<int>(x.size(3)), static_cast<int>(conv_weight.size(1))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> depthwise_projection_cuda(
    const at::Tensor& x, const at::Tensor& norm1_weight, const at::Tensor& norm1_bias, const at::Tensor& conv_weight,
    const at::Tensor& conv_bias, const at::Tensor& norm2_weight, const at::Tensor& norm2_bias, double eps) {
  check_depthwise_projection(x, norm1_weight, norm1_bias, conv_weight, conv_bias, norm2_weight, norm2_bias,
                             /*cuda=*/true, kFwd);
  const c10::cuda::CUDAGuard guard(x.device());
  const Geometry g = geometry(x, conv_weight, kFwd);
  const auto stats_options = x.options().dtype(at::kFloat);
  auto mean1 = at::empty({x.size(0), g.H, g.W}, stats_options), rstd1 = at::empty_like(mean1);
  auto mean2 = at::empty_like(mean1), rstd2 = at::empty_like(mean1);
  auto out = at::empty_like(x), conv_out = at::empty_like(x);
  if (g.P == 0) return {out, mean1, rstd1, conv_out, mean2, rstd2};
  auto a = at::empty_like(x);
  const auto w1 = norm1_weight.contiguous(), b1 = norm1_bias.contiguous(), cw = conv_weight.contiguous();
  const auto cb = conv_bias.contiguous(), w2 = norm2_weight.contiguous(), b2 = norm2_bias.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  ST_DISPATCH_CUDA_TYPES(x.scalar_type(), kFwd, [&] {
    dispatch_values_per_thread(g.C, kFwd, [&](auto vpt) {
      constexpr int VPT = decltype(vpt)::value;
      norm_gelu_kernel<scalar_t, VPT><<<g.pixel_blocks(), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), w1.data_ptr<scalar_t>(), b1.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
          mean1.data_ptr<float>(), rstd1.data_ptr<float>(), g.P, g.C, static_cast<float>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      conv_norm_gelu_kernel<scalar_t, VPT><<<g.pixel_blocks(), kThreads, 0, stream>>>(
          a.data_ptr<scalar_t>(), cw.data_ptr<scalar_t>(), cb.data_ptr<scalar_t>(), w2.data_ptr<scalar_t>(),
          b2.data_ptr<scalar_t>(), conv_out.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), mean2.data_ptr<float>(),
          rstd2.data_ptr<float>(), g.P, g.H, g.W, g.C, g.cpg, static_cast<float>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, mean1, rstd1, conv_out, mean2, rstd2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
depthwise_projection_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& norm1_weight,
                              const at::Tensor& norm1_bias, const at::Tensor& conv_weight,
                              const at::Tensor& norm2_weight, const at::Tensor& norm2_bias, const at::Tensor& mean1,
                              const at::Tensor& rstd1, const at::Tensor& conv_out, const at::Tensor& mean2,
                              const at::Tensor& rstd2) {
  check_depthwise_projection(x, norm1_weight, norm1_bias, conv_weight, norm2_bias, norm2_weight, norm2_bias,
                             /*cuda=*/true, kBwd);  // no conv_bias in the backward: norm2_bias stands in
  check_same_device_dtype(x, "x", grad_out, "grad_out", kBwd);
  check_same_device_dtype(x, "x", conv_out, "conv_out", kBwd);
  TORCH_CHECK(grad_out.sizes() == x.sizes() && conv_out.sizes() == x.sizes(), kBwd,
              ": grad_out and conv_out must have the shape of x ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const Geometry g = geometry(x, conv_weight, kBwd);
  for (const auto* s : {&mean1, &rstd1, &mean2, &rstd2}) {
    TORCH_CHECK(s->numel() == g.P, kBwd, ": LayerNorm statistics must be [B, H, W], got ", s->sizes());
    TORCH_CHECK(s->device() == x.device(), kBwd, ": LayerNorm statistics must be on ", x.device());
  }
  const auto float_options = x.options().dtype(at::kFloat);
  if (g.P == 0) {
    auto zero = at::zeros_like(norm1_weight);
    return {at::empty_like(x), zero, zero.clone(), at::zeros_like(conv_weight), zero.clone(), zero.clone(),
            zero.clone()};
  }
  const auto go = grad_out.contiguous(), y = conv_out.contiguous();
  const auto m1 = mean1.to(at::kFloat).contiguous(), r1 = rstd1.to(at::kFloat).contiguous();
  const auto m2 = mean2.to(at::kFloat).contiguous(), r2 = rstd2.to(at::kFloat).contiguous();
  const auto w1 = norm1_weight.contiguous(), b1 = norm1_bias.contiguous(), cw = conv_weight.contiguous();
  const auto w2 = norm2_weight.contiguous(), b2 = norm2_bias.contiguous();
  const unsigned int blocks = g.pixel_blocks();
  auto grad_y = at::empty(x.sizes(), float_options);
  auto partial2 = at::empty({3, blocks, g.C}, float_options);  // d w2, d b2, d conv_bias
  auto partial1 = at::empty({2, blocks, g.C}, float_options);  // d w1, d b1
  auto grad_x = at::empty_like(x), a = at::empty_like(x);
  // conv weight gradient: one thread per weight entry, grid.y splits the pixels into chunks.
  const int64_t entries = 9LL * g.cpg * g.C, entry_blocks = (entries + kThreads - 1) / kThreads;
  TORCH_CHECK(entry_blocks <= 0x7fffffff, kBwd, ": conv_weight too large for the CUDA kernel");
  int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(g.P, kWeightGradBlocks / entry_blocks));
  const int64_t pixels_per_chunk = (g.P + chunks - 1) / chunks;
  chunks = (g.P + pixels_per_chunk - 1) / pixels_per_chunk;
  auto partial_cw = at::empty({chunks, 9, g.cpg, g.C}, float_options);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  ST_DISPATCH_CUDA_TYPES(x.scalar_type(), kBwd, [&] {
    dispatch_values_per_thread(g.C, kBwd, [&](auto vpt) {
      constexpr int VPT = decltype(vpt)::value;
      norm_gelu_backward_kernel<scalar_t, VPT><<<blocks, kThreads, 0, stream>>>(
          go.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), m2.data_ptr<float>(), r2.data_ptr<float>(),
          w2.data_ptr<scalar_t>(), b2.data_ptr<scalar_t>(), grad_y.data_ptr<float>(), partial2.data_ptr<float>(), g.P,
          g.C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      conv_norm_gelu_backward_kernel<scalar_t, VPT><<<blocks, kThreads, 0, stream>>>(
          grad_y.data_ptr<float>(), x.data_ptr<scalar_t>(), m1.data_ptr<float>(), r1.data_ptr<float>(),
          w1.data_ptr<scalar_t>(), b1.data_ptr<scalar_t>(), cw.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
          a.data_ptr<scalar_t>(), partial1.data_ptr<float>(), g.P, g.H, g.W, g.C, g.cpg);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const dim3 grid(static_cast<unsigned int>(entry_blocks), static_cast<unsigned int>(chunks));
    conv_weight_grad_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        grad_y.data_ptr<float>(), a.data_ptr<scalar_t>(), partial_cw.data_ptr<float>(), g.P, g.H, g.W, g.C, g.cpg,
        pixels_per_chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const auto dtype = x.scalar_type();
  // Separate tensors per gradient: outputs must not alias.
  auto total = [&](const at::Tensor& partial, int i) { return partial[i].sum(0).to(dtype); };
  // [chunks, 9, cpg, C] -> [C, cpg, 9] -> [C, cpg, 3, 3]
  const auto grad_cw = partial_cw.sum(0).permute({2, 1, 0}).contiguous().view(conv_weight.sizes()).to(dtype);
  return {grad_x, total(partial1, 0), total(partial1, 1), grad_cw, total(partial2, 2), total(partial2, 0),
          total(partial2, 1)};
}

}  // namespace

TORCH_LIBRARY_IMPL(structtoken, CUDA, m) {
  m.impl("depthwise_projection", &depthwise_projection_cuda);
  m.impl("depthwise_projection_backward", &depthwise_projection_backward_cuda);
}

}  // namespace structtoken
