// policy_selection on CPU tensors (csrc/policy_selection.cpp); bound into the module by csrc/cpu_bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

namespace rlhf_kernels {

#ifdef RLHF_KERNELS_BINDINGS
inline void bind_policy_selection(pybind11::module_& m) { (void)m; }
#endif

}  // namespace rlhf_kernels
