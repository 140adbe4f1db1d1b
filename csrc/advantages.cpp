// Advantage estimators on CPU tensors: the [B, T] passes of rlhf_kernels/ops/advantages.py, fused.
//
// The outcome estimators (grpo, rloo, opo, gpg, ...) compute one value per sequence from O(B) group
// statistics (PyTorch, on [B]); what costs time is writing it onto the tokens, out[b, t] = v[b]·m[b, t]:
// one read of the mask, one write of the output (allocated with huge pages advised: empty_output()).
// The whitened ones (gdpo, reinforce_plus_plus_baseline) whiten that product over the valid tokens; its
// statistics follow from per-row sums of the mask, so they cost one more read of the mask, not of [B, T]
// values.  remax (a reverse cumulative sum) and reinforce_plus_plus (compute_gae's carry recurrence, then
// whitening) are one pass per row plus, for the latter, one pass writing the whitened output.
//
// Every function reads any input dtype (rewards fp16/bf16/fp32/fp64; masks bool, integer or floating)
// and any strides, writes contiguous outputs, and runs rows in parallel (at::parallel_for) with a grain
// that keeps small inputs on the calling thread.  NaN propagates as on the PyTorch path: a numeric mask
// multiplies (NaN·0 = NaN), a bool mask selects; whitening statistics ignore masked positions.
// Whitening statistics are in fp64 (the PyTorch path: fp32 with a power-of-two pivot, docs/whiten.md);
// each row contributes its weight Σm, a pivot p (its mean) and the sums Σ(x − p)·m, Σ(x − p)²·m, merged
// exactly about the global mean (Chan, Golub & LeVeque).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "advantages.h"
#include "cpu_common.h"
#include "gae_common.h"

namespace rlhf_kernels {
namespace {

// Rows per parallel work item: about 2^17 positions (~0.1 ms of one core), so small batches stay on the
// calling thread (waking OpenMP threads costs more than their work there; see csrc/gae.cpp).
int64_t grain_rows(int64_t T) { return std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(T, 1)); }

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<M>{}) with M the C++ type of the mask's dtype.
template <typename F>
void with_mask_type(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kBool: return f(Tag<bool>{});
    case at::kByte: return f(Tag<uint8_t>{});
    case at::kChar: return f(Tag<int8_t>{});
    case at::kShort: return f(Tag<int16_t>{});
    case at::kInt: return f(Tag<int32_t>{});
    case at::kLong: return f(Tag<int64_t>{});
    case at::kHalf: return f(Tag<at::Half>{});
    case at::kBFloat16: return f(Tag<at::BFloat16>{});
    case at::kFloat: return f(Tag<float>{});
    case at::kDouble: return f(Tag<double>{});
    default: TORCH_CHECK(false, op, ": unsupported mask dtype ", dtype);
  }
}

// Calls f(Tag<R>{}) with R the C++ type of a floating dtype.
template <typename F>
void with_float_type(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kHalf: return f(Tag<at::Half>{});
    case at::kBFloat16: return f(Tag<at::BFloat16>{});
    case at::kFloat: return f(Tag<float>{});
    case at::kDouble: return f(Tag<double>{});
    default: TORCH_CHECK(false, op, ": unsupported floating dtype ", dtype);
  }
}

// Calls f(Tag<O>{}) with O = double or float: the output (compute) type.
template <typename F>
void with_out_type(bool is_double, F&& f) {
  if (is_double) return f(Tag<double>{});
  return f(Tag<float>{});
}

// Runs f(stride) with a compile-time stride 1 for contiguous rows (so that loops vectorise), else as given.
template <typename F>
void with_stride(int64_t stride, F&& f) {
  if (stride == 1) return f(std::integral_constant<int64_t, 1>{});
  return f(stride);
}

// x converted to O as torch's .to() does (fp16/bf16 through fp32, exact).
template <typename O, typename X>
inline O as(X x) {
  if constexpr (std::is_same_v<X, at::Half> || std::is_same_v<X, at::BFloat16>) {
    return static_cast<O>(static_cast<float>(x));
  } else {
    return static_cast<O>(x);
  }
}

