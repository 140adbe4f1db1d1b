// GAE on CUDA: advantages and returns of [B, T] in one launch, one warp per row, parallel over T.
//
// Torch-independent (compiles with plain `nvcc -c`); the torch binding is gae_cuda_binding.cpp.
//
// A warp walks its row from the end in chunks of 32*kPerLane positions.  Lane l owns the kPerLane
// consecutive positions j = l*kPerLane + k of the chunk in reversed-time order (t = T-1-j):
//   1. it composes their affine maps into one (gae_common.h),
//   2. the warp scans those 32 maps with shuffles (inclusive, then shifted to exclusive),
//   3. the exclusive prefix applied to the carried state gives the lane's starting state, from which
//      the lane replays its positions with the exact sequential step, writing A_t and returns,
//   4. lane 31's final state is the carry into the next chunk.
// The scan only reorders the composition of the same maps, so it equals the sequential loop up to
// fp32 rounding.  All loads go through 64-bit offsets; positions past the row's start are identity.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "gae_common.h"

namespace rlhf_kernels {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kPerLane = 8;
constexpr int kChunk = 32 * kPerLane;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// The mask dtype is uniform over the launch, so this switch never diverges.
__device__ __forceinline__ float load_mask(const void* mask, int code, int64_t offset) {
  switch (code) {
    case kBool:
    case kUInt8: return static_cast<float>(static_cast<const uint8_t*>(mask)[offset]);
    case kInt8: return static_cast<float>(static_cast<const int8_t*>(mask)[offset]);
    case kInt16: return static_cast<float>(static_cast<const int16_t*>(mask)[offset]);
    case kInt32: return static_cast<float>(static_cast<const int32_t*>(mask)[offset]);
    case kInt64: return static_cast<float>(static_cast<const int64_t*>(mask)[offset]);
    case kFloat16: return __half2float(static_cast<const __half*>(mask)[offset]);
    case kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(mask)[offset]);
    case kFloat32: return static_cast<const float*>(mask)[offset];
    default: return static_cast<float>(static_cast<const double*>(mask)[offset]);
  }
}

__device__ __forceinline__ AffineMap shfl_up(const AffineMap& x, int delta) {
  return AffineMap{__shfl_up_sync(kFullMask, x.p, delta), __shfl_up_sync(kFullMask, x.q, delta),
                   __shfl_up_sync(kFullMask, x.r, delta), __shfl_up_sync(kFullMask, x.b1, delta),
                   __shfl_up_sync(kFullMask, x.b2, delta)};
}

template <typename RewardT, typename ValueT>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    gae_fwd_kernel(const RewardT* __restrict__ rewards, const ValueT* __restrict__ values,
                   const void* __restrict__ mask, int mask_code, float* __restrict__ advantages,
                   float* __restrict__ returns, int64_t B, int64_t T, int64_t stride_rb, int64_t stride_rt,
                   int64_t stride_vb, int64_t stride_vt, int64_t stride_mb, int64_t stride_mt, float gamma,
                   float gamma_lam, bool carry) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= B) return;  // the whole warp leaves together
  const RewardT* r_row = rewards + row * stride_rb;
  const ValueT* v_row = values + row * stride_vb;
  const int64_t m_row = row * stride_mb;
  float* a_row = advantages + row * T;
  float* ret_row = returns + row * T;

  float nv = 0.f, lg = 0.f;  // carried state, identical in every lane
  for (int64_t j0 = 0; j0 < T; j0 += kChunk) {
    float r[kPerLane], v[kPerLane], m[kPerLane];
    AffineMap lane_map = identity_map();
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int64_t t = T - 1 - (j0 + lane * kPerLane + k);
      const bool inside = t >= 0;
      r[k] = inside ? to_float(r_row[t * stride_rt]) : 0.f;
      v[k] = inside ? to_float(v_row[t * stride_vt]) : 0.f;
      m[k] = inside ? load_mask(mask, mask_code, m_row + t * stride_mt) : 0.f;
      const AffineMap step = inside ? gae_map(r[k], v[k], m[k], gamma, gamma_lam, carry) : identity_map();
      lane_map = compose(lane_map, step);
    }
    // Inclusive scan over lanes: lane l ends with map_l o ... o map_0.
