// The CUDA runtime as the kernels' host code sees it: device guard, stream, kernel launch, the tensors the
// kernels accept (kDeviceKernels), fp32-output batched GEMMs, and the dispatch key the kernels register
// under. Every csrc/cuda file includes this header first.
//
// Built with -DST_CUDA_EMULATION and the emulator force-included (tests/cuda_emulation/, tests only), the same
// names run the device code on the CPU: launches go to the emulator, tensors are CPU tensors, and the kernels
// register under the CPU key. That build also passes -Dstructtoken=structtoken_emulated, so both its C++
// symbols and its op library differ from the real extension's. Nothing else in csrc/ knows about it.
#pragma once
#include <ATen/ATen.h>

#include <utility>

#include "checks.h"

#ifdef ST_CUDA_EMULATION

#define ST_CUDA_DISPATCH_KEY CPU

namespace structtoken {

inline constexpr KernelBackend kDeviceKernels{at::kCPU, true, "CUDA (emulated on the CPU)"};

struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
using Stream = int;
inline Stream current_stream() { return 0; }

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Stream, Args&&... args) {
  st_emu::launch(kernel, grid, block, 0, std::forward<Args>(args)...);
}

// a @ b as float32, [B, X, Y] x [B, Y, Z] -> [B, X, Z]. ATen's CPU bmm has no output dtype; products of
// float16/bfloat16 values are exact in float32, so upcasting first computes what the GPU's GEMM does.
inline at::Tensor bmm_fp32(const at::Tensor& a, const at::Tensor& b) {
  return at::bmm(a.to(at::kFloat), b.to(at::kFloat));
}

}  // namespace structtoken

#else

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#define ST_CUDA_DISPATCH_KEY CUDA

namespace structtoken {

inline constexpr KernelBackend kDeviceKernels = kCudaKernels;

using DeviceGuard = c10::cuda::CUDAGuard;
using Stream = cudaStream_t;
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// kernel<<<grid, block, 0, stream>>>(args...), then the launch-error check.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Stream stream, Args&&... args) {
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// a @ b as float32 (cuBLAS, fp32 accumulation), [B, X, Y] x [B, Y, Z] -> [B, X, Z].
inline at::Tensor bmm_fp32(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kFloat ? at::bmm(a, b) : at::bmm(a, b, at::kFloat);
}

}  // namespace structtoken

#endif
