// Input validation of the StructToken ops, shared by the CPU and CUDA kernels. Each message names
// the argument and says what is expected.
#pragma once
#include <ATen/ATen.h>

namespace structtoken {

inline void check_same_device_dtype(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                                    const char* name, const char* op) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; move all arguments to one device");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has dtype ", ref.scalar_type(), "; cast all arguments to one dtype");
}

// The tensors a set of kernels accepts: on `device`, in float32 and float64 (CPU) or float32, float16 and
// bfloat16 (CUDA, `reduced_precision`). `name` appears in the messages.
struct KernelBackend {
  at::DeviceType device;
  bool reduced_precision;
  const char* name;
};
inline constexpr KernelBackend kCpuKernels{at::kCPU, false, "CPU"};
inline constexpr KernelBackend kCudaKernels{at::kCUDA, true, "CUDA"};

inline void check_backend(const at::Tensor& t, const char* name, const char* op, const KernelBackend& backend) {
  TORCH_CHECK(t.device().type() == backend.device, op, ": ", name, " must be a ", backend.name, " tensor, got one on ",
              t.device());
  const auto s = t.scalar_type();
  if (backend.reduced_precision) {
    TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
                " must be float32, float16 or bfloat16 on ", backend.name, ", got ", s);
  } else {
    TORCH_CHECK(s == at::kFloat || s == at::kDouble, op, ": ", name, " must be float32 or float64 on ", backend.name,
                ", got ", s, " (use the PyTorch reference for other dtypes)");
  }
}

// q [B, M, N], k [B, C, N], v [B, C, N].
inline void check_slice_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const KernelBackend& backend, const char* op) {
  TORCH_CHECK(q.dim() == 3, op, ": q must be [B, M, N], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 3, op, ": k must be [B, C, N], got shape ", k.sizes());
  TORCH_CHECK(v.dim() == 3, op, ": v must be [B, C, N], got shape ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2), op, ": k must be [B, C, N] with B, N of q ",
              q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.size(1) > 0, op, ": k must have at least one channel (C >= 1) to take the softmax over");
  check_backend(q, "q", op, backend);
  check_same_device_dtype(q, "q", k, "k", op);
  check_same_device_dtype(q, "q", v, "v", op);
}

// The backward's inputs: those of the forward, grad_out [B, M, N] like q, and the forward's probabilities
// probs [B, M, C] in q's dtype.
inline void check_slice_attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& probs,
                                           const KernelBackend& backend, const char* op) {
  check_slice_attention(q, k, v, backend, op);
  check_same_device_dtype(q, "q", grad_out, "grad_out", op);
  TORCH_CHECK(grad_out.sizes() == q.sizes(), op, ": grad_out must have the shape of q ", q.sizes(), ", got ",
              grad_out.sizes());
  check_same_device_dtype(q, "q", probs, "probs", op);
  TORCH_CHECK(probs.dim() == 3 && probs.size(0) == q.size(0) && probs.size(1) == q.size(1) &&
                  probs.size(2) == k.size(1),
              op, ": probs must be [B, M, C] = [", q.size(0), ", ", q.size(1), ", ", k.size(1), "], got ",
              probs.sizes());
}

// x [B, H, W, C] contiguous, conv_weight [C, C / groups, 3, 3], every other parameter [C].
inline void check_depthwise_projection(const at::Tensor& x, const at::Tensor& norm1_weight,
                                       const at::Tensor& norm1_bias, const at::Tensor& conv_weight,
                                       const at::Tensor& conv_bias, const at::Tensor& norm2_weight,
                                       const at::Tensor& norm2_bias, const KernelBackend& backend,
                                       const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be channels-last [B, H, W, C], got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous [B, H, W, C] (call .contiguous())");
  check_backend(x, "x", op, backend);
  const int64_t C = x.size(3);
  TORCH_CHECK(C > 0, op, ": x must have at least one channel");
  TORCH_CHECK(conv_weight.dim() == 4 && conv_weight.size(0) == C && conv_weight.size(2) == 3 &&
                  conv_weight.size(3) == 3 && conv_weight.size(1) > 0 && C % conv_weight.size(1) == 0,
              op, ": conv_weight must be [C, C / groups, 3, 3] with C = ", C, ", got shape ", conv_weight.sizes());
  const std::pair<const at::Tensor*, const char*> vectors[] = {
      {&norm1_weight, "norm1_weight"}, {&norm1_bias, "norm1_bias"}, {&norm2_weight, "norm2_weight"},
      {&norm2_bias, "norm2_bias"}, {&conv_bias, "conv_bias"}};
  for (const auto& [t, name] : vectors) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C, op, ": ", name, " must be [C] with C = ", C, ", got shape ",
                t->sizes());
    check_same_device_dtype(x, "x", *t, name, op);
  }
  check_same_device_dtype(x, "x", conv_weight, "conv_weight", op);
}

// AT_DISPATCH over the dtypes the CUDA kernels implement: float32, float16, bfloat16.
#define ST_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)                      \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

}  // namespace structtoken
