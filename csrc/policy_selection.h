// The policy losses' token selections and row pre-passes on CPU tensors (csrc/policy_selection.cpp);
// bound into the module by csrc/cpu_bindings.cpp.  The Python side (ops/cpu/_policy_selection.py)
// validates the arguments; these functions TORCH_CHECK only what they rely on.
//
// Every function takes [B, T] tensors of any floating dtype and any strides (mask: bool, integer or
// floating) and computes in fp64 when any floating input is fp64, else in fp32 (the "compute dtype").
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace rlhf_kernels {

// clip_cov: [B, T] in the compute dtype, 1.0 at the first max(⌊ratio·Σm⌋, 1) tokens in row-major order
// with m > 0, not clipped by the PPO surrogate on r = e^{lp − old} (clip range 1 − clip_low,
// 1 + clip_high) and lower < (A − Ā)(lp − l̄p) < upper, where x̄ = Σ x·m / (Σm + 1e-8) over m ≠ 0.
at::Tensor clip_cov_selection_cpu(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                                  const at::Tensor& advantages, const at::Tensor& mask, double clip_low,
                                  double clip_high, double ratio, double lower, double upper);

// kl_cov: [B, T] in the compute dtype, 1.0 at the max(⌊n·ratio⌋, 1) (0 when n = 0) tokens with m > 0
// of largest (A − Ā)(lp − l̄p), x̄ = Σ x·[m > 0] / max(n, 1).  Order: NaN above +inf, then equal values
// by lower flat index b·T + t first.
at::Tensor kl_cov_selection_cpu(const at::Tensor& logprobs, const at::Tensor& advantages, const at::Tensor& mask,
                                double ratio);

// gspo: [B] in the compute dtype, Σ_t (lp − old)·m / max(Σ_t m, 1) over m ≠ 0.
at::Tensor gspo_log_ratio_cpu(const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& mask);

// geo_mean: [2, B] in the compute dtype of (advantages, is_weights): Σ_t A·m and Σ_t log(w + log_eps)·m
// over m ≠ 0 (the second row 0 without is_weights).
at::Tensor geo_mean_row_sums_cpu(const at::Tensor& advantages, const at::Tensor& mask,
                                 const std::optional<at::Tensor>& is_weights, double log_eps);

#ifdef RLHF_KERNELS_BINDINGS
inline void bind_policy_selection(pybind11::module_& m) {
  using pybind11::arg;
  m.def("clip_cov_selection", &clip_cov_selection_cpu, "clip_cov's selected tokens (CPU)", arg("logprobs"),
        arg("old_logprobs"), arg("advantages"), arg("mask"), arg("clip_low"), arg("clip_high"), arg("ratio"),
        arg("lower"), arg("upper"));
  m.def("kl_cov_selection", &kl_cov_selection_cpu, "kl_cov's selected tokens (CPU)", arg("logprobs"),
        arg("advantages"), arg("mask"), arg("ratio"));
  m.def("gspo_log_ratio", &gspo_log_ratio_cpu, "GSPO's row log-ratio (CPU)", arg("logprobs"),
        arg("old_logprobs"), arg("mask"));
  m.def("geo_mean_row_sums", &geo_mean_row_sums_cpu, "geo_mean's row sums (CPU)", arg("advantages"), arg("mask"),
        arg("is_weights"), arg("log_eps"));
}
#endif

}  // namespace rlhf_kernels
