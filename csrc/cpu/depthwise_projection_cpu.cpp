// CPU kernels of structtoken::depthwise_projection and depthwise_projection_backward, channels-last [B, H, W, C],
// composed of ATen's vectorised CPU kernels: LayerNorm (native_layer_norm and its backward), GELU and the 3x3
// group convolution (oneDNN for float32, on channels-last views). Like the CUDA kernels, the op keeps only x, the
// convolution output and the LayerNorm statistics for the backward, and recomputes the LayerNorm outputs and
// the first GELU there (eager PyTorch keeps four full-size intermediates). The CUDA kernels fuse these steps;
// the tests run their device code on a CPU emulator (tests/cuda_emulation/).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"

namespace structtoken {
namespace {

constexpr const char* kFwd = "depthwise_projection";
constexpr const char* kBwd = "depthwise_projection_backward";

// x [B, H, W, C] -> the same memory as an NCHW tensor [B, C, H, W] (channels-last strides), for ATen's conv.
at::Tensor nchw(const at::Tensor& x) { return x.permute({0, 3, 1, 2}); }

// The NCHW result of a convolution as a contiguous [B, H, W, C] tensor (free when it is channels-last already).
at::Tensor nhwc(const at::Tensor& y) { return y.permute({0, 2, 3, 1}).contiguous(); }

int64_t groups_of(const at::Tensor& x, const at::Tensor& conv_weight) { return x.size(3) / conv_weight.size(1); }

// LayerNorm over the channels of x [B, H, W, C] -> (output [B, H, W, C], mean [B, H, W], rstd [B, H, W]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm(const at::Tensor& x, const at::Tensor& weight,
                                                          const at::Tensor& bias, double eps) {
  auto [out, mean, rstd] = at::native_layer_norm(x, {x.size(3)}, weight, bias, eps);
  const auto stats_shape = x.sizes().slice(0, 3);
  return {out, mean.view(stats_shape), rstd.view(stats_shape)};
}

// The LayerNorm output (x - mean) * rstd * weight + bias recomputed from its statistics (mean, rstd [B, H, W]):
// one vectorised pass over x [B, H, W, C].
at::Tensor normalized(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight,
                      const at::Tensor& bias) {
  auto out = at::empty_like(x);
  const int64_t C = x.size(3), P = x.numel() / C;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "normalized", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    const auto w_c = weight.contiguous(), b_c = bias.contiguous(), m_c = mean.contiguous(), r_c = rstd.contiguous();
    const scalar_t *xp = x.data_ptr<scalar_t>(), *w = w_c.data_ptr<scalar_t>(), *b = b_c.data_ptr<scalar_t>();
    const scalar_t *m = m_c.data_ptr<scalar_t>(), *r = r_c.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, P, 16, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const scalar_t *row = xp + p * C;
        scalar_t* dst = op + p * C;
        const Vec vm(m[p]), vr(r[p]);
        int64_t c = 0;
        for (; c + Vec::size() <= C; c += Vec::size())
          at::vec::fmadd((Vec::loadu(row + c) - vm) * vr, Vec::loadu(w + c), Vec::loadu(b + c)).store(dst + c);
        for (; c < C; ++c) dst[c] = (row[c] - m[p]) * r[p] * w[c] + b[c];
      }
    });
  });
  return out;
}

// (grad_x, grad_weight, grad_bias) of the LayerNorm over channels, from grad of its output.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   const at::Tensor& weight, const at::Tensor& bias) {
  auto stats = [&](const at::Tensor& s) { return s.unsqueeze(-1).contiguous(); };
  return at::native_layer_norm_backward(grad, x, {x.size(3)}, stats(mean), stats(rstd), weight, bias,
                                        {true, true, true});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> depthwise_projection_cpu(
    const at::Tensor& x, const at::Tensor& norm1_weight, const at::Tensor& norm1_bias, const at::Tensor& conv_weight,
    const at::Tensor& conv_bias, const at::Tensor& norm2_weight, const at::Tensor& norm2_bias, double eps) {
  check_depthwise_projection(x, norm1_weight, norm1_bias, conv_weight, conv_bias, norm2_weight, norm2_bias,
                             kCpuKernels, kFwd);
  const auto [u1, mean1, rstd1] = layer_norm(x, norm1_weight, norm1_bias, eps);
  const auto conv_out = nhwc(at::conv2d(nchw(at::gelu(u1)), conv_weight, conv_bias, /*stride=*/1, /*padding=*/1,
                                        /*dilation=*/1, groups_of(x, conv_weight)));
  const auto [u2, mean2, rstd2] = layer_norm(conv_out, norm2_weight, norm2_bias, eps);
  return {at::gelu(u2), mean1, rstd1, conv_out, mean2, rstd2};
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
  const auto st = x.scalar_type();
  const auto m1 = mean1.to(st), r1 = rstd1.to(st), m2 = mean2.to(st), r2 = rstd2.to(st);
  const auto y = conv_out.contiguous();
  // GELU + LN2 backward -> grad of the conv output; the conv bias gradient is its sum over the pixels.
  const auto du2 = at::gelu_backward(grad_out.to(st).contiguous(), normalized(y, m2, r2, norm2_weight, norm2_bias));
  const auto [grad_y, grad_w2, grad_b2] = layer_norm_backward(du2, y, m2, r2, norm2_weight, norm2_bias);
  // Conv backward (data and weight) from a = GELU(LN1(x)), recomputed; then GELU + LN1 backward.
  const auto u1 = normalized(x, m1, r1, norm1_weight, norm1_bias);
  const auto conv_grads = at::convolution_backward(
      nchw(grad_y), nchw(at::gelu(u1)), conv_weight, std::nullopt, /*stride=*/{1, 1}, /*padding=*/{1, 1},
      /*dilation=*/{1, 1}, /*transposed=*/false, /*output_padding=*/{0, 0}, groups_of(x, conv_weight),
      {true, true, false});
  const auto du1 = at::gelu_backward(nhwc(std::get<0>(conv_grads)), u1);
  const auto [grad_x, grad_w1, grad_b1] = layer_norm_backward(du1, x, m1, r1, norm1_weight, norm1_bias);
  return {grad_x, grad_w1, grad_b1, std::get<1>(conv_grads).contiguous(), grad_y.sum({0, 1, 2}), grad_w2, grad_b2};
}

}  // namespace

TORCH_LIBRARY_IMPL(structtoken, CPU, m) {
  m.impl("depthwise_projection", &depthwise_projection_cpu);
  m.impl("depthwise_projection_backward", &depthwise_projection_backward_cpu);
}

}  // namespace structtoken
