// The policy losses' token selections (clip_cov, kl_cov) and row pre-passes (gspo, geo_mean) on CPU
// tensors, each one or two passes over [B, T] instead of a chain of whole-tensor torch ops.
//
// The tokens are walked in "pieces": up to kChunk positions of one row, converted to the compute dtype
// S (fp32, or fp64 when an input is fp64) into small zero-padded buffers (any input dtype, any
// strides).  Sums run on 16-byte vectors (GCC/Clang vector extension, branch-free selects; 16 fp32 or
// 8 fp64 partial sums per piece), then over the pieces in their row-major order in fp64: the result
// does not depend on the number of threads.  Masked positions are never read into a sum (a select, so
// NaN or inf there is ignored); NaN at a valid position propagates as in the PyTorch code
// (ops/cpu/policy_losses.py), whose expressions are evaluated here in the same order and dtype.
//
// clip_cov  pass 1: the masked sums; pass 2: the pieces in row-major order, a round of them at a time
//           (several threads: one piece each), each listing its eligible positions until the budget is
//           met: with the default ratio (2e-4) the first few pieces hold the budget and the rest of the
//           batch is never read again.  e^{lp − old} is evaluated only where the covariance is in range.
// kl_cov    pass 1: the sums over m > 0; pass 2: each thread keeps candidates (covariance, flat index)
//           in a buffer of 2k + 64; when it is full, nth_element keeps the best k and the k-th becomes
//           the bar a later token must pass (a vector compare skips pieces where none can):
//           O(N + k·log(N/k)) expected, O(N) for any ratio up to 1; the threads' candidates are merged
//           with one more nth_element.  The order is total (NaN above +inf, −0 = +0, equal values by
//           lower flat index), so the selected set is unique and thread-independent.
// gspo, geo_mean  one pass over the rows, rows in parallel; geo_mean's logarithm on fp32 vectors.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#include "cephes.h"
#include "cpu_common.h"
#include "policy_selection.h"

