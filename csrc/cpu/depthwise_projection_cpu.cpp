// CPU kernels of structtoken::depthwise_projection and depthwise_projection_backward, channels-last, one
// pixel's channels at a time. Same algorithm as the CUDA kernels: forward = (LN1 stats + GELU) pass, then
// (3x3 group conv + LN2 + GELU) pass; backward = (LN2/GELU backward) pass, (conv data backward + LN1/GELU
// backward) pass, and the conv weight reduction. The GELUs and their derivatives go through ATen's vectorised at::gelu /
// at::gelu_backward on whole tensors (scalar erf would dominate the CPU time).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "checks.h"
#include "kernel_math.h"

namespace structtoken {
namespace {

constexpr const char* kFwd = "depthwise_projection";
constexpr const char* kBwd = "depthwise_projection_backward";
constexpr int64_t kPixelsPerChunk = 64;  // pixels whose parameter-gradient partial sums share one row

struct Geometry {
  int64_t B, H, W, C, cpg;  // cpg: input (= output) channels per conv group
  int64_t pixels() const { return B * H * W; }
  // q[t] = pixel index of (h + sign * dh(t), w + sign * dw(t)) for pixel p = (b, h, w), or -1 outside the image.
  void taps(int64_t p, int sign, int64_t (&q)[9]) const {
    const int64_t w = p % W, h = (p / W) % H;
    for (int t = 0; t < 9; ++t) {
      const int64_t dh = sign * tap_dh(t), dw = sign * tap_dw(t);
      const bool inside = h + dh >= 0 && h + dh < H && w + dw >= 0 && w + dw < W;
      q[t] = inside ? p + dh * W + dw : -1;
    }
  }
};

// conv_weight [C, cpg, 3, 3] -> [9, cpg, C]: row (t, ci) holds the weights of input channel ci of every
// group at tap t, contiguous over the output channels.
at::Tensor taps_major(const at::Tensor& conv_weight) {
  return conv_weight.permute({2, 3, 1, 0}).contiguous();
}

Geometry geometry(const at::Tensor& x, const at::Tensor& conv_weight) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), conv_weight.size(1)};
}

// The channels of a conv group are contiguous: group g holds channels [g * cpg, (g + 1) * cpg). N is cpg
// known at compile time (the loops then unroll and vectorise), or 0 for any cpg.

// out[c] += u[c] * v[first channel of c's group], c < C.
template <int N, typename T>
void group_broadcast_mac_n(T* out, const T* u, const T* v, int64_t C, int64_t cpg) {
  const int64_t n = N > 0 ? N : cpg;
  for (int64_t c0 = 0; c0 < C; c0 += n)
    for (int64_t c = c0; c < c0 + n; ++c) out[c] += u[c] * v[c0];
}

// out[first channel of a group] += sum over the group's channels c of u[c] * v[c].
template <int N, typename T>
void group_reduce_mac_n(T* out, const T* u, const T* v, int64_t C, int64_t cpg) {
  const int64_t n = N > 0 ? N : cpg;
  for (int64_t c0 = 0; c0 < C; c0 += n) {
    T sum = 0;
    for (int64_t c = c0; c < c0 + n; ++c) sum += u[c] * v[c];
    out[c0] += sum;
  }
}

template <typename T>
void group_broadcast_mac(T* out, const T* u, const T* v, int64_t C, int64_t cpg) {
  switch (cpg) {
    case 1: return group_broadcast_mac_n<1>(out, u, v, C, cpg);
    case 4: return group_broadcast_mac_n<4>(out, u, v, C, cpg);
    default: return group_broadcast_mac_n<0>(out, u, v, C, cpg);
  }
}

template <typename T>
void group_reduce_mac(T* out, const T* u, const T* v, int64_t C, int64_t cpg) {
  switch (cpg) {
    case 1: return group_reduce_mac_n<1>(out, u, v, C, cpg);
    case 4: return group_reduce_mac_n<4>(out, u, v, C, cpg);
    default: return group_reduce_mac_n<0>(out, u, v, C, cpg);
  }
}

