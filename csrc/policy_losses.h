// The token-level policy-loss core on CPU tensors (csrc/policy_losses.cpp); bound into the module by
// csrc/cpu_bindings.cpp.  Semantics: rlhf_kernels/ops/policy_losses.py and its PyTorch path
// rlhf_kernels/ops/cpu/policy_losses.py (the same per-token math, variant by variant).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>
#include <vector>

namespace rlhf_kernels {

// (Σ_t L·w·m [B, 1], statistics [6, B, 1]: Σm, Σ clip·m, Σ clip_lower·m, Σ kl·m, Σ r·m, max r) of the
// variant with code `variant` (its index in TOKEN_VARIANTS; code 11 is the PPO value loss with inputs
// (values, old_values, returns) and p0 = its clip, ∞ for none) and scalars `params` (up to three), in the
// compute dtype (fp64 if any of logprobs / old_logprobs / advantages is fp64, else fp32).  Statistics a
// variant does not have stay 0; Σ r·m and max r only for "vanilla" (code 0).  Third output: with
// `save_derivative`, D = w·∂L/∂lp [B, T] in the compute dtype (0 at masked positions) for
// policy_loss_token_saved_bwd_cpu, else an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_loss_token_fwd_cpu(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const at::Tensor& mask, const std::optional<at::Tensor>& aux, const std::optional<at::Tensor>& is_weights,
    int64_t variant, const std::vector<double>& params, bool save_derivative);

// The backward from the forward's saved D: g_b·m·D at valid positions, exactly 0 elsewhere, in
// `grad_dtype` (logprobs' dtype); the same numbers as policy_loss_token_bwd_cpu.
at::Tensor policy_loss_token_saved_bwd_cpu(const at::Tensor& grad_partials, const at::Tensor& derivative,
                                           const at::Tensor& mask, at::ScalarType grad_dtype);

// ∂/∂logprobs [B, T] in logprobs' dtype: g_b·m·w·∂L/∂lp at valid positions, exactly 0 elsewhere, with
// g_b = Σ_c grad_partials[b, c].
at::Tensor policy_loss_token_bwd_cpu(
    const at::Tensor& grad_partials, const at::Tensor& logprobs, const at::Tensor& old_logprobs,
    const at::Tensor& advantages, const at::Tensor& mask, const std::optional<at::Tensor>& aux,
    const std::optional<at::Tensor>& is_weights, int64_t variant, const std::vector<double>& params);

// The vector width in use ("avx2" or "baseline"); "baseline" forces the 16-byte build, "auto" restores the
// run-time choice, "" only reports.
std::string policy_losses_vector_isa(const std::string& choice);

// For tests: the fp32 path's vector exp ("exp"), small-argument exp ("exp_small") or log ("log") of a
// contiguous fp32 tensor, with the current vector width.
at::Tensor policy_losses_vector_math(const at::Tensor& x, const std::string& fn);

#ifdef RLHF_KERNELS_BINDINGS
inline void bind_policy_losses(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("policy_loss_token_fwd", &policy_loss_token_fwd_cpu,
        "token-level policy-loss core, forward: (loss partials [B, 1], statistics [6, B, 1], saved D or empty)",
        py::arg("logprobs"), py::arg("old_logprobs"), py::arg("advantages"), py::arg("mask"), py::arg("aux"),
        py::arg("is_weights"), py::arg("variant"), py::arg("params"), py::arg("save_derivative") = false);
  m.def("policy_loss_token_saved_bwd", &policy_loss_token_saved_bwd_cpu,
        "token-level policy-loss core, backward from the forward's saved D", py::arg("grad_partials"),
        py::arg("derivative"), py::arg("mask"), py::arg("grad_dtype"));
  m.def("policy_loss_token_bwd", &policy_loss_token_bwd_cpu,
        "token-level policy-loss core, backward: d/d logprobs [B, T]", py::arg("grad_partials"),
        py::arg("logprobs"), py::arg("old_logprobs"), py::arg("advantages"), py::arg("mask"), py::arg("aux"),
        py::arg("is_weights"), py::arg("variant"), py::arg("params"));
  m.def("policy_losses_vector_isa", &policy_losses_vector_isa, "the vector width of the policy-loss kernel",
        py::arg("choice") = "");
  m.def("policy_losses_vector_math", &policy_losses_vector_math, "the kernel's vector exp / log (tests)",
        py::arg("x"), py::arg("fn"));
}
#endif

}  // namespace rlhf_kernels