template <typename M>
constexpr bool kBoolMask = std::is_same_v<M, bool>;

// row[i] as O; a bool mask is read as its byte (0 or 1): loops over it vectorise, over bool loads they do not.
template <typename O, typename M>
inline O mask_at(const M* row, int64_t i) {
  if constexpr (kBoolMask<M>) {
    return static_cast<O>(reinterpret_cast<const uint8_t*>(row)[i]);
  } else {
    return as<O>(row[i]);
  }
}

// keep ? x : +0, branch-free (an AND of the bits): loops over irregular masks do not mispredict, and the
// compiler may vectorise them (it does not turn a floating-point ?: into a select under -ftrapping-math).
template <typename O>
inline O keep_if(bool keep, O x) {
  using U = std::conditional_t<sizeof(O) == 4, uint32_t, uint64_t>;
  U bits;
  std::memcpy(&bits, &x, sizeof(O));
  bits &= U(0) - static_cast<U>(keep);
  std::memcpy(&x, &bits, sizeof(O));
  return x;
}

void check_rows_mask(const at::Tensor& mask, int64_t B, const char* op) {
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B, op, ": mask must be [B, T] with B = ", B);
  TORCH_CHECK(mask.device().is_cpu(), op, ": CPU tensors expected");
}

void check_values(const at::Tensor& values, const char* op) {
  TORCH_CHECK(values.dim() == 1 && values.device().is_cpu(), op, ": values must be a 1-D CPU tensor");
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble, op,
              ": values must be float32 or float64");
}

// --------------------------------------------------------------------------------------------------
// Whitening statistics over the valid tokens (masked_whiten, unbiased, weights m), in fp64.
// --------------------------------------------------------------------------------------------------
struct RowMoments {
  int64_t valid = 0;  // positions with m != 0 (a row without any contributes nothing, even a NaN value)
  double weight = 0;  // Σm
  double pivot = 0;   // the row's weighted mean (any value near it keeps the sums below accurate)
  double first = 0;   // Σ(x − pivot)·m
  double second = 0;  // Σ(x − pivot)²·m
};

struct Whitening {
  double mean;
  double inv_spread;  // 1/√(var + eps); inf when var + eps = 0 (then 0·inf = NaN, as 0/0 on the torch path)
};

Whitening finish_whitening(const std::vector<RowMoments>& rows, double eps) {
  double n = 0, total = 0;
  for (const RowMoments& r : rows) {
    if (r.valid == 0) continue;
    n += r.weight;
    total += r.weight * r.pivot + r.first;
  }
  const double mean = n > 0 ? total / n : 0.0;
  double m2 = 0;
  for (const RowMoments& r : rows) {
    if (r.valid == 0) continue;
    const double shift = mean - r.pivot;  // Σ(x − μ)²m = Σ((x − p) − (μ − p))²m
    m2 += r.second - 2 * shift * r.first + shift * shift * r.weight;
  }
  m2 = m2 < 0 ? 0.0 : m2;  // NaN stays NaN
  const double var = n - 1 > 0 ? m2 / (n - 1) : 0.0;
  double spread = std::sqrt(var + eps);
  if (eps > 0) spread = std::max(spread, static_cast<double>(FLT_MIN));  // masked_whiten's floor
  return {mean, 1.0 / spread};
}

// (x − μ)/spread rounded to fp32, as masked_whiten's output.
inline float whiten(float x, const Whitening& w) { return static_cast<float>((x - w.mean) * w.inv_spread); }

}  // namespace

