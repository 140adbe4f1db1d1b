// policy_losses on CPU tensors (csrc/policy_losses.cpp); bound into the module by csrc/cpu_bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

namespace rlhf_kernels {

#ifdef RLHF_KERNELS_BINDINGS
inline void bind_policy_losses(pybind11::module_& m) { (void)m; }
#endif

}  // namespace rlhf_kernels
