// The token-level policy-loss core on CPU tensors: the forward's row partial sums and the backward's
// gradient, each in one pass over the inputs, every variant a small struct of per-token vector math
// selected at compile time (one instantiation of the row loops per variant, compute type and instruction
// set).  The loops and the math are in csrc/policy_losses_impl.h.
//
// Rows run in parallel (at::parallel_for).  Each row is walked in chunks of kChunk positions: an input
// already in the compute dtype with unit column stride is read in place, any other (bf16, fp16, a bool or
// integer mask, strided views) is converted into a small buffer; the row's last partial chunk is always
// converted, padded with masked positions.  The math runs on GCC vectors: comparisons and ?: compile to
// compare + blend, branch-free.  The file is compiled twice: 16-byte vectors (4 fp32 / 2 fp64 lanes: SSE2,
// the x86-64 baseline, or NEON) and, on x86-64, 32-byte vectors under `#pragma GCC target("avx2")` (8 / 4
// lanes), chosen at run time by __builtin_cpu_supports: the build has no -march, so one cached module
// serves any CPU.  No FMA: the AVX2 path rounds exactly as the baseline one.  exp and log of the fp32 path
// are vector polynomials (Cephes' expf and logf, within 2 ulp; NaN, ±inf, overflow and denormal results
// handled); the fp64 path calls std::exp / std::log per lane.  Sums accumulate in vector lanes per chunk,
// then in double per row.
//
// Semantics, variant by variant: rlhf_kernels/ops/cpu/policy_losses.py (the PyTorch path: same formulas,
// same order of operations where rounding could differ, same NaN behaviour: masked positions contribute
// exactly 0 whatever they hold, NaN at a valid position propagates).

#include "policy_losses.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cephes.h"
#include "cpu_common.h"

// The vector helpers are inlined into the loops: their by-value vector ABI never crosses a call.
#pragma GCC diagnostic ignored "-Wpsabi"

// Every vector helper is inlined into the row loops (a call would pass the vectors through memory and
// serialise the polynomial chains that the loops otherwise overlap).
#define RLHF_PL_INLINE inline __attribute__((always_inline))

#define RLHF_PL_NS baseline
#define RLHF_PL_BYTES 16
#include "policy_losses_impl.h"
#undef RLHF_PL_NS
#undef RLHF_PL_BYTES

#if defined(__x86_64__) && defined(__GNUC__)
#define RLHF_PL_HAS_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2")
#define RLHF_PL_NS avx2
#define RLHF_PL_BYTES 32
#include "policy_losses_impl.h"
#undef RLHF_PL_NS
#undef RLHF_PL_BYTES
#pragma GCC pop_options
#else
#define RLHF_PL_HAS_AVX2 0
#endif