namespace rlhf_kernels {
namespace {

constexpr int64_t kChunk = 1024;  // positions per piece: 4 fp64 buffers are 32 KiB (L1)
constexpr int64_t kPad = 16;      // buffers are zero-padded to a multiple of kPad positions
// Work of fewer tokens than this stays on the calling thread (~0.1-0.3 ms of work: waking threads
// on a busy machine costs more, see csrc/gae.cpp).
constexpr int64_t kGrainTokens = int64_t{1} << 17;

// ---------------------------------------------------------------------------------------------------
// Inputs: a [B, T] tensor read a row segment at a time, converted to S.
// ---------------------------------------------------------------------------------------------------
template <typename S>
using Loader = void (*)(const char* src, int64_t stride, int64_t n, S* dst);

template <typename In, typename S>
void load_as(const char* src, int64_t stride, int64_t n, S* dst) {
  const In* p = reinterpret_cast<const In*>(src);
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(p[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(p[i * stride]);
  }
}

template <typename S>
Loader<S> loader_for(at::ScalarType dtype, const char* name) {
  switch (dtype) {
    case at::kFloat: return &load_as<float, S>;
    case at::kDouble: return &load_as<double, S>;
    case at::kHalf: return &load_as<at::Half, S>;
    case at::kBFloat16: return &load_as<at::BFloat16, S>;
    case at::kBool: return &load_as<uint8_t, S>;  // one byte, 0 or 1
    case at::kByte: return &load_as<uint8_t, S>;
    case at::kChar: return &load_as<int8_t, S>;
    case at::kShort: return &load_as<int16_t, S>;
    case at::kInt: return &load_as<int32_t, S>;
    case at::kLong: return &load_as<int64_t, S>;
    default: TORCH_CHECK(false, "policy selection: unsupported dtype for ", name, ": ", dtype);
  }
  return nullptr;
}

template <typename S>
struct Input {
  const char* data;
  int64_t stride_b, stride_t, elem;
  Loader<S> load;

  Input(const at::Tensor& t, const char* name)
      : data(static_cast<const char*>(t.const_data_ptr())),
        stride_b(t.stride(0)),
        stride_t(t.stride(1)),
        elem(static_cast<int64_t>(t.element_size())),
        load(loader_for<S>(t.scalar_type(), name)) {}

  // Positions [t0, t0 + n) of row b into dst, then zeros up to a multiple of kPad (a zero mask there
  // keeps the padding out of every sum).
  void read(int64_t b, int64_t t0, int64_t n, S* dst) const {
    load(data + (b * stride_b + t0 * stride_t) * elem, stride_t, n, dst);
    for (int64_t i = n; i % kPad != 0; ++i) dst[i] = S(0);
  }
};

// The pieces of a [B, T] batch in row-major order: piece p is row p / per_row, positions
// [t0, t0 + n) with t0 = (p % per_row)·kChunk.
struct Pieces {
  int64_t B, T, per_row, count;
  Pieces(int64_t B_, int64_t T_) : B(B_), T(T_), per_row((T_ + kChunk - 1) / kChunk), count(B_ * per_row) {}
  int64_t row(int64_t p) const { return p / per_row; }
  int64_t start(int64_t p) const { return (p % per_row) * kChunk; }
  int64_t size(int64_t p) const { return std::min(kChunk, T - start(p)); }
  // Pieces per parallel task so that a task reads at least kGrainTokens tokens.
  int64_t grain() const { return std::max<int64_t>(1, kGrainTokens / std::min(T, kChunk)); }
};

// Scratch buffers of one task: `count` arrays of kChunk values.
template <typename S>
struct Buffers {
  std::vector<S> data;
  explicit Buffers(int count) : data(static_cast<size_t>(count) * kChunk) {}
  S* operator[](int i) { return data.data() + static_cast<size_t>(i) * kChunk; }
};

// 16-byte vectors of S (4 fp32 or 2 fp64 lanes: SSE2 on x86-64, NEON on ARM) with the GCC/Clang vector
// extension: comparisons give lane masks, and `mask ? x : y` is a branch-free select.
template <typename S>
struct Simd {
  typedef S Vec __attribute__((vector_size(16)));
  static constexpr int64_t kWidth = 16 / static_cast<int64_t>(sizeof(S));
  static Vec load(const S* p) {
    Vec v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(S* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }
};

// log(x) on 4 fp32 lanes: Cephes' logf (x = 2^e·(1 + f), f in [√½ − 1, √2 − 1), log(1 + f) by a
// degree-9 polynomial), within 1 ulp of the exact logarithm (tests/test_policy_selection.py; torch's
// vectorised log is too).  Lanes that are not normal positive finite numbers (0, negative, subnormal,
// inf, NaN) take std::log, so every special value is the C library's.
inline Simd<float>::Vec log_lanes(Simd<float>::Vec x) {
  using Vec = Simd<float>::Vec;
  typedef int32_t Ints __attribute__((vector_size(16)));
  Ints bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const Ints normal = (x >= std::numeric_limits<float>::min()) & (x <= std::numeric_limits<float>::max());
  Ints exponent = ((bits >> 23) & 0xff) - 126;
  const Ints mantissa_bits = (bits & 0x007fffff) | 0x3f000000;  // in [0.5, 1)
  Vec m;
  std::memcpy(&m, &mantissa_bits, sizeof(m));
  const Ints below = m < cephes::kSqrtHalf;
  exponent += below;  // −1 where below
  m = (below ? m + m : m) - 1.0f;
  Vec result = cephes::log_reduced(m, __builtin_convertvector(exponent, Vec));
  for (int64_t j = 0; j < Simd<float>::kWidth; ++j) {
    if (!normal[j]) result[j] = std::log(x[j]);
  }
  return result;
}

// Independent vector accumulators of a sum (their latencies overlap): 16 fp32 or 8 fp64 lanes.
constexpr int64_t kAccumulators = 4;  // Sum::add names them a0..a3
static_assert(kPad % (kAccumulators * Simd<float>::kWidth) == 0, "padding covers an accumulator step");
static_assert(kPad % (kAccumulators * Simd<double>::kWidth) == 0, "padding covers an accumulator step");

template <typename S>
struct Sum {
  typename Simd<S>::Vec acc[kAccumulators] = {};

  // acc += term(i) for i = 0, W, 2W, ... below n rounded up to kPad (term(i) is the vector of the W
  // positions from i; the buffers are zero-padded).
  template <typename Term>
  void add(int64_t n, Term term) {
    constexpr int64_t W = Simd<S>::kWidth;
    typename Simd<S>::Vec a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];  // in registers
    for (int64_t i = 0; i < n; i += kAccumulators * W) {
      a0 += term(i);
      a1 += term(i + W);
      a2 += term(i + 2 * W);
      a3 += term(i + 3 * W);
    }
    acc[0] = a0;
    acc[1] = a1;
    acc[2] = a2;
    acc[3] = a3;
  }

  // The lanes summed in a fixed order, in fp64.
  double total() const {
    double t = 0.0;
    for (int64_t h = 0; h < kAccumulators; ++h) {
      for (int64_t j = 0; j < Simd<S>::kWidth; ++j) t += static_cast<double>(acc[h][j]);
    }
    return t;
  }
};

at::ScalarType compute_type(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (t->scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

void check_inputs(const char* what, const at::Tensor& first, std::initializer_list<const at::Tensor*> others) {
  TORCH_CHECK(first.dim() == 2, what, ": [B, T] tensors expected, got ", first.dim(), " dimensions");
  TORCH_CHECK(first.device().is_cpu(), what, ": CPU tensors expected");
  TORCH_CHECK(at::isFloatingType(first.scalar_type()), what, ": floating tensors expected");
  for (const at::Tensor* t : others) {
    TORCH_CHECK(t->sizes() == first.sizes(), what, ": every tensor must have the shape ", first.sizes());
    TORCH_CHECK(t->device().is_cpu(), what, ": CPU tensors expected");
  }
}

// Zeros of shape [B, T] in S (huge pages advised), filled in parallel.
template <typename S>
at::Tensor zeros_output(const at::Tensor& like, int64_t B, int64_t T) {
  at::Tensor out = empty_output({B, T}, like.options().dtype(c10::CppTypeToScalarType<S>::value));
  S* data = out.mutable_data_ptr<S>();
  at::parallel_for(0, B * T, 4 * kGrainTokens, [&](int64_t begin, int64_t end) {
    std::memset(data + begin, 0, static_cast<size_t>(end - begin) * sizeof(S));  // all-zero bits are 0.0
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Pass 1 of clip_cov / kl_cov: Σ A·w, Σ lp·w and Σ w over the batch, w = m where m ≠ 0 (clip_cov) or
// w = [m > 0] (kl_cov); products at other positions are never added.
// ---------------------------------------------------------------------------------------------------
struct BatchSums {
  double adv = 0.0, lp = 0.0, weight = 0.0;
};

template <typename S, bool kIndicator>
BatchSums batch_sums(const Input<S>& lp, const Input<S>& adv, const Input<S>& mask, const Pieces& pieces) {
  using V = Simd<S>;
  using Vec = typename V::Vec;
  std::vector<BatchSums> partial(static_cast<size_t>(pieces.count));
  at::parallel_for(0, pieces.count, pieces.grain(), [&](int64_t p_begin, int64_t p_end) {
    Buffers<S> buf(3);
    S *l = buf[0], *a = buf[1], *m = buf[2];
    for (int64_t p = p_begin; p < p_end; ++p) {
      const int64_t b = pieces.row(p), t0 = pieces.start(p), n = pieces.size(p);
      lp.read(b, t0, n, l);
      adv.read(b, t0, n, a);
      mask.read(b, t0, n, m);
      // Σw per piece in S: exact for 0/1 masks (at most kChunk / 8 terms per lane).
      Sum<S> sa, sl, sw;
      const Vec zero = {}, one = zero + S(1);
      if (kIndicator) {
        sa.add(n, [&](int64_t i) { return V::load(m + i) > zero ? V::load(a + i) : zero; });
        sl.add(n, [&](int64_t i) { return V::load(m + i) > zero ? V::load(l + i) : zero; });
        sw.add(n, [&](int64_t i) { return V::load(m + i) > zero ? one : zero; });
      } else {
        sa.add(n, [&](int64_t i) {
          const Vec w = V::load(m + i);
          return w != zero ? V::load(a + i) * w : zero;
        });
        sl.add(n, [&](int64_t i) {
          const Vec w = V::load(m + i);
          return w != zero ? V::load(l + i) * w : zero;
        });
        sw.add(n, [&](int64_t i) { return V::load(m + i); });
      }
      BatchSums& out = partial[static_cast<size_t>(p)];
      out.adv = sa.total();
      out.lp = sl.total();
      out.weight = sw.total();
    }
  });
  BatchSums total;
  for (const BatchSums& s : partial) {
    total.adv += s.adv;
    total.lp += s.lp;
    total.weight += s.weight;
  }
  return total;
}

// ---------------------------------------------------------------------------------------------------
// clip_cov
// ---------------------------------------------------------------------------------------------------
template <typename S>
struct ClipCovTerms {
  S mean_adv, mean_lp, lower, upper, ratio_lo, ratio_hi;
};

// The eligible positions of one piece, in order, at most `cap` of them; returns how many.
template <typename S>
int64_t clip_cov_eligible(const S* l, const S* o, const S* a, const S* m, int64_t n, const ClipCovTerms<S>& c,
                          int64_t cap, int32_t* positions) {
  int64_t found = 0;
  for (int64_t i = 0; i < n && found < cap; ++i) {
    if (!(m[i] > 0)) continue;
    const S cov = (a[i] - c.mean_adv) * (l[i] - c.mean_lp);
    if (!(cov > c.lower && cov < c.upper)) continue;  // NaN: not eligible
    const S ratio = std::exp(l[i] - o[i]);
    const S clamped = ratio < c.ratio_lo ? c.ratio_lo : (ratio > c.ratio_hi ? c.ratio_hi : ratio);  // NaN stays
    const S neg_adv = -a[i];
    if (neg_adv * clamped > neg_adv * ratio) continue;  // clipped (loss2 > loss1)
    positions[found++] = static_cast<int32_t>(i);
  }
  return found;
}

template <typename S>
at::Tensor clip_cov_selection_impl(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                                   const at::Tensor& advantages, const at::Tensor& mask, double clip_low,
                                   double clip_high, double ratio, double lower, double upper) {
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  at::Tensor out = zeros_output<S>(logprobs, B, T);
  if (B == 0 || T == 0) return out;
  const Input<S> lp(logprobs, "logprobs"), old(old_logprobs, "old_logprobs"), adv(advantages, "advantages"),
      m_in(mask, "mask");
  const Pieces pieces(B, T);
  const BatchSums sums = batch_sums<S, false>(lp, adv, m_in, pieces);
  // verl's masked_mean: Σ x·m / (Σm + 1e-8), each step in S as the PyTorch path.
  const S denominator = static_cast<S>(sums.weight) + static_cast<S>(1e-8);
  const ClipCovTerms<S> terms{static_cast<S>(sums.adv) / denominator, static_cast<S>(sums.lp) / denominator,
                              static_cast<S>(lower), static_cast<S>(upper), static_cast<S>(1.0 - clip_low),
                              static_cast<S>(1.0 + clip_high)};
  const double budget_f = std::floor(ratio * sums.weight);  // max(⌊ratio·Σm⌋, 1); NaN selects nothing
  int64_t remaining = std::isnan(budget_f) ? 0 : static_cast<int64_t>(std::min(std::max(budget_f, 1.0), double(B * T)));

  // Rounds of `width` consecutive pieces, one per task; a single piece per round on one thread or for
  // a small batch.
  const int64_t threads = at::get_num_threads();
  const int64_t width = (threads > 1 && B * T >= kGrainTokens) ? 4 * threads : 1;
  std::vector<int32_t> positions(static_cast<size_t>(width * kChunk));
  std::vector<int64_t> found(static_cast<size_t>(width));
  S* selected = out.mutable_data_ptr<S>();
  for (int64_t first = 0; first < pieces.count && remaining > 0; first += width) {
    const int64_t round = std::min(width, pieces.count - first);
    const int64_t cap = remaining;
    at::parallel_for(0, round, 1, [&](int64_t j_begin, int64_t j_end) {
      Buffers<S> buf(4);
      for (int64_t j = j_begin; j < j_end; ++j) {
        const int64_t p = first + j, b = pieces.row(p), t0 = pieces.start(p), n = pieces.size(p);
        m_in.read(b, t0, n, buf[3]);
        lp.read(b, t0, n, buf[0]);
        old.read(b, t0, n, buf[1]);
        adv.read(b, t0, n, buf[2]);
        found[j] = clip_cov_eligible(buf[0], buf[1], buf[2], buf[3], n, terms, cap, positions.data() + j * kChunk);
      }
    });
    for (int64_t j = 0; j < round && remaining > 0; ++j) {
      const int64_t p = first + j, take = std::min(found[j], remaining);
      S* row = selected + pieces.row(p) * T + pieces.start(p);
      for (int64_t i = 0; i < take; ++i) row[positions[j * kChunk + i]] = S(1);
      remaining -= take;
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------
// kl_cov
// ---------------------------------------------------------------------------------------------------
// An unsigned key with the order of the values, NaN above +inf and −0 equal to +0.
template <typename S>
struct OrderKey;

template <>
struct OrderKey<float> {
  using type = uint32_t;
  static type of(float v) {
    if (std::isnan(v)) return std::numeric_limits<type>::max();
    if (v == 0.0f) v = 0.0f;
    type u;
    std::memcpy(&u, &v, sizeof(u));
    return (u >> 31) ? ~u : (u | (type{1} << 31));
  }
  static float value(type key) {
    if (key == std::numeric_limits<type>::max()) return std::numeric_limits<float>::quiet_NaN();
    const type u = (key >> 31) ? (key & ~(type{1} << 31)) : ~key;
    float v;
    std::memcpy(&v, &u, sizeof(v));
    return v;
  }
};

template <>
struct OrderKey<double> {
  using type = uint64_t;
  static type of(double v) {
    if (std::isnan(v)) return std::numeric_limits<type>::max();
    if (v == 0.0) v = 0.0;
    type u;
    std::memcpy(&u, &v, sizeof(u));
    return (u >> 63) ? ~u : (u | (type{1} << 63));
  }
  static double value(type key) {
    if (key == std::numeric_limits<type>::max()) return std::numeric_limits<double>::quiet_NaN();
    const type u = (key >> 63) ? (key & ~(type{1} << 63)) : ~key;
    double v;
    std::memcpy(&v, &u, sizeof(v));
    return v;
  }
};

template <typename S>
struct Candidate {
  typename OrderKey<S>::type key;
  int64_t index;  // flat b·T + t
};

// The selection order: a larger value first, equal values by lower flat index.
template <typename S>
inline bool ranks_before(const Candidate<S>& x, const Candidate<S>& y) {
  return x.key > y.key || (x.key == y.key && x.index < y.index);
}

template <typename S>
at::Tensor kl_cov_selection_impl(const at::Tensor& logprobs, const at::Tensor& advantages, const at::Tensor& mask,
                                 double ratio) {
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  at::Tensor out = zeros_output<S>(logprobs, B, T);
  if (B == 0 || T == 0) return out;
  const Input<S> lp(logprobs, "logprobs"), adv(advantages, "advantages"), m_in(mask, "mask");
  const Pieces pieces(B, T);
  const BatchSums sums = batch_sums<S, true>(lp, adv, m_in, pieces);
  const double valid = sums.weight;  // an exact count
  if (valid == 0.0) return out;
  const int64_t k = static_cast<int64_t>(std::min(std::max(std::floor(valid * ratio), 1.0), valid));
  const S denominator = static_cast<S>(valid);
  const S mean_adv = static_cast<S>(sums.adv) / denominator, mean_lp = static_cast<S>(sums.lp) / denominator;

  using Key = typename OrderKey<S>::type;
  using V = Simd<S>;
  using Vec = typename V::Vec;
  using Lanes = decltype(Vec{} > Vec{});
  const Vec zero = {};
  std::vector<Candidate<S>> candidates;
  std::mutex merge;
  const size_t capacity = static_cast<size_t>(2 * k + 64);
  at::parallel_for(0, pieces.count, pieces.grain(), [&](int64_t p_begin, int64_t p_end) {
    // This task's candidates: once `capacity` are kept, nth_element keeps the best k and their worst
    // becomes the bar.  The scan visits indices in increasing order, so a later value equal to the
    // bar ranks after it: a token is kept iff its key is above the bar's.  The bar's value (NaN
    // until there is a bar) filters first: c <= bar_value (false for NaN) cannot pass.
    std::vector<Candidate<S>> kept;
    kept.reserve(std::min(capacity, static_cast<size_t>((p_end - p_begin) * kChunk)));
    bool has_bar = false;
    Key bar = 0;
    S bar_scalar = std::numeric_limits<S>::quiet_NaN();
    Vec bar_value = zero + bar_scalar;
    Buffers<S> buf(4);
    S *l = buf[0], *a = buf[1], *m = buf[2], *cov = buf[3];
    for (int64_t p = p_begin; p < p_end; ++p) {
      const int64_t b = pieces.row(p), t0 = pieces.start(p), n = pieces.size(p);
      m_in.read(b, t0, n, m);
      lp.read(b, t0, n, l);
      adv.read(b, t0, n, a);
      Lanes passing = {};  // a lane is nonzero where a valid token may pass the bar: above it, or NaN
      for (int64_t i = 0; i < n; i += V::kWidth) {
        const Vec c = (V::load(a + i) - mean_adv) * (V::load(l + i) - mean_lp);
        V::store(cov + i, c);
        passing |= (V::load(m + i) > zero) & ~(c <= bar_value);
      }
      if (has_bar) {
        bool any = false;
        for (int64_t j = 0; j < V::kWidth; ++j) any |= passing[j] != 0;
        if (!any) continue;  // the usual case once the bar is set: one vector pass per piece
      }
      const int64_t base = b * T + t0;
      for (int64_t i = 0; i < n; ++i) {
        if (!(m[i] > 0) || cov[i] <= bar_scalar) continue;
        const Key key = OrderKey<S>::of(cov[i]);
        if (has_bar && !(key > bar)) continue;
        kept.push_back({key, base + i});
        if (kept.size() == capacity) {
          std::nth_element(kept.begin(), kept.begin() + (k - 1), kept.end(), ranks_before<S>);
          kept.resize(static_cast<size_t>(k));
          bar = kept.back().key;
          bar_scalar = OrderKey<S>::value(bar);
          bar_value = zero + bar_scalar;
          has_bar = true;
        }
      }
    }
    std::lock_guard<std::mutex> lock(merge);
    candidates.insert(candidates.end(), kept.begin(), kept.end());
  });
  TORCH_CHECK(static_cast<int64_t>(candidates.size()) >= k, "kl_cov_selection: fewer candidates than k");
  std::nth_element(candidates.begin(), candidates.begin() + (k - 1), candidates.end(), ranks_before<S>);
  S* selected = out.mutable_data_ptr<S>();
  for (int64_t i = 0; i < k; ++i) selected[candidates[static_cast<size_t>(i)].index] = S(1);
  return out;
}

// w[i] = log(w[i] + eps) where m[i] ≠ 0, else 0, for the padded n positions.
inline void log_weights(float* w, const float* m, int64_t n, float eps) {
  using V = Simd<float>;
  const V::Vec zero = {};
  for (int64_t i = 0; i < n; i += V::kWidth) {
    const auto valid = V::load(m + i) != zero;
    if (!(valid[0] | valid[1] | valid[2] | valid[3])) {  // a masked stretch (padding): no logarithm
      V::store(w + i, zero);
      continue;
    }
    V::store(w + i, valid ? log_lanes(V::load(w + i) + eps) : zero);
  }
}

inline void log_weights(double* w, const double* m, int64_t n, double eps) {
  for (int64_t i = 0; i < n; ++i) w[i] = m[i] != 0 ? std::log(w[i] + eps) : 0.0;
}

// ---------------------------------------------------------------------------------------------------
// Row passes: out[r][b] for rows b in parallel, each row walked in pieces of kChunk.
// ---------------------------------------------------------------------------------------------------
// row_fn(b, buffers) for each row b, rows in parallel; `buffers` holds 3 scratch arrays per task.
template <typename S, typename RowFn>
void for_each_row(int64_t B, int64_t T, RowFn row_fn) {
  const int64_t grain = std::max<int64_t>(1, kGrainTokens / std::max<int64_t>(T, 1));
  at::parallel_for(0, B, grain, [&](int64_t b_begin, int64_t b_end) {
    Buffers<S> buf(3);
    for (int64_t b = b_begin; b < b_end; ++b) row_fn(b, buf);
  });
}

template <typename S>
at::Tensor gspo_log_ratio_impl(const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& mask) {
  using V = Simd<S>;
  using Vec = typename V::Vec;
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  at::Tensor out = at::empty({B}, logprobs.options().dtype(c10::CppTypeToScalarType<S>::value));
  S* result = out.mutable_data_ptr<S>();
  const Input<S> lp(logprobs, "logprobs"), old(old_logprobs, "old_logprobs"), m_in(mask, "mask");
  for_each_row<S>(B, T, [&](int64_t b, Buffers<S>& buf) {
    S *l = buf[0], *o = buf[1], *m = buf[2];
    Sum<S> raw, weight;
    const Vec zero = {};
    for (int64_t t0 = 0; t0 < T; t0 += kChunk) {
      const int64_t n = std::min(kChunk, T - t0);
      lp.read(b, t0, n, l);
      old.read(b, t0, n, o);
      m_in.read(b, t0, n, m);
      raw.add(n, [&](int64_t i) {
        const Vec w = V::load(m + i);
        return w != zero ? (V::load(l + i) - V::load(o + i)) * w : zero;
      });
      weight.add(n, [&](int64_t i) { return V::load(m + i); });
    }
    const S n_b = static_cast<S>(weight.total());
    result[b] = static_cast<S>(raw.total()) / (n_b < S(1) ? S(1) : n_b);  // max(n_b, 1); NaN stays
  });
  return out;
}

template <typename S>
at::Tensor geo_mean_row_sums_impl(const at::Tensor& advantages, const at::Tensor& mask,
                                  const std::optional<at::Tensor>& is_weights, double log_eps) {
  using V = Simd<S>;
  using Vec = typename V::Vec;
  const int64_t B = advantages.size(0), T = advantages.size(1);
  at::Tensor out = at::zeros({2, B}, advantages.options().dtype(c10::CppTypeToScalarType<S>::value));
  S* result = out.mutable_data_ptr<S>();
  const Input<S> adv(advantages, "advantages"), m_in(mask, "mask");
  const bool weighted = is_weights.has_value();
  const Input<S> w_in(weighted ? *is_weights : advantages, "is_weights");
  const S eps = static_cast<S>(log_eps);
  for_each_row<S>(B, T, [&](int64_t b, Buffers<S>& buf) {
    S *a = buf[0], *w = buf[1], *m = buf[2];
    Sum<S> adv_sum, log_w_sum;
    const Vec zero = {};
    for (int64_t t0 = 0; t0 < T; t0 += kChunk) {
      const int64_t n = std::min(kChunk, T - t0);
      adv.read(b, t0, n, a);
      m_in.read(b, t0, n, m);
      adv_sum.add(n, [&](int64_t i) {
        const Vec v = V::load(m + i);
        return v != zero ? V::load(a + i) * v : zero;
      });
      if (weighted) {
        w_in.read(b, t0, n, w);
        log_weights(w, m, n, eps);  // masked positions: 0
        log_w_sum.add(n, [&](int64_t i) {
          const Vec v = V::load(m + i);
          return v != zero ? V::load(w + i) * v : zero;
        });
      }
    }
    result[b] = static_cast<S>(adv_sum.total());
    result[B + b] = static_cast<S>(log_w_sum.total());
  });
  return out;
}

}  // namespace

at::Tensor clip_cov_selection_cpu(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                                  const at::Tensor& advantages, const at::Tensor& mask, double clip_low,
                                  double clip_high, double ratio, double lower, double upper) {
  check_inputs("clip_cov_selection", logprobs, {&old_logprobs, &advantages, &mask});
  if (compute_type({&logprobs, &old_logprobs, &advantages}) == at::kDouble) {
    return clip_cov_selection_impl<double>(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, ratio,
                                           lower, upper);
  }
  return clip_cov_selection_impl<float>(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, ratio,
                                        lower, upper);
}

at::Tensor kl_cov_selection_cpu(const at::Tensor& logprobs, const at::Tensor& advantages, const at::Tensor& mask,
                                double ratio) {
  check_inputs("kl_cov_selection", logprobs, {&advantages, &mask});
  if (compute_type({&logprobs, &advantages}) == at::kDouble) {
    return kl_cov_selection_impl<double>(logprobs, advantages, mask, ratio);
  }
  return kl_cov_selection_impl<float>(logprobs, advantages, mask, ratio);
}

at::Tensor gspo_log_ratio_cpu(const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& mask) {
  check_inputs("gspo_log_ratio", logprobs, {&old_logprobs, &mask});
  if (compute_type({&logprobs, &old_logprobs}) == at::kDouble) {
    return gspo_log_ratio_impl<double>(logprobs, old_logprobs, mask);
  }
  return gspo_log_ratio_impl<float>(logprobs, old_logprobs, mask);
}

at::Tensor geo_mean_row_sums_cpu(const at::Tensor& advantages, const at::Tensor& mask,
                                 const std::optional<at::Tensor>& is_weights, double log_eps) {
  check_inputs("geo_mean_row_sums", advantages, {&mask});
  if (is_weights.has_value()) check_inputs("geo_mean_row_sums", advantages, {&*is_weights, &mask});
  const at::Tensor& w = is_weights.has_value() ? *is_weights : advantages;
  if (compute_type({&advantages, &w}) == at::kDouble) {
    return geo_mean_row_sums_impl<double>(advantages, mask, is_weights, log_eps);
  }
  return geo_mean_row_sums_impl<float>(advantages, mask, is_weights, log_eps);
}

}  // namespace rlhf_kernels
