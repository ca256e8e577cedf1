// CUDA kernels of structtoken::depthwise_projection and depthwise_projection_backward, channels-last
// [B, H, W, C].
//
// Per-pixel kernels run one block of T threads per pixel (grid-stride over pixels); thread t owns
// channels t, t + T, ... (VPT <= 8 of them, held in registers; T = 256, or 512 above 2048 channels), so
// every LayerNorm reduction is one block_sum and every global access is coalesced along C (the conv weights
// too: the host hands the kernels their taps-major copy [9, cpg, C]).
//   forward:  norm_gelu_kernel         x -> a = GELU(LN1(x)), mean1, rstd1
//             conv_norm_gelu_kernel    a -> conv_out = conv3x3(a) + bias, out = GELU(LN2(conv_out)), mean2, rstd2
//   backward: norm_gelu_backward_kernel     grad_out -> grad_conv_out (fp32) + w2, b2, conv-bias partial sums
//             conv_norm_gelu_backward_kernel grad_conv_out -> grad_a (conv transpose) -> grad_x + w1, b1 partials;
//                                            recomputes a for the weight gradient
//             conv_weight_grad_kernel  grad_conv_out, a -> conv weight partial sums over groups of image rows
#include "cuda/device.cuh"

#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "checks.h"
#include "cuda/reduce.cuh"
#include "cuda/kernel_math.cuh"

