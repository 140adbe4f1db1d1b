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
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "advantages.h"
#include "cephes.h"
#include "cpu_common.h"
#include "cpu_lanes.h"
#include "gae_common.h"

namespace rlhf_kernels {
namespace {

// Rows per parallel work item: about 2^17 positions (~0.1 ms of one core), so small batches stay on the
// calling thread (waking OpenMP threads costs more than their work there; see csrc/gae.cpp).
// Rows whose sequential scans run interleaved (independent chains of additions overlap their latencies).
constexpr int64_t kInterleave = 8;
// Positions per buffer fill of the interleaved scans: whole rows up to 8192 positions.  Each fill reads
// the block's rows one after another, a long run of lines per row, which the hardware prefetcher follows;
// chunks of 256 positions (1 KiB per row, chunks in descending address order for the reverse scans) made
// remax 1.6x slower at T = 2048 (16.1 ms against 10.1 ms, best of 20 calls, one thread, [4096, 2048] fp32;
// 7.7 ms with the SSE2 scan of scan_block).
constexpr int64_t kScanChunk = 8192;
constexpr int64_t kSumSpan = 256;  // positions per fp32 partial sum of reinforce_plus_plus' moments
// Positions per step of the optimal-token baselines' first stage (all of a member's inputs, then the next
// step): 64 against whole rows, one thread at [4096, 2048] fp32 under shuffled groups of 8, best of 15:
// optimal_token_baseline 46.0 -> 34.7 ms (256: 42.8, 16: 41.8).
constexpr int64_t kStageChunk = 64;

static_assert(kInterleave % kLanes == 0, "rows are processed a vector at a time (csrc/cpu_lanes.h)");

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
  bool binary = true;  // every m in {0, 1}
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
// The frame of the two broadcast kernels: checks, the [B, T] output of values' dtype, and
// body(out_tag, mask_tag, v, m, mask row stride, mask column stride, out, B, T) with the output type O and
// the mask's element type M as the tags' ::type.
template <typename Body>
at::Tensor on_tokens_frame(const at::Tensor& values, const at::Tensor& mask, const char* op, Body&& body) {
  check_values(values, op);
  const int64_t B = values.size(0);
  check_rows_mask(mask, B, op);
  const int64_t T = mask.size(1);
  at::Tensor out = empty_output({B, T}, values.options());
  if (B == 0 || T == 0) return out;
  const at::Tensor v = values.contiguous();
  with_out_type(v.scalar_type() == at::kDouble, [&](auto out_tag) {
    using O = typename decltype(out_tag)::type;
    with_mask_type(mask.scalar_type(), op, [&](auto mask_tag) {
      using M = typename decltype(mask_tag)::type;
      body(out_tag, mask_tag, v.const_data_ptr<O>(), static_cast<const M*>(mask.const_data_ptr()), mask.stride(0),
           mask.stride(1), out.mutable_data_ptr<O>(), B, T);
    });
  });
  return out;
}

at::Tensor advantages_on_tokens_cpu(const at::Tensor& values, const at::Tensor& mask) {
  return on_tokens_frame(values, mask, "advantages_on_tokens", [&](auto out_tag, auto mask_tag, const auto* vp,
                                                                  const auto* mp, int64_t sb, int64_t st,
                                                                  auto* op_, int64_t B, int64_t T) {
    using O = typename decltype(out_tag)::type;
    using M = typename decltype(mask_tag)::type;
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
}

// --------------------------------------------------------------------------------------------------
// masked_whiten(values[b]·m, m)·m
// --------------------------------------------------------------------------------------------------
at::Tensor advantages_whitened_on_tokens_cpu(const at::Tensor& values, const at::Tensor& mask, double eps) {
  return on_tokens_frame(values, mask, "advantages_whitened_on_tokens", [&](auto out_tag, auto mask_tag,
                                                                           const auto* vp, const auto* mp,
                                                                           int64_t sb, int64_t st, auto* op_,
                                                                           int64_t B, int64_t T) {
    using O = typename decltype(out_tag)::type;
    using M = typename decltype(mask_tag)::type;
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
            // A 0/1 row (the usual case) is the bool case; the test is integer work that vectorises.
            int64_t n = 0;
            int other = 0;
            for (int64_t t = 0; t < T; ++t) {
              const O m = as<O>(row[t * s]);
              n += m != O(0);
              other |= (m != O(0)) & (m != O(1));
            }
            r.valid = n;
            r.binary = other == 0;
            if (r.binary) {
              r.weight = static_cast<double>(n);
              r.pivot = static_cast<float>(vb);
              return;
            }
            double weighted = 0;
            r.valid = 0;
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
          } else if (moments[b].binary) {
            const O value = static_cast<O>(whiten(static_cast<float>(vb), w));
            for (int64_t t = 0; t < T; ++t) o[t] = keep_if(as<O>(row[t * s]) != O(0), value);
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
}

// --------------------------------------------------------------------------------------------------
// remax (and the fp64 scan it shares with the optimal-token baselines)
// --------------------------------------------------------------------------------------------------
namespace {

// In place on kInterleave rows r[0..kInterleave) over positions [0, n): each row's cumulative sum (kReverse:
// from the end), continuing the fp64 sums in acc and rounding each position to O (the additions of torch's
// CPU cumsum, in its order).  One lane per row: every lane does the scalar additions, so the results are
// the scalar loop's bit for bit.  Rows may alias (padding rows of a short block share one scratch row).
template <bool kReverse, typename O>
void scan_block(O* const* r, int64_t n, double* acc) {
  int64_t done = 0;  // positions scanned, counted from the start of the scan
#if defined(__SSE2__)
  if constexpr (std::is_same_v<O, float>) {
    static_assert(kInterleave == 2 * kLanes, "two blocks of four rows");
    // Four positions of four rows at a time, transposed in registers, so that a position of the four rows
    // is one vector: its fp32 -> fp64 conversions and additions are two SSE2 instructions each.
    __m128d sum[4] = {_mm_loadu_pd(acc), _mm_loadu_pd(acc + 2), _mm_loadu_pd(acc + 4), _mm_loadu_pd(acc + 6)};
    for (; done + kLanes <= n; done += kLanes) {
      const int64_t at = kReverse ? n - done - kLanes : done;  // the four positions [at, at + 4)
      for (int64_t h = 0; h < 2; ++h) {
        float* const* q = r + h * kLanes;
        Lanes p0 = load_lanes(q[0] + at), p1 = load_lanes(q[1] + at), p2 = load_lanes(q[2] + at);
        Lanes p3 = load_lanes(q[3] + at);
        transpose4(p0, p1, p2, p3);  // p_k: position at + k of the four rows
        Lanes* const order[4] = {kReverse ? &p3 : &p0, kReverse ? &p2 : &p1, kReverse ? &p1 : &p2,
                                 kReverse ? &p0 : &p3};
        for (Lanes* p : order) {
          const __m128 x = reinterpret_cast<const __m128&>(*p);
          __m128d& lo = sum[2 * h];
          __m128d& hi = sum[2 * h + 1];
          lo = _mm_add_pd(lo, _mm_cvtps_pd(x));
          hi = _mm_add_pd(hi, _mm_cvtps_pd(_mm_movehl_ps(x, x)));
          const __m128 rounded = _mm_movelh_ps(_mm_cvtpd_ps(lo), _mm_cvtpd_ps(hi));
          *p = reinterpret_cast<const Lanes&>(rounded);
        }
        transpose4(p0, p1, p2, p3);  // back to rows
        store_lanes(q[0] + at, p0);
        store_lanes(q[1] + at, p1);
        store_lanes(q[2] + at, p2);
        store_lanes(q[3] + at, p3);
      }
    }
    for (int64_t k = 0; k < 4; ++k) _mm_storeu_pd(acc + 2 * k, sum[k]);
  }
#endif
  for (; done < n; ++done) {  // the last positions of the scan (all of them without SSE2, or for fp64)
    const int64_t t = kReverse ? n - 1 - done : done;
#pragma GCC unroll 8
    for (int64_t j = 0; j < kInterleave; ++j) {  // a fixed count: the sums stay in registers
      acc[j] += static_cast<double>(r[j][t]);
      r[j][t] = static_cast<O>(acc[j]);
    }
  }
}

}  // namespace

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
        // Σ_{s ≥ t} r·m from the end, accumulated in fp64 and rounded per position (torch's CPU cumsum of
        // the flipped product: the same additions in the same order).  kInterleave rows at a time,
        // kScanChunk positions at a time: the products row by row into a buffer, the scans interleaved
        // (their chains of additions are independent, so their latencies overlap), the outputs row by row.
        at::parallel_for(0, B, grain_rows(T), [&](int64_t b0, int64_t b1) {
          const int64_t chunk = std::min(T, kScanChunk);  // the buffer's row length
          std::vector<O> buffer(kInterleave * chunk);
          for (int64_t c0 = b0; c0 < b1; c0 += kInterleave) {
            const int64_t rows = std::min(kInterleave, b1 - c0);
            double acc[kInterleave] = {};
            for (int64_t hi = T; hi > 0; hi -= kScanChunk) {
              const int64_t lo = std::max<int64_t>(0, hi - kScanChunk), n = hi - lo;
              for (int64_t j = 0; j < kInterleave; ++j) {
                O* terms = buffer.data() + j * chunk;
                if (j >= rows) {  // padding rows of the last block: scanned, never stored
                  std::fill(terms, terms + n, O(0));
                  continue;
                }
                const R* r = rp + (c0 + j) * rsb + lo * rst;
                const M* m = mp + (c0 + j) * msb + lo * mst;
                with_stride(rst, [&](auto rs) {
                  with_stride(mst, [&](auto ms) {
                    for (int64_t i = 0; i < n; ++i) {
                      const O reward = as<O>(r[i * rs]);
                      if constexpr (kBoolMask<M>) {
                        terms[i] = keep_if(mask_at<uint8_t>(m, i * ms) != 0, reward);
                      } else {
                        terms[i] = reward * as<O>(m[i * ms]);
                      }
                    }
                  });
                });
              }
              O* block[kInterleave];
              for (int64_t j = 0; j < kInterleave; ++j) block[j] = buffer.data() + j * chunk;
              scan_block</*kReverse=*/true>(block, n, acc);
              for (int64_t j = 0; j < rows; ++j) {
                const int64_t b = c0 + j;
                const M* m = mp + b * msb + lo * mst;
                const O* sums = buffer.data() + j * chunk;
                O* g = gp + b * T + lo;
                O* a = ap + b * T + lo;
                const O base_b = bp[b];
                with_stride(mst, [&](auto ms) {
                  for (int64_t i = 0; i < n; ++i) {
                    const O mv = mask_at<O>(m, i * ms);
                    const O scaled_base = kBoolMask<M> ? base_b : mv * base_b;
                    g[i] = sums[i];
                    a[i] = keep_if(mv != O(0), sums[i] - scaled_base);
                  }
                });
              }
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
        // kInterleave rows at a time as two vectors of kLanes rows (as csrc/gae.cpp), kScanChunk positions
        // at a time: rewards and mask into buffers interleaved [position][row], the steps on vectors, G out
        // row by row.  Each row's moments are about its last valid G: fp32 lane sums over kSumSpan
        // positions, added into fp64 per row (finish_whitening merges the rows about the global mean).
        at::parallel_for(0, B, grain_rows(T), [&](int64_t b0, int64_t b1) {
          const int64_t chunk = std::min(T, kScanChunk);
          std::vector<float> reward_buf(kInterleave * chunk), mask_buf(kInterleave * chunk);
          constexpr bool kFloatInputs = std::is_same_v<R, float> && std::is_same_v<M, float>;
          const bool direct_rows = kFloatInputs && rst == 1 && mst == 1;
          for (int64_t c0 = b0; c0 < b1; c0 += kInterleave) {
            const int64_t rows = std::min(kInterleave, b1 - c0);
            constexpr int64_t kVectors = kInterleave / kLanes;
            Lanes next_value[kVectors] = {}, last[kVectors] = {}, pivot[kVectors] = {};
            LaneMask pivoted[kVectors] = {};
            RowMoments row[kInterleave];
            for (int64_t hi = T; hi > 0; hi -= kScanChunk) {
              const int64_t lo = std::max<int64_t>(0, hi - kScanChunk), n = hi - lo;
              if constexpr (kFloatInputs) {
                if (direct_rows) {  // unit-stride fp32 rows: 4 x 4 blocks transposed in registers
                  rows_to_interleaved(rp + c0 * rsb + lo, rsb, rows, n, reward_buf.data(), kInterleave);
                  rows_to_interleaved(mp + c0 * msb + lo, msb, rows, n, mask_buf.data(), kInterleave);
                }
              }
              for (int64_t j = direct_rows ? rows : 0; j < kInterleave; ++j) {
                if (j >= rows) {  // padding rows of the last block: masked out, never stored
                  for (int64_t i = 0; i < n; ++i) reward_buf[i * kInterleave + j] = mask_buf[i * kInterleave + j] = 0.f;
                  continue;
                }
                const R* r = rp + (c0 + j) * rsb + lo * rst;
                const M* m = mp + (c0 + j) * msb + lo * mst;
                with_stride(rst, [&](auto rs) {
                  with_stride(mst, [&](auto ms) {
                    for (int64_t i = 0; i < n; ++i) {
                      reward_buf[i * kInterleave + j] = as<float>(r[i * rs]);  // unused where m = 0
                      mask_buf[i * kInterleave + j] = mask_at<float>(m, i * ms);
                    }
                  });
                });
              }
              // fp32 lane sums over at most kSumSpan positions at a time, then into the rows' fp64 moments
              for (int64_t top = n; top > 0; top -= kSumSpan) {
                const int64_t bottom = std::max<int64_t>(0, top - kSumSpan);
                Lanes count[kVectors] = {}, weight[kVectors] = {}, first[kVectors] = {}, second[kVectors] = {};
                for (int64_t i = top - 1; i >= bottom; --i) {
                  for (int64_t h = 0; h < kVectors; ++h) {
                    const int64_t at = i * kInterleave + h * kLanes;
                    const Lanes mv = load_lanes(&mask_buf[at]);
                    gae_step(load_lanes(&reward_buf[at]), Lanes{}, mv, gamma_f, gamma_lam, /*carry=*/true,
                             next_value[h], last[h]);
                    const LaneMask valid = mv != 0.f;
                    const Lanes g = valid ? last[h] : Lanes{};  // G, 0 at masked positions
                    store_lanes(&reward_buf[at], g);
                    pivot[h] = (valid & ~pivoted[h]) ? last[h] : pivot[h];
                    pivoted[h] |= valid;
                    const Lanes d = valid ? last[h] - pivot[h] : Lanes{};
                    count[h] += valid ? Lanes{} + 1.f : Lanes{};
                    weight[h] += mv;
                    first[h] += d * mv;
                    second[h] += d * d * mv;
                  }
                }
                for (int64_t j = 0; j < rows; ++j) {
                  const int64_t h = j / kLanes, l = j % kLanes;
                  row[j].valid += static_cast<int64_t>(count[h][l]);
                  row[j].weight += weight[h][l];
                  row[j].first += first[h][l];
                  row[j].second += second[h][l];
                }
              }
              if constexpr (std::is_same_v<O, float>) {
                interleaved_to_rows(reward_buf.data(), kInterleave, rows, n, gp + c0 * T + lo, T);
              } else {
                for (int64_t j = 0; j < rows; ++j) {
                  O* g = gp + (c0 + j) * T + lo;
                  for (int64_t i = 0; i < n; ++i) g[i] = static_cast<O>(reward_buf[i * kInterleave + j]);
                }
              }
            }
            for (int64_t j = 0; j < rows; ++j) {
              row[j].pivot = pivot[j / kLanes][j % kLanes];
              moments[c0 + j] = row[j];
            }
          }
        });
        const Whitening w = finish_whitening(moments, eps);
        // Pass 2: the whitened output, ·m (a numeric mask) or where(m) (bool).
        at::parallel_for(0, B, grain_rows(T), [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) {
            const M* m = mp + b * msb;
            const O* g = gp + b * T;
            O* a = ap + b * T;
            with_stride(mst, [&](auto ms) {
              for (int64_t t = 0; t < T; ++t) {
                const O mv = mask_at<O>(m, t * ms);
                const O white = static_cast<O>(whiten(static_cast<float>(g[t]), w));
                a[t] = keep_if(mv != O(0), kBoolMask<M> ? white : white * mv);
              }
            });
          }
        });
      });
    });
  });
  return {advantages, returns};
}

// --------------------------------------------------------------------------------------------------
// optimal_token_baseline / tir_optimal_token_baseline
// --------------------------------------------------------------------------------------------------
namespace {

// A [B, T] input of any dtype and strides, read a row at a time into a buffer of O (bool as 0/1).
template <typename O>
struct RowSource {
  using Loader = void (*)(const char* row, int64_t stride, int64_t n, O* dst);
  const char* data = nullptr;
  int64_t row_bytes = 0, stride = 0, item = 0;
  Loader load = nullptr;

