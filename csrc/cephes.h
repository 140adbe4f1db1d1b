// Cephes' single-precision polynomials for exp and log (S. L. Moshier's expf / logf), shared by the CPU
// kernels.  T is float or a GCC vector of floats (scalar constants broadcast over the lanes); the range
// reduction and the special values (NaN, ±inf, overflow, denormals, x ≤ 0) are the callers'.
#pragma once

// Inlined into the callers, also into their AVX2 builds (csrc/policy_losses.cpp): never a call with
// vector arguments.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace rlhf_kernels {
namespace cephes {

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;        // ln 2 = kLn2Hi + kLn2Lo, kLn2Hi exact in few bits
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kRoundShifter = 12582912.0f;  // 1.5·2^23: (x + it) − it rounds x to an integer
constexpr float kSqrtHalf = 0.707106781186547524f;

template <typename T>
__attribute__((always_inline)) inline T broadcast(float c) {
  return T{} + c;
}

// e^r for |r| ≤ ln2/2, the reduced argument r = x − n·ln 2 (within 2 ulp once scaled by 2^n).
template <typename T>
__attribute__((always_inline)) inline T exp_reduced(T r) {
  T p = broadcast<T>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * (r * r) + r + 1.0f;
}

// log(x) for x = 2^e·(1 + f), f in [√½ − 1, √2 − 1) (`e` as a float): within 1 ulp.
template <typename T>
__attribute__((always_inline)) inline T log_reduced(T f, T e) {
  const T z = f * f;
  T y = broadcast<T>(7.0376836292e-2f);
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y = y + e * kLn2Lo;
  y = y - 0.5f * z;
  return (f + y) + e * kLn2Hi;
}

}  // namespace cephes
}  // namespace rlhf_kernels
