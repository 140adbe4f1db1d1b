// Advantage estimators on CPU tensors (csrc/advantages.cpp); bound into the module by csrc/cpu_bindings.cpp.
// The Python side (rlhf_kernels/ops/cpu/advantages.py) registers each function as an op; the semantics of
// each are those of the PyTorch path in rlhf_kernels/ops/advantages.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace rlhf_kernels {

// values [B] (fp32/fp64), mask [B, T] (any dtype) -> values.dtype [B, T]: values[b]·m[b, t] (NaN·0 = NaN
// for a numeric mask; bool mask: values[b] where true, else 0).
at::Tensor advantages_on_tokens_cpu(const at::Tensor& values, const at::Tensor& mask);

// The same product whitened over the valid tokens (weights m, unbiased, eps) and multiplied by m again:
// verl's masked_whiten(values·m, m)·m, statistics in fp64.
at::Tensor advantages_whitened_on_tokens_cpu(const at::Tensor& values, const at::Tensor& mask, double eps);

// remax: G = reverse cumsum of r·m (fp64 accumulation, as torch's CPU cumsum), A = G − b·m where m ≠ 0,
// else 0; both baselines.dtype [B, T].
std::tuple<at::Tensor, at::Tensor> remax_advantages_cpu(const at::Tensor& rewards, const at::Tensor& baselines,
                                                        const at::Tensor& mask);

// reinforce_plus_plus: G by compute_gae's fp32 carry recurrence (values 0, λ = 1), 0 at masked positions,
// whitened over the valid tokens; (A, G) in fp64 when `double_out`, else fp32.
std::tuple<at::Tensor, at::Tensor> reinforce_plus_plus_cpu(const at::Tensor& rewards, const at::Tensor& mask,
                                                           double gamma, double eps, bool double_out);

// optimal_token_baseline (multi_turn = false) and tir_optimal_token_baseline (multi_turn = true): one pass
// per group of samples (``group_ids`` [B]: dense ids in [0, B)), the members' rows processed together.
// (A, G) in fp64 when `double_out`, else fp32.
std::tuple<at::Tensor, at::Tensor> optimal_token_baseline_cpu(
    const at::Tensor& rewards, const at::Tensor& mask, const at::Tensor& group_ids, const at::Tensor& old_log_probs,
    const at::Tensor& sum_pi_squared, const std::optional<at::Tensor>& rollout_is_weights, bool handle_zero_tail,
    double eps, bool multi_turn, bool double_out);

#ifdef RLHF_KERNELS_BINDINGS
inline void bind_advantages(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("advantages_on_tokens", &advantages_on_tokens_cpu, "values[b]·m[b, t] (CPU)", py::arg("values"),
        py::arg("mask"));
  m.def("advantages_whitened_on_tokens", &advantages_whitened_on_tokens_cpu,
        "masked_whiten(values[b]·m, m)·m (CPU)", py::arg("values"), py::arg("mask"), py::arg("eps"));
  m.def("remax_advantages", &remax_advantages_cpu, "remax (advantages, returns) (CPU)", py::arg("rewards"),
        py::arg("baselines"), py::arg("mask"));
  m.def("reinforce_plus_plus", &reinforce_plus_plus_cpu, "reinforce_plus_plus (advantages, returns) (CPU)",
        py::arg("rewards"), py::arg("mask"), py::arg("gamma"), py::arg("eps"), py::arg("double_out"));
  m.def("optimal_token_baseline", &optimal_token_baseline_cpu,
        "(tir_)optimal_token_baseline (advantages, returns) (CPU)", py::arg("rewards"), py::arg("mask"),
        py::arg("group_ids"), py::arg("old_log_probs"), py::arg("sum_pi_squared"), py::arg("rollout_is_weights"),
        py::arg("handle_zero_tail"), py::arg("eps"), py::arg("multi_turn"), py::arg("double_out"));
}
#endif

}  // namespace rlhf_kernels
