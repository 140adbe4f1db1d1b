// GAE on CPU tensors (csrc/gae.cpp); bound into the module by csrc/cpu_bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace rlhf_kernels {

// advantages, returns: fp32 [B, T] contiguous.  mask_mode carry (carry=true) or zero.
std::tuple<at::Tensor, at::Tensor> gae_forward_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                                   const at::Tensor& mask, double gamma, double lam, bool carry);

#ifdef RLHF_KERNELS_BINDINGS
inline void bind_gae(pybind11::module_& m) {
  m.def("gae_forward", &gae_forward_cpu, "GAE advantages and returns (CPU, fp32 out)", pybind11::arg("rewards"),
        pybind11::arg("values"), pybind11::arg("mask"), pybind11::arg("gamma"), pybind11::arg("lam"),
        pybind11::arg("carry"));
}
#endif

}  // namespace rlhf_kernels
