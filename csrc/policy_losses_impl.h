// The token-level policy-loss core's loops and per-token math (csrc/policy_losses.cpp includes this file
// once per instruction set: RLHF_PL_NS names the namespace, RLHF_PL_BYTES the vector width in bytes: 16 for
// baseline SSE2 / NEON, 32 under `#pragma GCC target("avx2")`).  No include guard on purpose.
// clang-format off

namespace rlhf_kernels {
namespace RLHF_PL_NS {


constexpr int64_t kChunk = 512;  // positions per chunk: 6 inputs x 512 x 4 bytes = 12 KiB of buffers
constexpr int kStats = 6;        // P_MASK, P_CLIP, P_CLIP_LOWER, P_NEG_LOG_RATIO, P_RATIO, P_RATIO_MAX

template <typename S>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float V __attribute__((vector_size(RLHF_PL_BYTES)));
  typedef int32_t M __attribute__((vector_size(RLHF_PL_BYTES)));
};
template <>
struct Lanes<double> {
  typedef double V __attribute__((vector_size(RLHF_PL_BYTES)));
  typedef int64_t M __attribute__((vector_size(RLHF_PL_BYTES)));
};
template <typename S>
using Vec = typename Lanes<S>::V;
template <typename S>
using Flags = typename Lanes<S>::M;  // comparison results: all ones (true) or 0 per lane
template <typename S>
constexpr int64_t kWidth = static_cast<int64_t>(RLHF_PL_BYTES / sizeof(S));

template <typename S>
RLHF_PL_INLINE Vec<S> splat(S s) {
  return Vec<S>{} + s;
}
template <typename S>
RLHF_PL_INLINE Vec<S> load(const S* p) {
  Vec<S> x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
template <typename S>
RLHF_PL_INLINE void store(S* p, Vec<S> x) {
  std::memcpy(p, &x, sizeof(x));
}
template <typename S>
RLHF_PL_INLINE S lane_sum(Vec<S> x) {
  S total = 0;
  for (int64_t i = 0; i < kWidth<S>; ++i) total += x[i];
  return total;
}

// ---- elementwise helpers: the exact forms of ops/cpu/ppo_losses.py's (NaN passes as in torch) ----------
template <typename S>
RLHF_PL_INLINE Vec<S> clamp(Vec<S> x, S low, S high) {  // torch.clamp: NaN stays NaN
  return x < splat(low) ? splat(low) : (x > splat(high) ? splat(high) : x);
}
template <typename S>
RLHF_PL_INLINE Vec<S> clamp_max(Vec<S> x, S high) {
  return x > splat(high) ? splat(high) : x;
}
template <typename S>
RLHF_PL_INLINE Vec<S> maximum(Vec<S> a, Vec<S> b) {  // torch.maximum: NaN if either is NaN
  return ((a > b) | (a != a)) ? a : b;
}
template <typename S>
RLHF_PL_INLINE Vec<S> minimum(Vec<S> a, Vec<S> b) {  // torch.minimum
  return ((a < b) | (a != a)) ? a : b;
}
template <typename S>
RLHF_PL_INLINE Vec<S> unless(Vec<S> x, Flags<S> flags) {  // x·(not flags): 0 where flagged, NaN·0 stays NaN
  return x * (flags ? splat<S>(0) : splat<S>(1));
}
template <typename S>
RLHF_PL_INLINE Vec<S> nan_like(Vec<S> x, Vec<S> value) {  // value, NaN where x is NaN
  return x != x ? x : value;
}
template <typename S>
RLHF_PL_INLINE Vec<S> as_value(Flags<S> flags) {  // a flag as 1.0 / 0.0
  return flags ? splat<S>(1) : splat<S>(0);
}
template <typename S>
RLHF_PL_INLINE Vec<S> abs_of(Vec<S> x) {
  return x < splat<S>(0) ? -x : x;
}
template <typename S>
RLHF_PL_INLINE Vec<S> sign_of(Vec<S> x) {  // torch.sign: NaN stays NaN, ±0 gives 0
  return x > splat<S>(0) ? splat<S>(1) : (x < splat<S>(0) ? splat<S>(-1) : x * splat<S>(0));
}

// ---- exp / log ------------------------------------------------------------------------------------------
RLHF_PL_INLINE Vec<float> pow2_lanes(Flags<float> k) {  // 2^k for k in [-126, 127]
  Vec<float> out;
  const Flags<float> bits = (k + 127) << 23;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// Cephes expf: e^x = 2^n·e^r, n = round(x·log2 e), |r| ≤ ln2/2, a degree-7 polynomial for e^r.  kSmall: for
// |x| ≤ 64 (and NaN) only, e.g. a clamped log-ratio: no clamp, 2^n in one factor.
template <bool kSmall>
RLHF_PL_INLINE Vec<float> cephes_exp(Vec<float> x) {
  const Vec<float> xc = kSmall ? x : clamp<float>(x, -104.0f, 89.0f);  // beyond: 0 (< the least denormal) / inf
  const Flags<float> nan = xc != xc;
  const Vec<float> shifter = splat(cephes::kRoundShifter);
  Vec<float> n = (xc * cephes::kLog2e + shifter) - shifter;
  n = nan ? splat(0.0f) : n;
  Vec<float> r = xc - n * cephes::kLn2Hi;
  r = r - n * cephes::kLn2Lo;
  const Vec<float> y = cephes::exp_reduced(r);
  const Flags<float> k = __builtin_convertvector(n, Flags<float>);  // in [-150, 129]
  if constexpr (kSmall) return y * pow2_lanes(k);  // NaN: y is NaN
  const Flags<float> k1 = k >> 1;  // 2^k as two factors: denormal results and 2^128 (inf) come out right
  const Vec<float> out = y * pow2_lanes(k1) * pow2_lanes(k - k1);
  return nan ? xc : out;
}

RLHF_PL_INLINE Vec<float> exp_lanes(Vec<float> x) { return cephes_exp<false>(x); }
RLHF_PL_INLINE Vec<float> exp_small_lanes(Vec<float> x) { return cephes_exp<true>(x); }

RLHF_PL_INLINE Vec<float> log_lanes(Vec<float> x) {
  // Cephes logf: x = f·2^e with f in [√½, √2), log x = log f + e·ln2, a degree-9 polynomial for log f.
  const Flags<float> tiny = x < splat(std::numeric_limits<float>::min());
  const Vec<float> xs = tiny ? x * 8388608.0f : x;  // denormals: scaled by 2^23 first
  Flags<float> bits;
  std::memcpy(&bits, &xs, sizeof(bits));
  Flags<float> e = ((bits >> 23) & 0xff) - 126 + (tiny & -23);
  Vec<float> f;
  const Flags<float> mantissa = (bits & 0x007fffff) | 0x3f000000;  // in [0.5, 1)
  std::memcpy(&f, &mantissa, sizeof(f));
  const Flags<float> small = f < splat(cephes::kSqrtHalf);
  e = e + small;  // small is -1 where true
  f = small ? f + f - 1.0f : f - 1.0f;
  Vec<float> out = cephes::log_reduced(f, __builtin_convertvector(e, Vec<float>));
  const float inf = std::numeric_limits<float>::infinity();
  out = x == splat(inf) ? splat(inf) : out;
  out = x == splat(0.0f) ? splat(-inf) : out;
  return ((x < splat(0.0f)) | (x != x)) ? splat(std::numeric_limits<float>::quiet_NaN()) : out;
}

RLHF_PL_INLINE Vec<double> exp_lanes(Vec<double> x) {
  for (int64_t i = 0; i < kWidth<double>; ++i) x[i] = std::exp(x[i]);
  return x;
}

RLHF_PL_INLINE Vec<double> exp_small_lanes(Vec<double> x) { return exp_lanes(x); }

RLHF_PL_INLINE Vec<double> log_lanes(Vec<double> x) {
  for (int64_t i = 0; i < kWidth<double>; ++i) x[i] = std::log(x[i]);
  return x;
}

// (σ(z), σ(−z)) from one exponential: σ(−z) = e^{−z}·σ(z), 1 where e^{−z} overflows.
template <typename S>
RLHF_PL_INLINE void sigmoid_pair(Vec<S> z, Vec<S>& gate, Vec<S>& gate_neg) {
  const Vec<S> e = exp_lanes(-z);
  gate = splat<S>(1) / (splat<S>(1) + e);
  gate_neg = e == splat(std::numeric_limits<S>::infinity()) ? splat<S>(1) : e * gate;
}

// ---- the variants ---------------------------------------------------------------------------------------
constexpr double kLogRatioClamp = 20.0;  // LOG_RATIO_CLAMP
constexpr double kGspoLogRatioMax = 10.0;
constexpr double kBinaryKlEps = 1e-8;
constexpr double kSapoGateScale = 4.0;

// The scalars of a call, in the compute type, with the combinations the PyTorch path forms in Python.
template <typename S>
struct Params {
  S p0, p1, p2;
  S low, high;  // 1 − p0, 1 + p1 (clip bounds of the ratio)
  S scale_pos, scale_neg;  // SAPO's 4/τ for τ = p0, p1
  bool has_dual;
  explicit Params(const std::vector<double>& v) {
    const double a = v.size() > 0 ? v[0] : 0.0, b = v.size() > 1 ? v[1] : 0.0, c = v.size() > 2 ? v[2] : 0.0;
    p0 = static_cast<S>(a), p1 = static_cast<S>(b), p2 = static_cast<S>(c);
    low = static_cast<S>(1.0 - a), high = static_cast<S>(1.0 + b);
    has_dual = !std::isinf(c);
    scale_pos = static_cast<S>(kSapoGateScale) / p0, scale_neg = static_cast<S>(kSapoGateScale) / p1;
  }
};

// Per-token terms: the loss L, ∂L/∂lp, and the statistics' values (the forward uses what the variant's
// flags declare, the backward only d; the compiler drops what a loop does not use).
template <typename S>
struct Terms {
  Vec<S> loss, d, kl, clip, lower, ratio;
};

template <typename S>
RLHF_PL_INLINE void clamped_ratio(Vec<S> raw, Vec<S>& log_ratio, Vec<S>& ratio) {
  log_ratio = clamp<S>(raw, static_cast<S>(-kLogRatioClamp), static_cast<S>(kLogRatioClamp));
  ratio = exp_small_lanes(log_ratio);
}

template <typename S>
RLHF_PL_INLINE Flags<S> outside_clamp(Vec<S> raw) {
  return abs_of<S>(raw) > splat(static_cast<S>(kLogRatioClamp));
}

// (max(−A·r, −A·clamp(r, low, high)), clipped)
template <typename S>
RLHF_PL_INLINE Vec<S> surrogate(Vec<S> adv, Vec<S> ratio, const Params<S>& p, Flags<S>& clipped, Vec<S>& loss1) {
  loss1 = -adv * ratio;
  const Vec<S> loss2 = -adv * clamp<S>(ratio, p.low, p.high);
  clipped = loss2 > loss1;
  return maximum<S>(loss1, loss2);
}

struct Vanilla {  // policy_terms / policy_derivative, with the dual clip when p2 is finite
  static constexpr int kCode = 0;
  static constexpr bool kClip = true, kLower = true, kRatio = true;
  template <typename S>
  RLHF_PL_INLINE static void terms(Vec<S> lp, Vec<S> old, Vec<S> adv, Vec<S>, const Params<S>& p, Terms<S>& t) {
    const Vec<S> raw = lp - old;
    Vec<S> log_ratio, ratio, loss1;
    clamped_ratio<S>(raw, log_ratio, ratio);
    Flags<S> clipped, flat;
    const Vec<S> loss = surrogate(adv, ratio, p, clipped, loss1);
    flat = clipped;
    t.loss = loss;
    t.lower = splat<S>(0);
    if (p.has_dual) {
      const Vec<S> bound = -adv * p.p2;
      const Flags<S> lower = (adv < splat<S>(0)) & (loss > bound);
      t.loss = lower ? bound : loss;
      t.lower = as_value<S>(lower);
      flat = flat | lower;
    }
    t.d = unless<S>(loss1, flat | outside_clamp<S>(raw));
    t.kl = -log_ratio;
    t.clip = as_value<S>(clipped);
    t.ratio = ratio;
  }
};

struct Gpg {
  static constexpr int kCode = 1;
  static constexpr bool kClip = false, kLower = false, kRatio = false;
  template <typename S>
  RLHF_PL_INLINE static void terms(Vec<S> lp, Vec<S>, Vec<S> adv, Vec<S>, const Params<S>&, Terms<S>& t) {
    t.loss = -(lp * adv);
    t.d = nan_like<S>(lp, -adv);
    t.kl = splat<S>(0);  // GPG has no metrics (verl returns none): the old log-probs are never read
  }
};

// Whether a variant's terms read the old log-probs (GPG's do not: its loops skip that input).
template <typename Variant>
constexpr bool kReadsOld = !std::is_same_v<Variant, Gpg>;

struct Dro {
  static constexpr int kCode = 2;
  static constexpr bool kClip = false, kLower = false, kRatio = false;
  template <typename S>
  RLHF_PL_INLINE static void terms(Vec<S> lp, Vec<S> old, Vec<S> adv, Vec<S>, const Params<S>& p, Terms<S>& t) {
    const Vec<S> raw = lp - old;
    const S half_beta = static_cast<S>(0.5 * static_cast<double>(p.p0));
    t.loss = -(lp * adv - half_beta * raw * raw);
    t.d = -adv + p.p0 * raw;
    t.kl = -raw;
  }
};

struct Cispo {
  static constexpr int kCode = 3;
  static constexpr bool kClip = true, kLower = false, kRatio = false;
  template <typename S>
  RLHF_PL_INLINE static void terms(Vec<S> lp, Vec<S> old, Vec<S> adv, Vec<S>, const Params<S>& p, Terms<S>& t) {
    Vec<S> log_ratio, ratio;
    clamped_ratio<S>(lp - old, log_ratio, ratio);
    const Vec<S> clipped_ratio = clamp<S>(ratio, p.low, p.high);
    t.loss = -clipped_ratio * adv * lp;
    t.d = nan_like<S>(lp, -clipped_ratio * adv);
    t.kl = -log_ratio;
    t.clip = as_value<S>(~(ratio == clipped_ratio));  // NaN ≠ NaN: counted, as torch's !=
  }
};

struct Sapo {
  static constexpr int kCode = 4;
  static constexpr bool kClip = false, kLower = false, kRatio = false;
  template <typename S>
  RLHF_PL_INLINE static void terms(Vec<S> lp, Vec<S> old, Vec<S> adv, Vec<S>, const Params<S>& p, Terms<S>& t) {
    const Vec<S> raw = lp - old;
    Vec<S> log_ratio, ratio, gate, gate_neg;
    clamped_ratio<S>(raw, log_ratio, ratio);
    const Flags<S> positive = adv > splat<S>(0);
    const Vec<S> tau = positive ? splat(p.p0) : splat(p.p1);
    const Vec<S> z = tau * (ratio - static_cast<S>(1));
    sigmoid_pair<S>(z, gate, gate_neg);
    // 4/τ: the quotient torch forms per token, formed once per τ in the same precision
    t.loss = -gate * (positive ? splat(p.scale_pos) : splat(p.scale_neg)) * adv;
    t.d = unless<S>(-adv * static_cast<S>(kSapoGateScale) * gate * gate_neg * ratio, outside_clamp<S>(raw));
    t.kl = -log_ratio;
  }
};

template <bool kBinaryKl>
struct Dppo {
  static constexpr int kCode = kBinaryKl ? 6 : 5;
  static constexpr bool kClip = true, kLower = true, kRatio = false;
  template <typename S>
  RLHF_PL_INLINE static void terms(Vec<S> lp, Vec<S> old, Vec<S> adv, Vec<S>, const Params<S>& p, Terms<S>& t) {
    Vec<S> log_ratio, ratio;
    clamped_ratio<S>(lp - old, log_ratio, ratio);
    const Vec<S> truncated = clamp_max<S>(ratio, p.p2);
    const Vec<S> prob = exp_lanes(lp), old_prob = exp_lanes(old);
    Flags<S> positive, negative;
    if constexpr (kBinaryKl) {
      const S eps = static_cast<S>(kBinaryKlEps);
      const Vec<S> one = splat<S>(1);
      const Vec<S> kl = old_prob * (old - lp) + (one - old_prob) * log_lanes(((one - old_prob) + eps) / ((one - prob) + eps));
      positive = (kl <= splat(p.p1)) | (prob <= old_prob);
      negative = (kl <= splat(p.p0)) | (prob >= old_prob);
    } else {
      positive = (prob - old_prob) <= splat(p.p1);
      negative = (prob - old_prob) >= splat(static_cast<S>(-static_cast<double>(p.p0)));
    }
    const Flags<S> above = adv > splat<S>(0);
    const Flags<S> valid = (above & positive) | (~above & negative);
    const Vec<S> coef = -adv * truncated * as_value<S>(valid);
    t.loss = coef * lp;
    t.d = nan_like<S>(lp, coef);
    t.kl = -log_ratio;
    t.clip = as_value<S>(~valid);
    t.lower = as_value<S>((ratio > splat(p.p2)) & valid);
  }
};

struct ClipCov {  // aux: 1.0 at the selected (detached) tokens
  static constexpr int kCode = 7;
  static constexpr bool kClip = true, kLower = false, kRatio = false;
  template <typename S>
  RLHF_PL_INLINE static void terms(Vec<S> lp, Vec<S> old, Vec<S> adv, Vec<S> selected, const Params<S>& p, Terms<S>& t) {
    const Vec<S> raw = lp - old;
    const Vec<S> ratio = exp_lanes(raw);  // no clamp of the log-ratio here (verl's clip_cov)
    Vec<S> loss1;
    Flags<S> clipped;
    const Vec<S> keep = static_cast<S>(1) - selected;
    t.loss = surrogate(adv, ratio, p, clipped, loss1) * keep;
    t.d = unless<S>(loss1, clipped) * keep;
    t.kl = -raw;
    t.clip = selected;
  }
};

struct KlCov {  // aux: 1.0 at the selected tokens
  static constexpr int kCode = 8;
  static constexpr bool kClip = false, kLower = false, kRatio = false;
  template <typename S>
  RLHF_PL_INLINE static void terms(Vec<S> lp, Vec<S> old, Vec<S> adv, Vec<S> selected, const Params<S>& p, Terms<S>& t) {
    const Vec<S> raw = lp - old;
    const Vec<S> surrogate_term = -adv * exp_lanes(raw);
    const Vec<S> coef = selected * p.p0;
    t.loss = surrogate_term + coef * abs_of<S>(raw);
    t.d = surrogate_term + coef * nan_like<S>(raw, sign_of<S>(raw));
    t.kl = abs_of<S>(raw);
  }
};

struct Gspo {  // aux: the row's log-ratio ℓ̄_b at every position
  static constexpr int kCode = 9;
  static constexpr bool kClip = true, kLower = false, kRatio = false;
  template <typename S>
  RLHF_PL_INLINE static void terms(Vec<S> lp, Vec<S> old, Vec<S> adv, Vec<S> seq_log_ratio, const Params<S>& p, Terms<S>& t) {
    const S cap = static_cast<S>(kGspoLogRatioMax);
    const Vec<S> ratio = exp_lanes(clamp_max<S>(seq_log_ratio, cap));
    Vec<S> loss1;
    Flags<S> clipped;
    t.loss = surrogate(adv, ratio, p, clipped, loss1);
    t.d = unless<S>(nan_like<S>(lp, -adv * ratio), clipped | (seq_log_ratio > splat(cap)));
    t.kl = old - lp;
    t.clip = as_value<S>(clipped);
  }
};

struct GeoMean {
  static constexpr int kCode = 10;
  static constexpr bool kClip = true, kLower = true, kRatio = false;
  template <typename S>
  RLHF_PL_INLINE static void terms(Vec<S> lp, Vec<S> old, Vec<S> adv, Vec<S>, const Params<S>& p, Terms<S>& t) {
    const Vec<S> raw = lp - old;
    const Vec<S> sign = sign_of<S>(adv);
    const Vec<S> bounded = clamp<S>(raw, static_cast<S>(-static_cast<double>(p.p0)), p.p1);
    t.loss = sign * minimum<S>(sign * raw, sign * bounded);
    t.d = nan_like<S>(raw, unless<S>(sign * sign, ~(sign * raw <= sign * bounded)));
    const Flags<S> clipped = ~(raw == bounded);  // NaN: counted, as torch's !=
    t.kl = -raw;
    t.clip = as_value<S>(clipped & (adv > splat<S>(0)));
    t.lower = as_value<S>(clipped & (adv < splat<S>(0)));
  }
};

// The PPO value loss on the same loops (ppo_losses' value_terms): lp, old, adv carry v, v_old and the
// returns; statistics Σm and Σ clipped·m in rows 0 and 1; p0 = clip (∞: unclipped).
struct Value {
  static constexpr int kCode = 11;
  static constexpr bool kClip = true, kLower = false, kRatio = false;
  template <typename S>
  RLHF_PL_INLINE static void terms(Vec<S> v, Vec<S> v_old, Vec<S> ret, Vec<S>, const Params<S>& p, Terms<S>& t) {
    const Vec<S> err = v - ret;
    t.loss = static_cast<S>(0.5) * err * err;
    t.d = err;
    t.kl = splat<S>(0);
    t.clip = splat<S>(0);
    if (std::isinf(p.p0)) return;
    const Vec<S> below = v_old - p.p0, above = v_old + p.p0;
    const Vec<S> err_clipped = (v < below ? below : (v > above ? above : v)) - ret;
    const Vec<S> loss_clipped = static_cast<S>(0.5) * err_clipped * err_clipped;
    const Flags<S> clipped = loss_clipped > t.loss;
    const Vec<S> flag = as_value<S>(clipped);
    t.loss = loss_clipped * flag + unless<S>(t.loss, clipped);  // ops/cpu/ppo_losses.py's choose()
    t.d = unless<S>(err, clipped);
    t.clip = flag;
  }
};

// ---- reading rows ---------------------------------------------------------------------------------------
template <typename T, typename S>
void convert_row(const void* src, int64_t stride, int64_t n, S* dst) {
  const T* p = static_cast<const T*>(src);
  if (stride == 1) {  // the common case, a loop the compiler vectorises (e.g. a bool mask: 16 bytes at a time)
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(static_cast<float>(p[i]));
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(static_cast<float>(p[i * stride]));
}
template <typename S>
void convert_row_double(const void* src, int64_t stride, int64_t n, S* dst) {
  const double* p = static_cast<const double*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(p[i * stride]);
}

// One [B, T] input: where a chunk of row b starts, and how to get it as S values.
template <typename S>
struct Input {
  const char* base = nullptr;
  int64_t s0 = 0, s1 = 0, item = 0;
  bool direct = false;  // the compute dtype with unit column stride: read in place
  void (*convert)(const void*, int64_t, int64_t, S*) = nullptr;

  Input() = default;
  Input(const at::Tensor& t, const char* name) {
    base = static_cast<const char*>(t.const_data_ptr());
    s0 = t.stride(0), s1 = t.stride(1), item = static_cast<int64_t>(t.element_size());
    direct = t.scalar_type() == c10::CppTypeToScalarType<S>::value && s1 == 1;
    switch (t.scalar_type()) {
      case at::kFloat: convert = &convert_row<float, S>; break;
      case at::kDouble: convert = &convert_row_double<S>; break;
      case at::kBFloat16: convert = &convert_row<at::BFloat16, S>; break;
      case at::kHalf: convert = &convert_row<at::Half, S>; break;
      case at::kBool: convert = &convert_row<uint8_t, S>; break;  // one byte, 0 or 1
      case at::kByte: convert = &convert_row<uint8_t, S>; break;
      case at::kChar: convert = &convert_row<int8_t, S>; break;
      case at::kShort: convert = &convert_row<int16_t, S>; break;
      case at::kInt: convert = &convert_row<int32_t, S>; break;
      case at::kLong: convert = &convert_row<int64_t, S>; break;
      default: TORCH_CHECK(false, "policy_loss_token: unsupported dtype for ", name, ": ", t.scalar_type());
    }
  }
  // Positions [lo, lo + n) of row b; `padded` positions (a multiple of the vector width) are readable.
  const S* chunk(int64_t b, int64_t lo, int64_t n, int64_t padded, S* buffer, S pad) const {
    const char* at = base + (b * s0 + lo * s1) * item;
    if (direct && n == padded) return reinterpret_cast<const S*>(at);
    convert(at, s1, n, buffer);
    for (int64_t i = n; i < padded; ++i) buffer[i] = pad;
    return buffer;
  }
};

template <typename S>
struct Inputs {
  Input<S> lp, old, adv, aux, w, m;
  bool has_aux = false, has_w = false;
};

template <typename S>
Inputs<S> inputs_of(const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
                    const at::Tensor& mask, const std::optional<at::Tensor>& aux,
                    const std::optional<at::Tensor>& is_weights) {
  Inputs<S> in;
  in.lp = Input<S>(logprobs, "logprobs");
  in.old = Input<S>(old_logprobs, "old_logprobs");
  in.adv = Input<S>(advantages, "advantages");
  in.m = Input<S>(mask, "mask");
  in.has_aux = aux.has_value();
  in.has_w = is_weights.has_value();
  if (in.has_aux) in.aux = Input<S>(*aux, "aux");
  if (in.has_w) in.w = Input<S>(*is_weights, "is_weights");
  return in;
}

// The vectors of one chunk: positions [lo, lo + n) of row b, padded to a whole number of vectors with
// masked positions (m = 0).
template <typename S>
struct Chunk {
  alignas(32) S buffers[6][kChunk];
  const S *lp, *old, *adv, *aux, *w, *m;
  int64_t padded;

  void read(const Inputs<S>& in, int64_t b, int64_t lo, int64_t n, bool read_old) {
    padded = (n + kWidth<S> - 1) / kWidth<S> * kWidth<S>;
    lp = in.lp.chunk(b, lo, n, padded, buffers[0], 0);
    old = read_old ? in.old.chunk(b, lo, n, padded, buffers[1], 0) : lp;
    adv = in.adv.chunk(b, lo, n, padded, buffers[2], 0);
    m = in.m.chunk(b, lo, n, padded, buffers[3], 0);
    aux = in.has_aux ? in.aux.chunk(b, lo, n, padded, buffers[4], 0) : nullptr;
    w = in.has_w ? in.w.chunk(b, lo, n, padded, buffers[5], 1) : nullptr;
  }
  void terms_at(int64_t i, Vec<S>& lp_v, Vec<S>& old_v, Vec<S>& adv_v, Vec<S>& aux_v, Vec<S>& w_v,
                Vec<S>& m_v) const {
    lp_v = load(lp + i), old_v = load(old + i), adv_v = load(adv + i), m_v = load(m + i);
    aux_v = aux ? load(aux + i) : splat<S>(0);
    w_v = w ? load(w + i) : splat<S>(1);
  }
};

// Grain: rows per task so that a task has >= 2^16 positions (smaller inputs stay on the calling thread:
// waking OpenMP threads costs more than such a pass, see csrc/gae.cpp).
int64_t row_grain(int64_t T) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(T, 1)); }

// kSave: also writes D = w·∂L/∂lp at the valid positions (0 at masked ones) into `derivative` [B, T], for a
// backward that then reads D and the mask instead of recomputing the variant's math.
template <typename Variant, bool kSave, typename S>
void forward_rows(const Inputs<S>& in, const Params<S>& p, int64_t B, int64_t T, S* partials, S* stats,
                  S* derivative) {
  at::parallel_for(0, B, row_grain(T), [&](int64_t b_begin, int64_t b_end) {
    Chunk<S> c;
    alignas(32) S values[kChunk];
    for (int64_t b = b_begin; b < b_end; ++b) {
      double total[kStats + 1] = {};  // loss, Σm, Σclip, Σlower, Σkl, Σr
      S ratio_max = 0;                // ratios are > 0: 0 is "no valid token"
      for (int64_t lo = 0; lo < T; lo += kChunk) {
        const int64_t n = std::min(kChunk, T - lo);
        c.read(in, b, lo, n, kReadsOld<Variant>);
        Vec<S> loss{}, mass{}, clip{}, lower{}, kl{}, ratio{}, peak{};
        const Vec<S> zero{};
        S* saved = nullptr;
        if constexpr (kSave) saved = n == c.padded ? derivative + b * T + lo : values;
        for (int64_t i = 0; i < c.padded; i += kWidth<S>) {
          Vec<S> lp, old, adv, aux, w, m;
          c.terms_at(i, lp, old, adv, aux, w, m);
          Terms<S> t;
          Variant::terms(lp, old, adv, aux, p, t);
          const Flags<S> valid = m != zero;  // masked positions: exactly 0 whatever they hold
          if constexpr (kSave) store(saved + i, valid ? t.d * w : zero);
          loss += valid ? t.loss * w * m : zero;
          mass += m;
          kl += valid ? t.kl * m : zero;
          if constexpr (Variant::kClip) clip += valid ? t.clip * m : zero;
          if constexpr (Variant::kLower) lower += valid ? t.lower * m : zero;
          if constexpr (Variant::kRatio) {
            ratio += valid ? t.ratio * m : zero;
            peak = (valid & (t.ratio > peak)) ? t.ratio : peak;  // NaN never wins (torch: nan_to_num(0))
          }
        }
        if (kSave && saved == values) std::memcpy(derivative + b * T + lo, values, static_cast<size_t>(n) * sizeof(S));
        total[0] += lane_sum<S>(loss), total[1] += lane_sum<S>(mass), total[2] += lane_sum<S>(clip);
        total[3] += lane_sum<S>(lower), total[4] += lane_sum<S>(kl), total[5] += lane_sum<S>(ratio);
        for (int64_t i = 0; i < kWidth<S>; ++i) ratio_max = std::max(ratio_max, peak[i]);
      }
      partials[b] = static_cast<S>(total[0]);
      for (int s = 0; s < 5; ++s) stats[s * B + b] = static_cast<S>(total[s + 1]);
      stats[5 * B + b] = ratio_max;
    }
  });
}

template <typename Out, typename S>
void write_row(Out* out, const S* values, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<Out>(values[i]);
}

// values[0, n) into `out`, a gradient row of dtype `out_type`.
template <typename S>
void store_row(at::ScalarType out_type, char* out, const S* values, int64_t n) {
  switch (out_type) {
    case at::kFloat: write_row(reinterpret_cast<float*>(out), values, n); break;
    case at::kDouble: write_row(reinterpret_cast<double*>(out), values, n); break;
    case at::kBFloat16: write_row(reinterpret_cast<at::BFloat16*>(out), values, n); break;
    case at::kHalf: write_row(reinterpret_cast<at::Half*>(out), values, n); break;
    default: TORCH_CHECK(false, "policy_loss_token_bwd: unsupported gradient dtype ", out_type);
  }
}

template <typename Variant, typename S>
void backward_rows(const Inputs<S>& in, const Params<S>& p, int64_t B, int64_t T, const S* g, at::Tensor& grad) {
  const at::ScalarType out_type = grad.scalar_type();
  char* out_base = static_cast<char*>(grad.data_ptr());
  const int64_t item = static_cast<int64_t>(grad.element_size());
  at::parallel_for(0, B, row_grain(T), [&](int64_t b_begin, int64_t b_end) {
    Chunk<S> c;
    alignas(32) S values[kChunk];
    for (int64_t b = b_begin; b < b_end; ++b) {
      const Vec<S> g_b = splat(g[b]);
      for (int64_t lo = 0; lo < T; lo += kChunk) {
        const int64_t n = std::min(kChunk, T - lo);
        c.read(in, b, lo, n, kReadsOld<Variant>);
        char* out = out_base + (b * T + lo) * item;
        const bool in_place = out_type == c10::CppTypeToScalarType<S>::value && n == c.padded;
        S* dst = in_place ? reinterpret_cast<S*>(out) : values;
        const Vec<S> zero{};
        for (int64_t i = 0; i < c.padded; i += kWidth<S>) {
          Vec<S> lp, old, adv, aux, w, m;
          c.terms_at(i, lp, old, adv, aux, w, m);
          Terms<S> t;
          Variant::terms(lp, old, adv, aux, p, t);
          // exactly 0 at masked positions, also where g_b is not finite
          store(dst + i, (m != zero) ? (t.d * w) * (m * g_b) : zero);
        }
        if (!in_place) store_row(out_type, out, values, n);
      }
    }
  });
}

// The backward from the forward's saved D: g_b·m·D at valid positions (the rounding of the recomputing
// backward: (d·w)·(m·g_b)), exactly 0 at masked ones.
template <typename S>
void saved_rows(const S* derivative, const Input<S>& mask, int64_t B, int64_t T, const S* g, at::Tensor& grad) {
  const at::ScalarType out_type = grad.scalar_type();
  char* out_base = static_cast<char*>(grad.data_ptr());
  const int64_t item = static_cast<int64_t>(grad.element_size());
  at::parallel_for(0, B, row_grain(T), [&](int64_t b_begin, int64_t b_end) {
    alignas(32) S m_buffer[kChunk], d_buffer[kChunk], values[kChunk];
    for (int64_t b = b_begin; b < b_end; ++b) {
      const Vec<S> g_b = splat(g[b]);
      for (int64_t lo = 0; lo < T; lo += kChunk) {
        const int64_t n = std::min(kChunk, T - lo);
        const int64_t padded = (n + kWidth<S> - 1) / kWidth<S> * kWidth<S>;
        const S* m_row = mask.chunk(b, lo, n, padded, m_buffer, 0);
        const S* d_row = derivative + b * T + lo;
        if (n != padded) {
          std::memcpy(d_buffer, d_row, static_cast<size_t>(n) * sizeof(S));
          for (int64_t i = n; i < padded; ++i) d_buffer[i] = 0;
          d_row = d_buffer;
        }
        char* out = out_base + (b * T + lo) * item;
        const bool in_place = out_type == c10::CppTypeToScalarType<S>::value && n == padded;
        S* dst = in_place ? reinterpret_cast<S*>(out) : values;
        const Vec<S> zero{};
        for (int64_t i = 0; i < padded; i += kWidth<S>) {
          const Vec<S> m = load(m_row + i);
          store(dst + i, (m != zero) ? load(d_row + i) * (m * g_b) : zero);
        }
        if (!in_place) store_row(out_type, out, values, n);
      }
    }
  });
}

// Calls fn(Variant{}) for the variant with code `variant`.
template <typename Fn>
void with_variant(int64_t variant, Fn&& fn) {
  switch (variant) {
    case Vanilla::kCode: return fn(Vanilla{});
    case Gpg::kCode: return fn(Gpg{});
    case Dro::kCode: return fn(Dro{});
    case Cispo::kCode: return fn(Cispo{});
    case Sapo::kCode: return fn(Sapo{});
    case Dppo<false>::kCode: return fn(Dppo<false>{});
    case Dppo<true>::kCode: return fn(Dppo<true>{});
    case ClipCov::kCode: return fn(ClipCov{});
    case KlCov::kCode: return fn(KlCov{});
    case Gspo::kCode: return fn(Gspo{});
    case GeoMean::kCode: return fn(GeoMean{});
    case Value::kCode: return fn(Value{});
    default: TORCH_CHECK(false, "policy_loss_token: unknown variant code ", variant);
  }
}

void check_inputs(const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
                  const at::Tensor& mask, const std::optional<at::Tensor>& aux,
                  const std::optional<at::Tensor>& is_weights) {
  TORCH_CHECK(logprobs.dim() == 2, "policy_loss_token: logprobs must be [B, T]");
  for (const at::Tensor* t : {&old_logprobs, &advantages, &mask}) {
    TORCH_CHECK(t->sizes() == logprobs.sizes(), "policy_loss_token: inputs must share logprobs' shape");
    TORCH_CHECK(t->device().is_cpu(), "policy_loss_token: CPU tensors expected");
  }
  for (const auto* t : {&aux, &is_weights}) {
    if (t->has_value()) {
      TORCH_CHECK((*t)->sizes() == logprobs.sizes(), "policy_loss_token: inputs must share logprobs' shape");
      TORCH_CHECK((*t)->device().is_cpu(), "policy_loss_token: CPU tensors expected");
    }
  }
  TORCH_CHECK(logprobs.device().is_cpu(), "policy_loss_token: CPU tensors expected");
}

bool computes_in_double(const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages) {
  return logprobs.scalar_type() == at::kDouble || old_logprobs.scalar_type() == at::kDouble ||
         advantages.scalar_type() == at::kDouble;
}

// (partials, statistics, D): D is [B, T] in the compute dtype when `save` (see forward_rows), else empty.
template <typename S>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_as(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages, const at::Tensor& mask,
    const std::optional<at::Tensor>& aux, const std::optional<at::Tensor>& is_weights, int64_t variant,
    const std::vector<double>& params, bool save) {
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  const auto options = logprobs.options().dtype(c10::CppTypeToScalarType<S>::value);
  at::Tensor partials = at::empty({B, 1}, options);
  at::Tensor stats = at::zeros({kStats, B, 1}, options);
  at::Tensor derivative = save ? empty_output({B, T}, options) : at::empty({0}, options);
  if (B == 0) return {partials, stats, derivative};
  const Inputs<S> in = inputs_of<S>(logprobs, old_logprobs, advantages, mask, aux, is_weights);
  const Params<S> p(params);
  S* partials_ptr = partials.data_ptr<S>();
  S* stats_ptr = stats.data_ptr<S>();
  S* d_ptr = save ? derivative.data_ptr<S>() : nullptr;
  with_variant(variant, [&](auto v) {
    if (save) {
      forward_rows<decltype(v), true, S>(in, p, B, T, partials_ptr, stats_ptr, d_ptr);
    } else {
      forward_rows<decltype(v), false, S>(in, p, B, T, partials_ptr, stats_ptr, nullptr);
    }
  });
  return {partials, stats, derivative};
}

template <typename S>
at::Tensor saved_backward_as(const at::Tensor& grad_partials, const at::Tensor& derivative, const at::Tensor& mask,
                             at::ScalarType out_type) {
  const int64_t B = derivative.size(0), T = derivative.size(1);
  at::Tensor grad = empty_output({B, T}, derivative.options().dtype(out_type));
  if (B == 0 || T == 0) return grad;
  const at::Tensor g = grad_partials.sum(-1).to(c10::CppTypeToScalarType<S>::value).contiguous();
  const Input<S> m(mask, "mask");
  saved_rows<S>(derivative.const_data_ptr<S>(), m, B, T, g.const_data_ptr<S>(), grad);
  return grad;
}

template <typename S>
at::Tensor backward_as(const at::Tensor& grad_partials, const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                       const at::Tensor& advantages, const at::Tensor& mask, const std::optional<at::Tensor>& aux,
                       const std::optional<at::Tensor>& is_weights, int64_t variant,
                       const std::vector<double>& params) {
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  at::Tensor grad = empty_output({B, T}, logprobs.options());
  if (B == 0 || T == 0) return grad;
  // One partial per row on this path (a forward and its backward always share a backend).
  const at::Tensor g = grad_partials.sum(-1).to(c10::CppTypeToScalarType<S>::value).contiguous();
  const Inputs<S> in = inputs_of<S>(logprobs, old_logprobs, advantages, mask, aux, is_weights);
  const Params<S> p(params);
  const S* g_ptr = g.const_data_ptr<S>();
  with_variant(variant, [&](auto v) { backward_rows<decltype(v), S>(in, p, B, T, g_ptr, grad); });
  return grad;
}

// The vector exp (fn 0), exp for |x| ≤ 64 (fn 1) and log (fn 2) of the fp32 path applied to a contiguous
// fp32 tensor (tests check them against float64 over their whole range).
inline at::Tensor vector_math(const at::Tensor& x, int64_t fn) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "vector_math: a contiguous fp32 CPU tensor expected");
  at::Tensor out = at::empty_like(x);
  const float* src = x.const_data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t n = x.numel();
  alignas(32) float buffer[kWidth<float>];
  for (int64_t i = 0; i < n; i += kWidth<float>) {
    const int64_t count = std::min<int64_t>(kWidth<float>, n - i);
    for (int64_t j = 0; j < kWidth<float>; ++j) buffer[j] = j < count ? src[i + j] : 1.0f;
    Vec<float> v = load(buffer);
    v = fn == 0 ? exp_lanes(v) : (fn == 1 ? exp_small_lanes(v) : log_lanes(v));
    store(buffer, v);
    std::memcpy(dst + i, buffer, static_cast<size_t>(count) * sizeof(float));
  }
  return out;
}

}  // namespace RLHF_PL_NS
}  // namespace rlhf_kernels