namespace structtoken {
namespace {

constexpr const char* kFwd = "depthwise_projection";
constexpr const char* kBwd = "depthwise_projection_backward";
constexpr int kThreads = 256;      // threads per block, doubled to kMaxThreads for C > kThreads * kMaxValuesPerThread
constexpr int kMaxThreads = 512;   // __launch_bounds__ of the per-pixel kernels: at most 128 registers per thread
constexpr int kMaxValuesPerThread = 8;
constexpr int kMaxChannels = kMaxThreads * kMaxValuesPerThread;  // 4096, the ViT-L FFN width
constexpr int64_t kMaxPixelBlocks = 1024;
constexpr int64_t kWeightGradBlocks = 1024;  // target grid size of conv_weight_grad_kernel

// Loads the thread's channels of row[0:C] as float (0 past C).
template <int VPT, typename T>
__device__ __forceinline__ void load_row(const T* __restrict__ row, int C, float (&v)[VPT]) {
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int c = threadIdx.x + j * blockDim.x;
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
    const float d = threadIdx.x + j * blockDim.x < C ? v[j] - mean : 0.f;
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
    const int c = threadIdx.x + j * blockDim.x;
    if (c < C) row[c] = static_cast<T>(v[j]);
  }
}

template <typename scalar_t, int VPT>
__global__ void __launch_bounds__(kMaxThreads) norm_gelu_kernel(
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
__global__ void __launch_bounds__(kMaxThreads) conv_norm_gelu_kernel(
    const scalar_t* __restrict__ a, const scalar_t* __restrict__ conv_wt, const scalar_t* __restrict__ conv_b,
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
      const int c = threadIdx.x + j * blockDim.x;
      y[j] = 0.f;
      if (c >= C) continue;
      float acc = static_cast<float>(conv_b[c]);
      const int group_start = (c / cpg) * cpg;
      for (int t = 0; t < 9; ++t) {
        const int hh = h + tap_dh(t), ww = x_ + tap_dw(t);
        if (hh < 0 || hh >= H || ww < 0 || ww >= W) continue;
        const scalar_t* in = a + (p + tap_dh(t) * W + tap_dw(t)) * C + group_start;
        const scalar_t* wt = conv_wt + static_cast<int64_t>(t) * cpg * C + c;
        for (int ci = 0; ci < cpg; ++ci) acc += static_cast<float>(wt[ci * C]) * static_cast<float>(in[ci]);
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
__global__ void __launch_bounds__(kMaxThreads) norm_gelu_backward_kernel(
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
    for (int j = 0; j < VPT; ++j) gcb[j] += threadIdx.x + j * blockDim.x < C ? dy[j] : 0.f;
    store_row(grad_y + p * C, C, dy);
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * C;
  store_row(partial + blockIdx.x * static_cast<int64_t>(C), C, gw);
  store_row(partial + stride + blockIdx.x * static_cast<int64_t>(C), C, gb);
  store_row(partial + 2 * stride + blockIdx.x * static_cast<int64_t>(C), C, gcb);
}

// partial: [2, gridDim.x, C] sums over this block's pixels of d w1, d b1. Also writes a = GELU(LN1(x)).
template <typename scalar_t, int VPT>
__global__ void __launch_bounds__(kMaxThreads) conv_norm_gelu_backward_kernel(
    const float* __restrict__ grad_y, const scalar_t* __restrict__ x, const float* __restrict__ mean1,
    const float* __restrict__ rstd1, const scalar_t* __restrict__ w1, const scalar_t* __restrict__ b1,
    const scalar_t* __restrict__ conv_wt, scalar_t* __restrict__ grad_x, scalar_t* __restrict__ a,
    float* __restrict__ partial, int64_t P, int H, int W, int C, int cpg) {
  __shared__ float scratch[32];
  float w[VPT], b[VPT], ga[VPT], xin[VPT], dx[VPT], gw[VPT] = {}, gb[VPT] = {};
  load_row(w1, C, w);
  load_row(b1, C, b);
  for (int64_t p = blockIdx.x; p < P; p += gridDim.x) {
    const int h = static_cast<int>((p / W) % H), x_ = static_cast<int>(p % W);
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int c = threadIdx.x + j * blockDim.x;
      ga[j] = 0.f;
      if (c >= C) continue;
      const int group_start = (c / cpg) * cpg, ci = c - group_start;
      float acc = 0.f;
      for (int t = 0; t < 9; ++t) {  // output pixel (h - dh, w - dw) read this pixel through tap t
        const int hh = h - tap_dh(t), ww = x_ - tap_dw(t);
        if (hh < 0 || hh >= H || ww < 0 || ww >= W) continue;
        const float* gy = grad_y + (p - tap_dh(t) * W - tap_dw(t)) * C;
        for (int co = group_start; co < group_start + cpg; ++co)
          acc += static_cast<float>(conv_wt[(static_cast<int64_t>(t) * cpg + ci) * C + co]) * gy[co];
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

// Conv weight gradient. Thread co of block (x, g, z) sums, over the image rows r = g, g + G, ... (G = gridDim.y,
// row r = b * H + h) and every column w, grad_y[r, w, co] * a[r + dh, w + dw, in], for the 9 taps (dh, dw) and
// the TILE input channels in = group_start(co) + z * TILE + i, into
//   partial[g, t, z * TILE + i, co]   (partial: [G, 9, cpg, C]).
// Along a row it slides a 3x3 window of a, so each pixel costs one grad_y load and 3 * TILE loads of a.
template <typename scalar_t, int TILE>
__global__ void __launch_bounds__(kThreads) conv_weight_grad_kernel(
    const float* __restrict__ grad_y, const scalar_t* __restrict__ a, float* __restrict__ partial, int64_t rows,
    int H, int W, int C, int cpg) {
  const int co = blockIdx.x * blockDim.x + threadIdx.x;
  if (co >= C) return;
  const int ci0 = blockIdx.z * TILE, in0 = (co / cpg) * cpg + ci0;
  float acc[9][TILE] = {};
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int h = static_cast<int>(r % H);
    // win[i][j][k]: a at row h + i - 1, column w + j - 1, channel in0 + k; 0 outside the image.
    float win[3][3][TILE];
    auto load_column = [&](int j, int column) {
#pragma unroll
      for (int i = 0; i < 3; ++i) {
        const bool inside = h + i - 1 >= 0 && h + i - 1 < H && column < W;
        const int64_t offset = ((r + i - 1) * W + column) * C + in0;
#pragma unroll
        for (int k = 0; k < TILE; ++k) win[i][j][k] = inside ? static_cast<float>(a[offset + k]) : 0.f;
      }
    };
#pragma unroll
    for (int i = 0; i < 3; ++i)
#pragma unroll
      for (int k = 0; k < TILE; ++k) win[i][0][k] = 0.f;
    load_column(1, 0);
    for (int w = 0; w < W; ++w) {
      load_column(2, w + 1);
      const float g = grad_y[(r * W + w) * C + co];
#pragma unroll
      for (int t = 0; t < 9; ++t)
#pragma unroll
        for (int k = 0; k < TILE; ++k) acc[t][k] += g * win[t / 3][t % 3][k];
#pragma unroll
      for (int i = 0; i < 3; ++i)
#pragma unroll
        for (int k = 0; k < TILE; ++k) {
          win[i][0][k] = win[i][1][k];
          win[i][1][k] = win[i][2][k];
        }
    }
  }
#pragma unroll
  for (int t = 0; t < 9; ++t)
#pragma unroll
    for (int k = 0; k < TILE; ++k)
      partial[((static_cast<int64_t>(blockIdx.y) * 9 + t) * cpg + ci0 + k) * C + co] = acc[t][k];
}

// conv_weight [C, cpg, 3, 3] -> [9, cpg, C]: the weights of tap t and input channel ci of every group,
// contiguous over the output channels, so that the threads of a warp (consecutive channels) load them together.
at::Tensor taps_major(const at::Tensor& conv_weight) { return conv_weight.permute({2, 3, 1, 0}).contiguous(); }

// Calls f(std::integral_constant<int, VPT>, threads) for the per-pixel kernels: 256 threads and the smallest
// VPT in {1, 2, 4, 8} with VPT * 256 >= C, or 512 threads and VPT = 8 for 2048 < C <= 4096.
template <typename F>
void dispatch_values_per_thread(int64_t C, const char* op, F&& f) {
  TORCH_CHECK(C <= kMaxChannels, op, ": the CUDA kernel supports C <= ", kMaxChannels, " channels, got C = ", C,
              "; set STRUCTTOKEN_D2_FORCE_PYTORCH_OPS=1 to use the PyTorch reference");
  const int64_t needed = (C + kThreads - 1) / kThreads;
  if (needed <= 1) f(std::integral_constant<int, 1>{}, kThreads);
  else if (needed <= 2) f(std::integral_constant<int, 2>{}, kThreads);
  else if (needed <= 4) f(std::integral_constant<int, 4>{}, kThreads);
  else if (needed <= kMaxValuesPerThread) f(std::integral_constant<int, kMaxValuesPerThread>{}, kThreads);
  else f(std::integral_constant<int, kMaxValuesPerThread>{}, kMaxThreads);
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
                             kDeviceKernels, kFwd);
  const DeviceGuard guard(x.device());
  const Geometry g = geometry(x, conv_weight, kFwd);
  const auto stats_options = x.options().dtype(at::kFloat);
  auto mean1 = at::empty({x.size(0), g.H, g.W}, stats_options), rstd1 = at::empty_like(mean1);
  auto mean2 = at::empty_like(mean1), rstd2 = at::empty_like(mean1);
  auto out = at::empty_like(x), conv_out = at::empty_like(x);
  if (g.P == 0) return {out, mean1, rstd1, conv_out, mean2, rstd2};
  auto a = at::empty_like(x);
  const auto w1 = norm1_weight.contiguous(), b1 = norm1_bias.contiguous(), cw = taps_major(conv_weight);
  const auto cb = conv_bias.contiguous(), w2 = norm2_weight.contiguous(), b2 = norm2_bias.contiguous();
  const auto stream = current_stream();
  ST_DISPATCH_CUDA_TYPES(x.scalar_type(), kFwd, [&] {
    dispatch_values_per_thread(g.C, kFwd, [&](auto vpt, int threads) {
      constexpr int VPT = decltype(vpt)::value;
      launch(norm_gelu_kernel<scalar_t, VPT>, g.pixel_blocks(), threads, stream,
          x.data_ptr<scalar_t>(), w1.data_ptr<scalar_t>(), b1.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
          mean1.data_ptr<float>(), rstd1.data_ptr<float>(), g.P, g.C, static_cast<float>(eps));
      launch(conv_norm_gelu_kernel<scalar_t, VPT>, g.pixel_blocks(), threads, stream,
          a.data_ptr<scalar_t>(), cw.data_ptr<scalar_t>(), cb.data_ptr<scalar_t>(), w2.data_ptr<scalar_t>(),
          b2.data_ptr<scalar_t>(), conv_out.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), mean2.data_ptr<float>(),
          rstd2.data_ptr<float>(), g.P, g.H, g.W, g.C, g.cpg, static_cast<float>(eps));
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
                             kDeviceKernels, kBwd);  // no conv_bias in the backward: norm2_bias stands in
  check_same_device_dtype(x, "x", grad_out, "grad_out", kBwd);
  check_same_device_dtype(x, "x", conv_out, "conv_out", kBwd);
  TORCH_CHECK(grad_out.sizes() == x.sizes() && conv_out.sizes() == x.sizes(), kBwd,
              ": grad_out and conv_out must have the shape of x ", x.sizes());
  const DeviceGuard guard(x.device());
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
  const auto w1 = norm1_weight.contiguous(), b1 = norm1_bias.contiguous(), cw = taps_major(conv_weight);
  const auto w2 = norm2_weight.contiguous(), b2 = norm2_bias.contiguous();
  const unsigned int blocks = g.pixel_blocks();
  auto grad_y = at::empty(x.sizes(), float_options);
  auto partial2 = at::empty({3, blocks, g.C}, float_options);  // d w2, d b2, d conv_bias
  auto partial1 = at::empty({2, blocks, g.C}, float_options);  // d w1, d b1
  auto grad_x = at::empty_like(x), a = at::empty_like(x);
  // Conv weight gradient: grid (channel blocks, row groups, input-channel tiles of 4, or of 1 when cpg % 4 != 0).
  const int64_t rows = g.P / g.W;
  const bool tile4 = g.cpg % 4 == 0;
  const int64_t channel_blocks = (g.C + kThreads - 1) / kThreads, tiles = tile4 ? g.cpg / 4 : g.cpg;
  TORCH_CHECK(tiles <= 65535, kBwd, ": conv_weight has too many channels per group for the CUDA kernel");
  const int64_t row_groups = std::clamp<int64_t>(kWeightGradBlocks / (channel_blocks * tiles), 1, std::min<int64_t>(rows, 65535));
  auto partial_cw = at::empty({row_groups, 9, g.cpg, g.C}, float_options);
  const auto stream = current_stream();
  ST_DISPATCH_CUDA_TYPES(x.scalar_type(), kBwd, [&] {
    dispatch_values_per_thread(g.C, kBwd, [&](auto vpt, int threads) {
      constexpr int VPT = decltype(vpt)::value;
      launch(norm_gelu_backward_kernel<scalar_t, VPT>, blocks, threads, stream,
          go.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), m2.data_ptr<float>(), r2.data_ptr<float>(),
          w2.data_ptr<scalar_t>(), b2.data_ptr<scalar_t>(), grad_y.data_ptr<float>(), partial2.data_ptr<float>(), g.P,
          g.C);
      launch(conv_norm_gelu_backward_kernel<scalar_t, VPT>, blocks, threads, stream,
          grad_y.data_ptr<float>(), x.data_ptr<scalar_t>(), m1.data_ptr<float>(), r1.data_ptr<float>(),
          w1.data_ptr<scalar_t>(), b1.data_ptr<scalar_t>(), cw.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
          a.data_ptr<scalar_t>(), partial1.data_ptr<float>(), g.P, g.H, g.W, g.C, g.cpg);
    });
    const dim3 grid(static_cast<unsigned int>(channel_blocks), static_cast<unsigned int>(row_groups),
                    static_cast<unsigned int>(tiles));
    launch(tile4 ? conv_weight_grad_kernel<scalar_t, 4> : conv_weight_grad_kernel<scalar_t, 1>, grid, kThreads,
           stream, grad_y.data_ptr<float>(), a.data_ptr<scalar_t>(), partial_cw.data_ptr<float>(), rows, g.H, g.W,
           g.C, g.cpg);
  });
  const auto dtype = x.scalar_type();
  // Separate tensors per gradient: outputs must not alias.
  auto total = [&](const at::Tensor& partial, int i) { return partial[i].sum(0).to(dtype); };
  // [row_groups, 9, cpg, C] -> [C, cpg, 9] -> [C, cpg, 3, 3]
  const auto grad_cw = partial_cw.sum(0).permute({2, 1, 0}).contiguous().view(conv_weight.sizes()).to(dtype);
  return {grad_x, total(partial1, 0), total(partial1, 1), grad_cw, total(partial2, 2), total(partial2, 0),
          total(partial2, 1)};
}

}  // namespace

TORCH_LIBRARY_IMPL(structtoken, ST_CUDA_DISPATCH_KEY, m) {
  m.impl("depthwise_projection", &depthwise_projection_cuda);
  m.impl("depthwise_projection_backward", &depthwise_projection_backward_cuda);
}

}  // namespace structtoken