// --------------------------------------------------------------------------------------------------
// values[b]·m[b, t]
// --------------------------------------------------------------------------------------------------
at::Tensor advantages_on_tokens_cpu(const at::Tensor& values, const at::Tensor& mask) {
  const char* op = "advantages_on_tokens";
  check_values(values, op);
  const int64_t B = values.size(0);
  check_rows_mask(mask, B, op);
  const int64_t T = mask.size(1);
  at::Tensor out = empty_output({B, T}, values.options());
  if (B == 0 || T == 0) return out;
  const at::Tensor v = values.contiguous();
  with_out_type(v.scalar_type() == at::kDouble, [&](auto out_tag) {
    using O = typename decltype(out_tag)::type;
    const O* vp = v.const_data_ptr<O>();
    O* op_ = out.mutable_data_ptr<O>();
    with_mask_type(mask.scalar_type(), op, [&](auto mask_tag) {
      using M = typename decltype(mask_tag)::type;
      const M* mp = static_cast<const M*>(mask.const_data_ptr());
      const int64_t sb = mask.stride(0), st = mask.stride(1);
      at::parallel_for(0, B, grain_rows(T), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const O vb = vp[b];
          const M* row = mp + b * sb;
          O* o = op_ + b * T;
          with_stride(st, [&](auto s) {
            if constexpr (kBoolMask<M>) {
              for (int64_t t = 0; t < T; ++t) o[t] = keep_if(mask_at<uint8_t>(row, t * s) != 0, vb);
            } else {
              for (int64_t t = 0; t < T; ++t) o[t] = vb * as<O>(row[t * s]);
            }
          });
        }
      });
    });
  });
  return out;
}

// --------------------------------------------------------------------------------------------------
// masked_whiten(values[b]·m, m)·m
// --------------------------------------------------------------------------------------------------
at::Tensor advantages_whitened_on_tokens_cpu(const at::Tensor& values, const at::Tensor& mask, double eps) {
  const char* op = "advantages_whitened_on_tokens";
  check_values(values, op);
  const int64_t B = values.size(0);
  check_rows_mask(mask, B, op);
  const int64_t T = mask.size(1);
  at::Tensor out = empty_output({B, T}, values.options());
  if (B == 0 || T == 0) return out;
  const at::Tensor v = values.contiguous();
  with_out_type(v.scalar_type() == at::kDouble, [&](auto out_tag) {
    using O = typename decltype(out_tag)::type;
    const O* vp = v.const_data_ptr<O>();
    O* op_ = out.mutable_data_ptr<O>();
    with_mask_type(mask.scalar_type(), op, [&](auto mask_tag) {
      using M = typename decltype(mask_tag)::type;
      const M* mp = static_cast<const M*>(mask.const_data_ptr());
      const int64_t sb = mask.stride(0), st = mask.stride(1);
      // Pass 1: each row's moments.  The whitened input is x = fp32(v·m) (the PyTorch path's product,
      // then masked_whiten's fp32 copy), weights m in fp32.
      std::vector<RowMoments> moments(B);
      at::parallel_for(0, B, grain_rows(T), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const O vb = vp[b];
          const M* row = mp + b * sb;
          RowMoments r;
          with_stride(st, [&](auto s) {
            if constexpr (kBoolMask<M>) {
              int64_t n = 0;
              for (int64_t t = 0; t < T; ++t) n += mask_at<uint8_t>(row, t * s) != 0;
              r.valid = n;
              r.weight = static_cast<double>(n);
              r.pivot = static_cast<float>(vb);  // every valid x is fp32(v): no deviations
            } else {
              double weighted = 0;
              for (int64_t t = 0; t < T; ++t) {
                const O m = as<O>(row[t * s]);
                if (m == O(0)) continue;
                const double w = as<float>(row[t * s]);
                r.valid += 1;
                r.weight += w;
                weighted += static_cast<double>(static_cast<float>(vb * m)) * w;
              }
              r.pivot = r.weight != 0 ? weighted / r.weight : 0.0;
              for (int64_t t = 0; t < T; ++t) {
                const O m = as<O>(row[t * s]);
                if (m == O(0)) continue;
                const double w = as<float>(row[t * s]);
                const double d = static_cast<double>(static_cast<float>(vb * m)) - r.pivot;
                r.first += d * w;
                r.second += d * d * w;
              }
            }
          });
          moments[b] = r;
        }
      });
      const Whitening w = finish_whitening(moments, eps);
      // Pass 2: the output.
      at::parallel_for(0, B, grain_rows(T), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const O vb = vp[b];
          const M* row = mp + b * sb;
          O* o = op_ + b * T;
          with_stride(st, [&](auto s) {
            if constexpr (kBoolMask<M>) {
              const O value = static_cast<O>(whiten(static_cast<float>(vb), w));
              for (int64_t t = 0; t < T; ++t) o[t] = keep_if(mask_at<uint8_t>(row, t * s) != 0, value);
            } else {
              for (int64_t t = 0; t < T; ++t) {
                const O m = as<O>(row[t * s]);
                o[t] = keep_if(m != O(0), static_cast<O>(whiten(static_cast<float>(vb * m), w)) * m);
              }
            }
          });
        }
      });
    });
  });
  return out;
}