// mean and 1 / sqrt(var + eps) of row[0:C].
template <typename T>
void row_stats(const T* row, int64_t C, double eps, T& mean, T& rstd) {
  T s = 0;
  for (int64_t c = 0; c < C; ++c) s += row[c];
  mean = s / T(C);
  T ss = 0;
  for (int64_t c = 0; c < C; ++c) ss += (row[c] - mean) * (row[c] - mean);
  rstd = T(1) / std::sqrt(ss / T(C) + T(eps));
}

// u [P, C] = (in[p, c] - mean[p]) * rstd[p] * w[c] + b[c], the LayerNorm output (channels-last rows).
template <typename T>
at::Tensor normalized(const at::Tensor& in, const T* mean, const T* rstd, const T* w, const T* b) {
  auto u = at::empty_like(in);
  const int64_t C = in.size(-1), P = in.numel() / C;
  const T* ip = in.data_ptr<T>();
  T* up = u.data_ptr<T>();
  at::parallel_for(0, P, 16, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t c = 0; c < C; ++c) up[p * C + c] = (ip[p * C + c] - mean[p]) * rstd[p] * w[c] + b[c];
  });
  return u;
}

template <typename T>
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& norm1_weight, const at::Tensor& norm1_bias,
                                const at::Tensor& conv_weight, const at::Tensor& conv_bias,
                                const at::Tensor& norm2_weight, const at::Tensor& norm2_bias, double eps) {
  const Geometry g = geometry(x, conv_weight);
  const int64_t C = g.C, P = g.pixels();
  std::vector<at::Tensor> stats;  // mean1, rstd1, mean2, rstd2
  for (int i = 0; i < 4; ++i) stats.push_back(at::empty({g.B, g.H, g.W}, x.options()));
  T* mean1 = stats[0].data_ptr<T>();
  T* rstd1 = stats[1].data_ptr<T>();
  T* mean2 = stats[2].data_ptr<T>();
  T* rstd2 = stats[3].data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  at::parallel_for(0, P, 16, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) row_stats(xp + p * C, C, eps, mean1[p], rstd1[p]);
  });
  const T *w1 = norm1_weight.data_ptr<T>(), *b1 = norm1_bias.data_ptr<T>();
  const at::Tensor a = at::gelu(normalized<T>(x, mean1, rstd1, w1, b1));
  auto conv_out = at::empty_like(x);
  const at::Tensor weight = taps_major(conv_weight);
  const T *ap = a.data_ptr<T>(), *wt = weight.data_ptr<T>(), *cb = conv_bias.data_ptr<T>();
  T* yp = conv_out.data_ptr<T>();
  at::parallel_for(0, P, 16, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      T* y = yp + p * C;
      int64_t q[9];
      g.taps(p, 1, q);
      for (int64_t c = 0; c < C; ++c) y[c] = cb[c];
      for (int t = 0; t < 9; ++t) {
        if (q[t] < 0) continue;
        for (int64_t ci = 0; ci < g.cpg; ++ci) {
          const T* w = wt + (t * g.cpg + ci) * C;
          group_broadcast_mac(y, w, ap + q[t] * C + ci, C, g.cpg);  // input channel ci of each group
        }
      }
      row_stats(y, C, eps, mean2[p], rstd2[p]);
    }
  });
  const auto out = at::gelu(normalized<T>(conv_out, mean2, rstd2, norm2_weight.data_ptr<T>(),
                                          norm2_bias.data_ptr<T>()));
  return {out, stats[0], stats[1], conv_out, stats[2], stats[3]};
}

// LayerNorm backward of one pixel: given du = d(xhat * w + b), returns d(input) in `out`, accumulates d w
// into gw and d b into gb. xhat = (in - mean) * rstd.
template <typename T>
void norm_backward_row(const T* du, const T* in, T mean, T rstd, const T* w, int64_t C, T* out, T* gw, T* gb) {
  T s1 = 0, s2 = 0;
  for (int64_t c = 0; c < C; ++c) {
    const T xhat = (in[c] - mean) * rstd;
    gw[c] += du[c] * xhat;
    gb[c] += du[c];
    s1 += du[c] * w[c];
    s2 += du[c] * w[c] * xhat;
  }
  for (int64_t c = 0; c < C; ++c) {
    const T xhat = (in[c] - mean) * rstd;
    out[c] = rstd * (du[c] * w[c] - s1 / T(C) - xhat * s2 / T(C));
  }
}

