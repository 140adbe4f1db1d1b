// Torch binding of the CUDA GAE kernel (gae_cuda.cu).  Built only where torch has CUDA.

#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <tuple>

#include "gae_common.h"

extern "C" int rlhf_kernels_gae_cuda_launch(const void* rewards, int rewards_code, const void* values,
                                            int values_code, const void* mask, int mask_code, float* advantages,
                                            float* returns, int64_t B, int64_t T, const int64_t* strides,
                                            float gamma, float lam, int carry, void* stream);

namespace rlhf_kernels {
namespace {

int dtype_code(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBool: return kBool;
    case at::kByte: return kUInt8;
    case at::kChar: return kInt8;
    case at::kShort: return kInt16;
    case at::kInt: return kInt32;
    case at::kLong: return kInt64;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    default: TORCH_CHECK(false, "gae_forward: unsupported dtype ", dtype);
  }
  return -1;
}

std::tuple<at::Tensor, at::Tensor> gae_forward_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                                    const at::Tensor& mask, double gamma, double lam, bool carry) {
  TORCH_CHECK(rewards.dim() == 2, "gae_forward: rewards must be 2-D [B, T]");
  TORCH_CHECK(values.sizes() == rewards.sizes() && mask.sizes() == rewards.sizes(),
              "gae_forward: rewards, values and mask must have one shape");
  TORCH_CHECK(rewards.is_cuda() && values.device() == rewards.device() && mask.device() == rewards.device(),
              "gae_forward: CUDA tensors on one device expected");
  const int rewards_code = dtype_code(rewards.scalar_type());
  const int values_code = dtype_code(values.scalar_type());
  TORCH_CHECK(rewards_code >= kFloat16 && rewards_code <= kFloat32 && values_code >= kFloat16 &&
                  values_code <= kFloat32,
              "gae_forward: rewards and values must be float32, bfloat16 or float16");
  const c10::cuda::CUDAGuard guard(rewards.device());
  const int64_t B = rewards.size(0), T = rewards.size(1);
  auto opts = rewards.options().dtype(at::kFloat);
  at::Tensor advantages = at::empty({B, T}, opts);
  at::Tensor returns = at::empty({B, T}, opts);
  if (B == 0 || T == 0) return {advantages, returns};
  const int64_t strides[6] = {rewards.stride(0), rewards.stride(1), values.stride(0),
                              values.stride(1),  mask.stride(0),    mask.stride(1)};
  const int err = rlhf_kernels_gae_cuda_launch(
      rewards.const_data_ptr(), rewards_code, values.const_data_ptr(), values_code, mask.const_data_ptr(),
      dtype_code(mask.scalar_type()), advantages.mutable_data_ptr<float>(), returns.mutable_data_ptr<float>(), B, T,
      strides, static_cast<float>(gamma), static_cast<float>(lam), carry ? 1 : 0,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "gae_forward: CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {advantages, returns};
}

}  // namespace
}  // namespace rlhf_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlhf_kernels CUDA kernels (GAE)";
  m.def("gae_forward", &rlhf_kernels::gae_forward_cuda, "GAE advantages and returns (CUDA, fp32 out)",
        pybind11::arg("rewards"), pybind11::arg("values"), pybind11::arg("mask"), pybind11::arg("gamma"),
        pybind11::arg("lam"), pybind11::arg("carry"));
}