// --------------------------------------------------------------------------------------------------
// remax
// --------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> remax_advantages_cpu(const at::Tensor& rewards, const at::Tensor& baselines,
                                                        const at::Tensor& mask) {
  const char* op = "remax_advantages";
  check_values(baselines, op);
  const int64_t B = baselines.size(0);
  check_rows_mask(mask, B, op);
  TORCH_CHECK(rewards.sizes() == mask.sizes() && rewards.device().is_cpu(), op, ": rewards must be [B, T] on CPU");
  const int64_t T = mask.size(1);
  at::Tensor advantages = empty_output({B, T}, baselines.options());
  at::Tensor returns = empty_output({B, T}, baselines.options());
  if (B == 0 || T == 0) return {advantages, returns};
  const at::Tensor base = baselines.contiguous();
  with_out_type(base.scalar_type() == at::kDouble, [&](auto out_tag) {
    using O = typename decltype(out_tag)::type;
    const O* bp = base.const_data_ptr<O>();
    O* ap = advantages.mutable_data_ptr<O>();
    O* gp = returns.mutable_data_ptr<O>();
    with_float_type(rewards.scalar_type(), op, [&](auto reward_tag) {
      using R = typename decltype(reward_tag)::type;
      with_mask_type(mask.scalar_type(), op, [&](auto mask_tag) {
        using M = typename decltype(mask_tag)::type;
        const R* rp = static_cast<const R*>(rewards.const_data_ptr());
        const M* mp = static_cast<const M*>(mask.const_data_ptr());
        const int64_t rsb = rewards.stride(0), rst = rewards.stride(1);
        const int64_t msb = mask.stride(0), mst = mask.stride(1);
        at::parallel_for(0, B, grain_rows(T), [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) {
            const R* r = rp + b * rsb;
            const M* m = mp + b * msb;
            O* a = ap + b * T;
            O* g = gp + b * T;
            const O base_b = bp[b];
            // Σ_{s ≥ t} r·m from the end, accumulated in fp64 and rounded per position (torch's CPU
            // cumsum of the flipped product: the same additions in the same order).
            double acc = 0;
            for (int64_t t = T - 1; t >= 0; --t) {
              const O reward = as<O>(r[t * rst]);
              O term, scaled_base;
              bool valid;
              if constexpr (kBoolMask<M>) {
                valid = mask_at<uint8_t>(m, t * mst) != 0;
                term = keep_if(valid, reward);
                scaled_base = base_b;
              } else {
                const O mv = as<O>(m[t * mst]);
                valid = mv != O(0);
                term = reward * mv;
                scaled_base = mv * base_b;
              }
              acc += static_cast<double>(term);
              const O gt = static_cast<O>(acc);
              g[t] = gt;
              a[t] = keep_if(valid, gt - scaled_base);
            }
          }
        });
      });
    });
  });
  return {advantages, returns};
}