template <typename T>
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& norm1_weight,
                                 const at::Tensor& norm1_bias, const at::Tensor& conv_weight,
                                 const at::Tensor& norm2_weight, const at::Tensor& norm2_bias,
                                 const at::Tensor& mean1, const at::Tensor& rstd1, const at::Tensor& conv_out,
                                 const at::Tensor& mean2, const at::Tensor& rstd2) {
  const Geometry g = geometry(x, conv_weight);
  const int64_t C = g.C, P = g.pixels(), chunks = (P + kPixelsPerChunk - 1) / kPixelsPerChunk;
  // Per-chunk partial sums of the vector-parameter gradients: w1, b1, conv bias, w2, b2.
  auto partial = at::zeros({5, chunks, C}, x.options());
  auto grad_y = at::empty_like(x);
  auto grad_x = at::empty_like(x);
  auto grad_a = at::empty_like(x);
  const T *xp = x.data_ptr<T>(), *yp = conv_out.data_ptr<T>();
  const at::Tensor weight = taps_major(conv_weight);
  const T *w1 = norm1_weight.data_ptr<T>(), *b1 = norm1_bias.data_ptr<T>(), *wt = weight.data_ptr<T>();
  const T *w2 = norm2_weight.data_ptr<T>(), *b2 = norm2_bias.data_ptr<T>();
  const T *m1 = mean1.data_ptr<T>(), *r1 = rstd1.data_ptr<T>(), *m2 = mean2.data_ptr<T>(), *r2 = rstd2.data_ptr<T>();
  T *gy = grad_y.data_ptr<T>(), *gx = grad_x.data_ptr<T>(), *ga = grad_a.data_ptr<T>();
  T* part = partial.data_ptr<T>();
  T *gw1 = part, *gb1 = part + chunks * C, *gcb = part + 2 * chunks * C, *gw2 = part + 3 * chunks * C,
    *gb2 = part + 4 * chunks * C;
  // Pass 1: GELU + LN2 backward -> grad_y = d conv_out; conv bias gradient.
  const at::Tensor du2 = at::gelu_backward(grad_out, normalized<T>(conv_out, m2, r2, w2, b2));
  const T* dz = du2.data_ptr<T>();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k)
      for (int64_t p = k * kPixelsPerChunk; p < std::min(P, (k + 1) * kPixelsPerChunk); ++p) {
        norm_backward_row(dz + p * C, yp + p * C, m2[p], r2[p], w2, C, gy + p * C, gw2 + k * C, gb2 + k * C);
        for (int64_t c = 0; c < C; ++c) gcb[k * C + c] += gy[p * C + c];
      }
  });
  // Pass 2: conv data backward -> grad_a, then GELU + LN1 backward -> grad_x; a recomputed for pass 3.
  at::parallel_for(0, P, 16, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      T* grad_a_p = ga + p * C;
      std::fill(grad_a_p, grad_a_p + C, T(0));
      int64_t q[9];
      g.taps(p, -1, q);  // the output pixels that read pixel p, by tap
      for (int t = 0; t < 9; ++t) {
        if (q[t] < 0) continue;
        const T* grad = gy + q[t] * C;
        for (int64_t ci = 0; ci < g.cpg; ++ci) {
          const T* w = wt + (t * g.cpg + ci) * C;
          group_reduce_mac(grad_a_p + ci, w, grad, C, g.cpg);
        }
      }
    }
  });
  const at::Tensor u1 = normalized<T>(x, m1, r1, w1, b1);
  const at::Tensor du1 = at::gelu_backward(grad_a, u1);
  const at::Tensor a = at::gelu(u1);
  const T *du = du1.data_ptr<T>(), *ap = a.data_ptr<T>();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k)
      for (int64_t p = k * kPixelsPerChunk; p < std::min(P, (k + 1) * kPixelsPerChunk); ++p)
        norm_backward_row(du + p * C, xp + p * C, m1[p], r1[p], w1, C, gx + p * C, gw1 + k * C, gb1 + k * C);
  });
  // Pass 3: conv weight gradient, per-chunk partial sums in the [9, cpg, C] layout of taps_major.
  auto partial_w = at::zeros({chunks, 9, g.cpg, C}, x.options());
  T* pw = partial_w.data_ptr<T>();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k)
      for (int64_t p = k * kPixelsPerChunk; p < std::min(P, (k + 1) * kPixelsPerChunk); ++p) {
        int64_t q[9];
        g.taps(p, 1, q);
        const T* grad = gy + p * C;
        for (int t = 0; t < 9; ++t) {
          if (q[t] < 0) continue;
          for (int64_t ci = 0; ci < g.cpg; ++ci) {
            T* acc = pw + ((k * 9 + t) * g.cpg + ci) * C;
            group_broadcast_mac(acc, grad, ap + q[t] * C + ci, C, g.cpg);
          }
        }
      }
  });
  // [9, cpg, C] -> [C, cpg, 9] -> [C, cpg, 3, 3]
  auto grad_cw = partial_w.sum(0).permute({2, 1, 0}).contiguous().view(conv_weight.sizes());
  auto total = [&](int i) { return partial[i].sum(0); };  // separate tensors: outputs must not alias
  return {grad_x, total(0), total(1), grad_cw, total(2), total(3), total(4)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> depthwise_projection_cpu(
    const at::Tensor& x, const at::Tensor& norm1_weight, const at::Tensor& norm1_bias, const at::Tensor& conv_weight,
    const at::Tensor& conv_bias, const at::Tensor& norm2_weight, const at::Tensor& norm2_bias, double eps) {
  check_depthwise_projection(x, norm1_weight, norm1_bias, conv_weight, conv_bias, norm2_weight, norm2_bias,
                             kCpuKernels, kFwd);
  std::vector<at::Tensor> r;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kFwd, [&] {
    r = forward<scalar_t>(x, norm1_weight.contiguous(), norm1_bias.contiguous(), conv_weight.contiguous(),
                          conv_bias.contiguous(), norm2_weight.contiguous(), norm2_bias.contiguous(), eps);
  });
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
depthwise_projection_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& norm1_weight,
                             const at::Tensor& norm1_bias, const at::Tensor& conv_weight,
                             const at::Tensor& norm2_weight, const at::Tensor& norm2_bias, const at::Tensor& mean1,
                             const at::Tensor& rstd1, const at::Tensor& conv_out, const at::Tensor& mean2,
                             const at::Tensor& rstd2) {
  check_depthwise_projection(x, norm1_weight, norm1_bias, conv_weight, norm2_bias, norm2_weight, norm2_bias,
                             kCpuKernels, kBwd);  // no conv_bias in the backward: norm2_bias stands in
  TORCH_CHECK(grad_out.sizes() == x.sizes() && conv_out.sizes() == x.sizes(), kBwd,
              ": grad_out and conv_out must have the shape of x ", x.sizes());
  const auto pixels = x.numel() / x.size(3);
  for (const auto* s : {&mean1, &rstd1, &mean2, &rstd2})
    TORCH_CHECK(s->numel() == pixels, kBwd, ": LayerNorm statistics must be [B, H, W], got ", s->sizes());
  std::vector<at::Tensor> r;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), kBwd, [&] {
    const auto st = x.scalar_type();
    r = backward<scalar_t>(grad_out.to(st).contiguous(), x, norm1_weight.contiguous(), norm1_bias.contiguous(),
                           conv_weight.contiguous(), norm2_weight.contiguous(), norm2_bias.contiguous(),
                           mean1.to(st).contiguous(), rstd1.to(st).contiguous(), conv_out.to(st).contiguous(),
                           mean2.to(st).contiguous(), rstd2.to(st).contiguous());
  });
  return {r[0], r[1], r[2], r[3], r[4], r[5], r[6]};
}

}  // namespace

TORCH_LIBRARY_IMPL(structtoken, CPU, m) {
  m.impl("depthwise_projection", &depthwise_projection_cpu);
  m.impl("depthwise_projection_backward", &depthwise_projection_backward_cpu);
}

}  // namespace structtoken
