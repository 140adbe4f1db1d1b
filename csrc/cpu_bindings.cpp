// The C++ CPU extension module.  Only this file includes torch/extension.h (pybind11 and torch's type
// casters: ~20 s of compile on its own); each kernel file includes ATen only and declares its functions
// in its header, whose bind_<family>() this file calls.
#define RLHF_KERNELS_BINDINGS
#include <torch/extension.h>

#include "advantages.h"
#include "cpu_common.h"
#include "gae.h"
#include "policy_losses.h"
#include "policy_selection.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlhf_kernels C++ CPU kernels (GAE, policy losses, advantage estimators)";
  rlhf_kernels::bind_gae(m);
  rlhf_kernels::bind_policy_losses(m);
  rlhf_kernels::bind_policy_selection(m);
  rlhf_kernels::bind_advantages(m);
  m.def("release_cached_outputs", &rlhf_kernels::release_cached_outputs,
        "frees the output blocks kept for reuse (csrc/cpu_common.h); returns their bytes");
  m.def("cached_output_bytes", &rlhf_kernels::cached_output_bytes, "bytes of output blocks kept for reuse");
}