namespace rlhf_kernels {
namespace {

bool cpu_has_avx2() {
#if RLHF_PL_HAS_AVX2
  static const bool supported = __builtin_cpu_supports("avx2");
  return supported;
#else
  return false;
#endif
}

bool force_baseline = false;  // vector_isa("baseline"): tests run both builds on an AVX2 machine

bool use_avx2() { return cpu_has_avx2() && !force_baseline; }

}  // namespace

std::string policy_losses_vector_isa(const std::string& choice) {
  TORCH_CHECK(choice.empty() || choice == "auto" || choice == "baseline",
              "vector_isa: choice must be '', 'auto' or 'baseline'; got '", choice, "'");
  if (choice == "baseline") force_baseline = true;
  if (choice == "auto") force_baseline = false;
  return use_avx2() ? "avx2" : "baseline";
}

at::Tensor policy_losses_vector_math(const at::Tensor& x, const std::string& fn) {
  const int64_t code = fn == "exp" ? 0 : (fn == "exp_small" ? 1 : (fn == "log" ? 2 : -1));
  TORCH_CHECK(code >= 0, "vector_math: fn must be 'exp', 'exp_small' or 'log'; got '", fn, "'");
#if RLHF_PL_HAS_AVX2
  if (use_avx2()) return avx2::vector_math(x, code);
#endif
  return baseline::vector_math(x, code);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_loss_token_fwd_cpu(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const at::Tensor& mask, const std::optional<at::Tensor>& aux, const std::optional<at::Tensor>& is_weights,
    int64_t variant, const std::vector<double>& params, bool save_derivative) {
  baseline::check_inputs(logprobs, old_logprobs, advantages, mask, aux, is_weights);
  const bool fp64 = baseline::computes_in_double(logprobs, old_logprobs, advantages);
  const bool save = save_derivative;
#if RLHF_PL_HAS_AVX2
  if (use_avx2()) {
    return fp64 ? avx2::forward_as<double>(logprobs, old_logprobs, advantages, mask, aux, is_weights, variant, params,
                                           save)
                : avx2::forward_as<float>(logprobs, old_logprobs, advantages, mask, aux, is_weights, variant, params,
                                          save);
  }
#endif
  return fp64 ? baseline::forward_as<double>(logprobs, old_logprobs, advantages, mask, aux, is_weights, variant,
                                             params, save)
              : baseline::forward_as<float>(logprobs, old_logprobs, advantages, mask, aux, is_weights, variant,
                                            params, save);
}

at::Tensor policy_loss_token_saved_bwd_cpu(const at::Tensor& grad_partials, const at::Tensor& derivative,
                                           const at::Tensor& mask, at::ScalarType grad_dtype) {
  TORCH_CHECK(derivative.dim() == 2 && derivative.is_contiguous() && derivative.device().is_cpu() &&
                  (derivative.scalar_type() == at::kFloat || derivative.scalar_type() == at::kDouble),
              "policy_loss_token_saved_bwd: derivative must be the forward's contiguous [B, T] fp32/fp64 D");
  TORCH_CHECK(mask.sizes() == derivative.sizes() && mask.device().is_cpu(),
              "policy_loss_token_saved_bwd: mask must be the forward's [B, T] CPU mask");
  TORCH_CHECK(grad_partials.dim() == 2 && grad_partials.size(0) == derivative.size(0),
              "policy_loss_token_saved_bwd: grad_partials must be [B, chunks]");
  const bool fp64 = derivative.scalar_type() == at::kDouble;
#if RLHF_PL_HAS_AVX2
  if (use_avx2()) {
    return fp64 ? avx2::saved_backward_as<double>(grad_partials, derivative, mask, grad_dtype)
                : avx2::saved_backward_as<float>(grad_partials, derivative, mask, grad_dtype);
  }
#endif
  return fp64 ? baseline::saved_backward_as<double>(grad_partials, derivative, mask, grad_dtype)
              : baseline::saved_backward_as<float>(grad_partials, derivative, mask, grad_dtype);
}

at::Tensor policy_loss_token_bwd_cpu(const at::Tensor& grad_partials, const at::Tensor& logprobs,
                                     const at::Tensor& old_logprobs, const at::Tensor& advantages,
                                     const at::Tensor& mask, const std::optional<at::Tensor>& aux,
                                     const std::optional<at::Tensor>& is_weights, int64_t variant,
                                     const std::vector<double>& params) {
  baseline::check_inputs(logprobs, old_logprobs, advantages, mask, aux, is_weights);
  TORCH_CHECK(grad_partials.dim() == 2 && grad_partials.size(0) == logprobs.size(0),
              "policy_loss_token_bwd: grad_partials must be [B, chunks]");
  const bool fp64 = baseline::computes_in_double(logprobs, old_logprobs, advantages);
#if RLHF_PL_HAS_AVX2
  if (use_avx2()) {
    return fp64 ? avx2::backward_as<double>(grad_partials, logprobs, old_logprobs, advantages, mask, aux, is_weights,
                                            variant, params)
                : avx2::backward_as<float>(grad_partials, logprobs, old_logprobs, advantages, mask, aux, is_weights,
                                           variant, params);
  }
#endif
  return fp64 ? baseline::backward_as<double>(grad_partials, logprobs, old_logprobs, advantages, mask, aux,
                                              is_weights, variant, params)
              : baseline::backward_as<float>(grad_partials, logprobs, old_logprobs, advantages, mask, aux,
                                             is_weights, variant, params);
}

}  // namespace rlhf_kernels