  RowSource() = default;
  RowSource(const at::Tensor& t, const char* op) {
    data = static_cast<const char*>(t.const_data_ptr());
    row_bytes = t.stride(0) * static_cast<int64_t>(t.element_size());
    stride = t.stride(1);
    item = static_cast<int64_t>(t.element_size());
    with_mask_type(t.scalar_type(), op, [&](auto tag) { load = &load_row<typename decltype(tag)::type>; });
  }
  // Positions [lo, lo + n) of row b.
  void row(int64_t b, int64_t lo, int64_t n, O* dst) const {
    load(data + b * row_bytes + lo * stride * item, stride, n, dst);
  }

  template <typename X>
  static void load_row(const char* row, int64_t stride, int64_t n, O* dst) {
    const X* p = reinterpret_cast<const X*>(row);
    with_stride(stride, [&](auto s) {
      for (int64_t i = 0; i < n; ++i) dst[i] = mask_at<O>(p, i * s);
    });
  }
};

// exp(x) for x in [−87, 88] (fp32: 2^n·p(r), r = x − n·ln 2, Cephes' expf polynomial, within 2 ulp of
// the correctly rounded value; written branch-free so that the loop vectorises); elsewhere (NaN, ±inf,
// over- and underflow) std::exp.
inline float exp_poly(float x) {
  const bool in_range = (x >= -87.0f) & (x <= 88.0f);
  const float xc = keep_if(in_range, x);
  float k = xc * cephes::kLog2e + cephes::kRoundShifter;
  k -= cephes::kRoundShifter;
  float r = xc - k * cephes::kLn2Hi;
  r = r - k * cephes::kLn2Lo;
  const float p = cephes::exp_reduced(r);
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return p * scale;
}

// The row's exp, with the row's original values kept for the special cases.
void exp_row(const float* x, float* e, int64_t n) {
  int outside = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    outside |= !((v >= -87.0f) & (v <= 88.0f));
    e[i] = exp_poly(v);
  }
  if (outside) {
    for (int64_t i = 0; i < n; ++i) {
      if (!(x[i] >= -87.0f && x[i] <= 88.0f)) e[i] = std::exp(x[i]);
    }
  }
}

void exp_row(const double* x, double* e, int64_t n) {
  for (int64_t i = 0; i < n; ++i) e[i] = std::exp(x[i]);
}

// values·m on one row, in place: where(m, v, 0) for a bool mask, v·m for a numeric one.
template <typename O>
inline void on_tokens_row(O* v, const O* m, int64_t n, bool bool_mask) {
  if (bool_mask) {
    for (int64_t i = 0; i < n; ++i) v[i] = keep_if(m[i] != O(0), v[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) v[i] = v[i] * m[i];
  }
}

// In place on each of `count` rows of T: the cumulative sum (reverse: from the end), accumulated in fp64
// and rounded per position, kInterleave rows at a time (a short last block reads and writes `spare`, T
// elements of scratch).
template <bool kReverse, typename O>
void scan_rows(O* const* rows, int64_t count, int64_t T, O* spare) {
  for (int64_t j0 = 0; j0 < count; j0 += kInterleave) {
    O* r[kInterleave];
    for (int64_t l = 0; l < kInterleave; ++l) r[l] = j0 + l < count ? rows[j0 + l] : spare;
    double acc[kInterleave] = {};
    scan_block<kReverse>(r, T, acc);
  }
}

template <typename O>
struct BaselineInputs {
  RowSource<O> rewards, mask, log_probs, pi_squared, is_weights;
  bool has_is_weights, bool_mask, handle_zero_tail, multi_turn;
  O eps;
  int64_t T;
};

// One group (members ascending, as index_add_ adds them): returns G, path weights W, the baseline of each
// position (or k-th valid token) of the group, and the advantages.
template <typename O>
void baseline_group(const BaselineInputs<O>& in, const int64_t* members, int64_t k, O* returns, O* advantages,
                    std::vector<O>& masks, std::vector<O>& work) {
  const int64_t T = in.T;
  masks.resize(static_cast<size_t>(k * T));
  work.resize(static_cast<size_t>(4 * T + (in.multi_turn ? 2 * k * T : 0)));
  O* tmp = work.data();
  O* num = tmp + T;
  O* den = num + T;
  O* base = den + T;
  O* packed_g = in.multi_turn ? base + T : nullptr;          // [k, T]
  O* packed_w = in.multi_turn ? packed_g + k * T : nullptr;  // [k, T]
  // 1. Per member: r·m into its returns row, w·m = (1 − 2·exp(log π) + Σπ²)·ρ²·m into its advantages row.
  // A member's inputs are read kStageChunk positions at a time, each input in turn: the four or five
  // input streams of its row advance together, their (cold, scattered) lines requested side by side.
  for (int64_t j = 0; j < k; ++j) {
    const int64_t b = members[j];
    for (int64_t lo = 0; lo < T; lo += kStageChunk) {
      const int64_t n = std::min(kStageChunk, T - lo);
      O* m = masks.data() + j * T + lo;
      O* g = returns + b * T + lo;
      O* w = advantages + b * T + lo;
      O* x = tmp + lo;
      in.mask.row(b, lo, n, m);
      in.rewards.row(b, lo, n, g);
      on_tokens_row(g, m, n, in.bool_mask);
      in.log_probs.row(b, lo, n, x);
      exp_row(x, w, n);
      in.pi_squared.row(b, lo, n, x);
      for (int64_t t = 0; t < n; ++t) w[t] = O(1) - O(2) * w[t] + x[t];
      if (in.has_is_weights) {
        in.is_weights.row(b, lo, n, x);
        for (int64_t t = 0; t < n; ++t) w[t] = w[t] * (x[t] * x[t]);
      }
      on_tokens_row(w, m, n, in.bool_mask);
    }
  }
  // 2. The scans, kInterleave members' chains at a time (independent additions overlap their latencies):
  // G = reverse cumsum, W = cumsum, each accumulated in fp64 and rounded per position (torch's CPU cumsum).
  std::vector<O*> rows(static_cast<size_t>(k));
  for (int64_t j = 0; j < k; ++j) rows[j] = returns + members[j] * T;
  scan_rows</*kReverse=*/true>(rows.data(), k, T, tmp);
  for (int64_t j = 0; j < k; ++j) rows[j] = advantages + members[j] * T;
  scan_rows</*kReverse=*/false>(rows.data(), k, T, tmp);
  // 3. Σ_g G·W and Σ_g W per position (optimal_token_baseline: W·m; multi-turn: per k-th valid token).
  std::fill(num, num + T, O(0));
  std::fill(den, den + T, O(0));
  std::vector<O> lengths(static_cast<size_t>(k));
  int64_t nonempty = 0;
  for (int64_t j = 0; j < k; ++j) {
    const O* m = masks.data() + j * T;
    const O* g = returns + members[j] * T;
    O* w = advantages + members[j] * T;
    int64_t n = 0;
    int other = 0;
    for (int64_t t = 0; t < T; ++t) {
      n += m[t] != O(0);
      other |= (m[t] != O(0)) & (m[t] != O(1));
    }
    double length = static_cast<double>(n);  // Σm: the count for a 0/1 row (integer work, vectorised)
    if (other) {
      length = 0;
      for (int64_t t = 0; t < T; ++t) length += static_cast<double>(m[t]);
    }
    nonempty += n > 0;
    if (in.multi_turn) {
      lengths[j] = static_cast<O>(n);
      O* pg = packed_g + j * T;
      O* pw = packed_w + j * T;
      int64_t slot = 0;
      for (int64_t t = 0; t < T; ++t) {
        if (m[t] == O(0)) continue;
        pg[slot] = g[t];
        pw[slot] = w[t];
        ++slot;
      }
      for (int64_t i = 0; i < n; ++i) {
        num[i] += pg[i] * pw[i];
        den[i] += pw[i];
      }
    } else {
      lengths[j] = static_cast<O>(length);
      on_tokens_row(w, m, T, in.bool_mask);
      for (int64_t t = 0; t < T; ++t) {
        num[t] += g[t] * w[t];
        den[t] += w[t];
      }
    }
  }
  const int64_t counted = in.multi_turn ? nonempty : k;  // members > 1 for a baseline
  for (int64_t t = 0; t < T; ++t) {
    const O divisor = den[t] + in.eps;
    base[t] = counted > 1 && divisor != O(0) ? num[t] / divisor : O(0);
  }
  // handle_zero_tail: a unique longest member gets no baseline from the second-longest length on.
  int64_t cut_member = -1;
  O second = -std::numeric_limits<O>::infinity();
  if (in.handle_zero_tail && counted > 1) {
    O longest = -std::numeric_limits<O>::infinity();
    for (int64_t j = 0; j < k; ++j) longest = std::max(longest, lengths[j]);
    int64_t at_longest = 0;
    for (int64_t j = 0; j < k; ++j) {
      if (lengths[j] == longest) {
        ++at_longest;
        cut_member = j;
      } else {
        second = std::max(second, lengths[j]);
      }
    }
    if (at_longest != 1) cut_member = -1;
    second = std::floor(second);
  }
  // 4. A = (G − B)·m.
  for (int64_t j = 0; j < k; ++j) {
    const O* m = masks.data() + j * T;
    const O* g = returns + members[j] * T;
    O* a = advantages + members[j] * T;
    const bool cut = j == cut_member;
    if (in.multi_turn) {
      int64_t slot = 0;
      for (int64_t t = 0; t < T; ++t) {
        O baseline = O(0);
        if (m[t] != O(0)) {
          baseline = cut && static_cast<O>(slot) >= second ? O(0) : base[slot];
          ++slot;
        }
        a[t] = g[t] - baseline;
      }
    } else {
      for (int64_t t = 0; t < T; ++t) {
        const O baseline = cut && static_cast<O>(t) >= second ? O(0) : base[t];
        a[t] = g[t] - baseline;
      }
    }
    on_tokens_row(a, m, T, in.bool_mask);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> optimal_token_baseline_cpu(
    const at::Tensor& rewards, const at::Tensor& mask, const at::Tensor& group_ids, const at::Tensor& old_log_probs,
    const at::Tensor& sum_pi_squared, const std::optional<at::Tensor>& rollout_is_weights, bool handle_zero_tail,
    double eps, bool multi_turn, bool double_out) {
  const char* op = "optimal_token_baseline";
  TORCH_CHECK(rewards.dim() == 2 && rewards.device().is_cpu(), op, ": rewards must be a [B, T] CPU tensor");
  const int64_t B = rewards.size(0), T = rewards.size(1);
  check_rows_mask(mask, B, op);
  for (const at::Tensor* t : {&mask, &old_log_probs, &sum_pi_squared}) {
    TORCH_CHECK(t->sizes() == rewards.sizes() && t->device().is_cpu(), op, ": inputs must share rewards' shape");
  }
  const bool has_is_weights = rollout_is_weights.has_value() && rollout_is_weights->defined();
  if (has_is_weights) {
    TORCH_CHECK(rollout_is_weights->sizes() == rewards.sizes() && rollout_is_weights->device().is_cpu(), op,
                ": rollout_is_weights must share rewards' shape");
  }
  TORCH_CHECK(group_ids.dim() == 1 && group_ids.size(0) == B && group_ids.scalar_type() == at::kLong, op,
              ": group_ids must be int64 [B]");
  const auto options = rewards.options().dtype(double_out ? at::kDouble : at::kFloat);
  at::Tensor advantages = empty_output({B, T}, options);
  at::Tensor returns = empty_output({B, T}, options);
  if (B == 0 || T == 0) return {advantages, returns};
  // Members of each group, ascending (a counting sort of the dense ids).
  const at::Tensor ids_t = group_ids.contiguous();
  const int64_t* ids = ids_t.const_data_ptr<int64_t>();
  std::vector<int64_t> offsets(static_cast<size_t>(B + 1), 0);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(ids[b] >= 0 && ids[b] < B, op, ": group ids must lie in [0, B)");
    ++offsets[ids[b] + 1];
  }
  for (int64_t g = 0; g < B; ++g) offsets[g + 1] += offsets[g];
  std::vector<int64_t> members(static_cast<size_t>(B));
  {
    std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
    for (int64_t b = 0; b < B; ++b) members[fill[ids[b]]++] = b;
  }
  std::vector<int64_t> groups;  // the non-empty group slots
  for (int64_t g = 0; g < B; ++g) {
    if (offsets[g + 1] > offsets[g]) groups.push_back(g);
  }
  const int64_t n_groups = static_cast<int64_t>(groups.size());
  const int64_t grain = std::max<int64_t>(1, grain_rows(T) * n_groups / B);
  with_out_type(double_out, [&](auto out_tag) {
    using O = typename decltype(out_tag)::type;
    BaselineInputs<O> in;
    in.rewards = RowSource<O>(rewards, op);
    in.mask = RowSource<O>(mask, op);
    in.log_probs = RowSource<O>(old_log_probs, op);
    in.pi_squared = RowSource<O>(sum_pi_squared, op);
    if (has_is_weights) in.is_weights = RowSource<O>(*rollout_is_weights, op);
    in.has_is_weights = has_is_weights;
    in.bool_mask = mask.scalar_type() == at::kBool;
    in.handle_zero_tail = handle_zero_tail;
    in.multi_turn = multi_turn;
    in.eps = static_cast<O>(eps);
    in.T = T;
    O* ap = advantages.mutable_data_ptr<O>();
    O* gp = returns.mutable_data_ptr<O>();
    at::parallel_for(0, n_groups, grain, [&](int64_t g0, int64_t g1) {
      std::vector<O> masks, work;
      for (int64_t i = g0; i < g1; ++i) {
        const int64_t g = groups[i];
        baseline_group(in, members.data() + offsets[g], offsets[g + 1] - offsets[g], gp, ap, masks, work);
      }
    });
  });
  return {advantages, returns};
}

}  // namespace rlhf_kernels