#pragma unroll
    for (int delta = 1; delta < 32; delta <<= 1) {
      const AffineMap earlier = shfl_up(lane_map, delta);
      if (lane >= delta) lane_map = compose(earlier, lane_map);
    }
    AffineMap before = shfl_up(lane_map, 1);
    if (lane == 0) before = identity_map();
    float s_nv = before.p * nv + before.b1;
    float s_lg = before.q * nv + before.r * lg + before.b2;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int64_t t = T - 1 - (j0 + lane * kPerLane + k);
      if (t >= 0) {
        const float v_ret = gae_step(r[k], v[k], m[k], gamma, gamma_lam, carry, s_nv, s_lg);
        a_row[t] = s_lg;
        ret_row[t] = s_lg + v_ret;
      }
    }
    nv = __shfl_sync(kFullMask, s_nv, 31);
    lg = __shfl_sync(kFullMask, s_lg, 31);
  }
}

template <typename RewardT, typename ValueT>
cudaError_t launch_typed(const void* rewards, const void* values, const void* mask, int mask_code,
                         float* advantages, float* returns, int64_t B, int64_t T, const int64_t* strides,
                         float gamma, float gamma_lam, bool carry, cudaStream_t stream) {
  const int64_t blocks = (B + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  gae_fwd_kernel<RewardT, ValueT><<<static_cast<unsigned>(blocks), 32 * kWarpsPerBlock, 0, stream>>>(
      static_cast<const RewardT*>(rewards), static_cast<const ValueT*>(values), mask, mask_code, advantages,
      returns, B, T, strides[0], strides[1], strides[2], strides[3], strides[4], strides[5], gamma, gamma_lam,
      carry);
  return cudaGetLastError();
}

template <typename RewardT>
cudaError_t launch_values(int values_code, const void* rewards, const void* values, const void* mask,
                          int mask_code, float* advantages, float* returns, int64_t B, int64_t T,
                          const int64_t* strides, float gamma, float gamma_lam, bool carry, cudaStream_t stream) {
  switch (values_code) {
    case kFloat32:
      return launch_typed<RewardT, float>(rewards, values, mask, mask_code, advantages, returns, B, T, strides,
                                          gamma, gamma_lam, carry, stream);
    case kFloat16:
      return launch_typed<RewardT, __half>(rewards, values, mask, mask_code, advantages, returns, B, T, strides,
                                           gamma, gamma_lam, carry, stream);
    case kBFloat16:
      return launch_typed<RewardT, __nv_bfloat16>(rewards, values, mask, mask_code, advantages, returns, B, T,
                                                  strides, gamma, gamma_lam, carry, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace rlhf_kernels

// strides (in elements): {rewards b, rewards t, values b, values t, mask b, mask t}.  advantages and
// returns are contiguous fp32 [B, T].  Dtype codes: rlhf_kernels::DtypeCode.  Returns a cudaError_t.
extern "C" int rlhf_kernels_gae_cuda_launch(const void* rewards, int rewards_code, const void* values,
                                            int values_code, const void* mask, int mask_code, float* advantages,
                                            float* returns, int64_t B, int64_t T, const int64_t* strides,
                                            float gamma, float lam, int carry, void* stream) {
  using namespace rlhf_kernels;
  if (B <= 0 || T <= 0) return static_cast<int>(cudaSuccess);
  if (mask_code < kBool || mask_code > kFloat64) return static_cast<int>(cudaErrorInvalidValue);
  const float gamma_lam = gamma * lam;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  switch (rewards_code) {
    case kFloat32:
      err = launch_values<float>(values_code, rewards, values, mask, mask_code, advantages, returns, B, T, strides,
                                 gamma, gamma_lam, carry != 0, s);
      break;
    case kFloat16:
      err = launch_values<__half>(values_code, rewards, values, mask, mask_code, advantages, returns, B, T, strides,
                                  gamma, gamma_lam, carry != 0, s);
      break;
    case kBFloat16:
      err = launch_values<__nv_bfloat16>(values_code, rewards, values, mask, mask_code, advantages, returns, B, T,
                                         strides, gamma, gamma_lam, carry != 0, s);
      break;
    default: err = cudaErrorInvalidValue;
  }
  return static_cast<int>(err);
}