// --------------------------------------------------------------------------------------------------
// reinforce_plus_plus
// --------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> reinforce_plus_plus_cpu(const at::Tensor& rewards, const at::Tensor& mask,
                                                           double gamma, double eps, bool double_out) {
  const char* op = "reinforce_plus_plus";
  TORCH_CHECK(rewards.dim() == 2 && rewards.device().is_cpu(), op, ": rewards must be a [B, T] CPU tensor");
  const int64_t B = rewards.size(0), T = rewards.size(1);
  check_rows_mask(mask, B, op);
  TORCH_CHECK(mask.size(1) == T, op, ": mask must have the shape of rewards");
  const auto options = rewards.options().dtype(double_out ? at::kDouble : at::kFloat);
  at::Tensor advantages = empty_output({B, T}, options);
  at::Tensor returns = empty_output({B, T}, options);
  if (B == 0 || T == 0) return {advantages, returns};
  const float gamma_f = static_cast<float>(gamma);
  const float gamma_lam = gamma_f * 1.0f;  // compute_gae's γ·λ with λ = 1
  with_out_type(double_out, [&](auto out_tag) {
    using O = typename decltype(out_tag)::type;
    O* ap = advantages.mutable_data_ptr<O>();
    O* gp = returns.mutable_data_ptr<O>();
    with_float_type(rewards.scalar_type(), op, [&](auto reward_tag) {
      using R = typename decltype(reward_tag)::type;
      with_mask_type(mask.scalar_type(), op, [&](auto mask_tag) {
        using M = typename decltype(mask_tag)::type;
        const R* rp = static_cast<const R*>(rewards.const_data_ptr());
        const M* mp = static_cast<const M*>(mask.const_data_ptr());
        const int64_t rsb = rewards.stride(0), rst = rewards.stride(1);
        const int64_t msb = mask.stride(0), mst = mask.stride(1);
        std::vector<RowMoments> moments(B);
        // Pass 1: G by gae_step (values 0: the returns of compute_gae's carry mode, in fp32), 0 at masked
        // positions; the row's moments over its valid positions (weights m in fp32).
        at::parallel_for(0, B, grain_rows(T), [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) {
            const R* r = rp + b * rsb;
            const M* m = mp + b * msb;
            O* g = gp + b * T;
            float next_value = 0.f, last = 0.f;
            RowMoments row;
            double weighted = 0;
            for (int64_t t = T - 1; t >= 0; --t) {
              const float mv = mask_at<float>(m, t * mst);
              const float reward = static_cast<float>(r[t * rst]);  // unused where m = 0 (gae_step)
              gae_step(reward, 0.f, mv, gamma_f, gamma_lam, /*carry=*/true, next_value, last);
              const bool valid = mv != 0.f;
              g[t] = keep_if(valid, static_cast<O>(last));
              if (valid) {
                row.valid += 1;
                row.weight += mv;
                weighted += static_cast<double>(last) * mv;
              }
            }
            row.pivot = row.weight != 0 ? weighted / row.weight : 0.0;
            if (row.valid > 0) {
              for (int64_t t = 0; t < T; ++t) {
                const double w = mask_at<float>(m, t * mst);
                if (w == 0) continue;
                const double d = static_cast<double>(g[t]) - row.pivot;
                row.first += d * w;
                row.second += d * d * w;
              }
            }
            moments[b] = row;
          }
        });
        const Whitening w = finish_whitening(moments, eps);
        // Pass 2: the whitened output, ·m (a numeric mask) or where(m) (bool).
        at::parallel_for(0, B, grain_rows(T), [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) {
            const M* m = mp + b * msb;
            const O* g = gp + b * T;
            O* a = ap + b * T;
            for (int64_t t = 0; t < T; ++t) {
              const O mv = mask_at<O>(m, t * mst);
              const O white = static_cast<O>(whiten(static_cast<float>(g[t]), w));
              if constexpr (kBoolMask<M>) {
                a[t] = keep_if(mv != O(0), white);
              } else {
                a[t] = keep_if(mv != O(0), white * mv);
              }
            }
          }
        });
      });
    });
  });
  return {advantages, returns};
}

}  // namespace rlhf_kernels
