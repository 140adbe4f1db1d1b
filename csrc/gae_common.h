// GAE as a composition of affine maps, shared by the C++ CPU kernel (gae.cpp) and the CUDA kernel
// (gae_cuda.cu).  Torch-independent: gae_cuda.cu must compile with plain nvcc.
//
// Walking t from T-1 down to 0, the state is s = (nv, lg): the next value and the last advantage.
// One step of mask_mode "carry" with mask value m (verl):
//
//     a   = r_t + gamma*nv - V_t + gamma*lam*lg
//     nv <- m*V_t + (1-m)*nv,   lg <- m*a + (1-m)*lg,   A_t = lg
//
// and of mask_mode "zero" (OpenRLHF): r_t <- m*r_t, V_t <- m*V_t, then the same step with m = 1.
// Either step is an affine map of s with a lower-triangular matrix,
//
//     (nv, lg) -> (p*nv + b1,  q*nv + r*lg + b2)
//     carry, m != 0:  p = 1-m, q = m*gamma, r = m*gamma*lam + 1-m, b1 = m*V_t, b2 = m*(r_t - V_t)
//     carry, m == 0:  the identity (p = r = 1, q = b1 = b2 = 0)
//     zero:           p = 0,   q = gamma,   r = gamma*lam,         b1 = V'_t, b2 = r'_t - V'_t
//
// Composition of such maps is associative and closed (the product of lower-triangular matrices is
// lower-triangular), so the prefix compositions F_j o ... o F_0 can be computed by any parallel scan
// and A_t = second component of that prefix applied to the initial state (0, 0).
//
// A position whose mask is 0 never reads r_t or V_t (values there may be garbage, even NaN): the map
// is the identity in carry mode and r' = V' = 0 in zero mode.  m == 1 takes the exact branch
// (nv = V_t, lg = a), so 0/1 masks never multiply the carried state by 0 in the sequential step.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define RK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RK_HOST_DEVICE inline
#endif

namespace rlhf_kernels {

// dtype codes shared by the Python side (rlhf_kernels/_ext.py) and the CUDA launcher.
enum DtypeCode : int {
  kBool = 0,  // stored as one byte, read as uint8
  kUInt8 = 1,
  kInt8 = 2,
  kInt16 = 3,
  kInt32 = 4,
  kInt64 = 5,
  kFloat16 = 6,
  kBFloat16 = 7,
  kFloat32 = 8,
  kFloat64 = 9,
};

struct AffineMap {
  float p, q, r, b1, b2;
};

RK_HOST_DEVICE AffineMap identity_map() { return AffineMap{1.f, 0.f, 1.f, 0.f, 0.f}; }

// The map of one position; `carry` selects the mask mode.
RK_HOST_DEVICE AffineMap gae_map(float reward, float value, float m, float gamma, float gamma_lam, bool carry) {
  if (carry) {
    if (m == 0.f) return identity_map();
    return AffineMap{1.f - m, m * gamma, m * gamma_lam + (1.f - m), m * value, m * (reward - value)};
  }
  const float r = m != 0.f ? m * reward : 0.f;
  const float v = m != 0.f ? m * value : 0.f;
  return AffineMap{0.f, gamma, gamma_lam, v, r - v};
}

// `then` o `first`: apply `first`, then `then`.
RK_HOST_DEVICE AffineMap compose(const AffineMap& first, const AffineMap& then) {
  return AffineMap{
      then.p * first.p,
      then.q * first.p + then.r * first.q,
      then.r * first.r,
      then.p * first.b1 + then.b1,
      then.q * first.b1 + then.r * first.b2 + then.b2,
  };
}

// One sequential step (the semantics); updates (nv, lg) and returns the value V used by the returns
// (V_t in carry mode, m*V_t or 0 in zero mode).  F is float, or on the CPU a GCC vector of floats
// (several independent rows at once): written with selects only, so that it compiles branch-free.
template <typename F>
RK_HOST_DEVICE F gae_step(F reward, F value, F m, float gamma, float gamma_lam, bool carry, F& nv, F& lg) {
  const auto valid = m != 0.f;
  if (carry) {
    const F a = reward + gamma * nv - value + gamma_lam * lg;
    const F nv_blend = m * value + (1.f - m) * nv;
    const F lg_blend = m * a + (1.f - m) * lg;
    const auto one = m == 1.f;
    nv = valid ? (one ? value : nv_blend) : nv;
    lg = valid ? (one ? a : lg_blend) : lg;
    return value;
  }
  const F zero{};
  const F r = valid ? m * reward : zero;
  const F v = valid ? m * value : zero;
  lg = r + gamma * nv - v + gamma_lam * lg;
  nv = v;
  return v;
}

}  // namespace rlhf_kernels
