// GAE on CPU tensors: advantages and returns in one pass over [B, T], rows in parallel.
//
// The recurrence runs backwards in T, so within a row it is a dependency chain (a multiply-add and a
// select per step).  Eight rows run interleaved as two 4-lane vectors: the lanes share instructions
// and the two vectors' chains overlap their latencies.  Each group of rows walks T in chunks
// of kChunk positions from the end: the chunk's rewards, values and mask are first converted to fp32
// into interleaved buffers (any input dtype, any strides), the steps run on the buffers eight rows per
// vector, and the results are copied out row by row.
// Semantics: csrc/gae_common.h (shared with the CUDA kernel).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "cpu_common.h"
#include "cpu_lanes.h"
#include "gae.h"
#include "gae_common.h"

namespace rlhf_kernels {
namespace {

constexpr int64_t kRows = 8;  // rows interleaved per group
// Positions converted per buffer fill: whole rows up to 8192 (5 buffers of 8 rows: 1.25 MiB at most).
// Each fill reads the group's rows one after another, long runs of lines that the hardware prefetcher
// follows; fills of 256 positions (1 KiB per row, in descending address order) made the kernel 1.7x
// slower at [4096, 2048] fp32 on one thread (54.0 ms against 31.0 ms, best of 20 calls).
constexpr int64_t kChunk = 8192;

// Converts n elements (element stride `stride`) starting at `src` into dst[i * kRows].
using RowLoader = void (*)(const void* src, int64_t stride, int64_t n, float* dst);

template <typename T>
void load_row(const void* src, int64_t stride, int64_t n, float* dst) {
  const T* p = static_cast<const T*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i * kRows] = static_cast<float>(p[i * stride]);
}

RowLoader loader_for(at::ScalarType dtype, const char* name) {
  switch (dtype) {
    case at::kFloat: return &load_row<float>;
    case at::kHalf: return &load_row<at::Half>;
    case at::kBFloat16: return &load_row<at::BFloat16>;
    case at::kDouble: return &load_row<double>;
    case at::kBool: return &load_row<uint8_t>;  // one byte, 0 or 1
    case at::kByte: return &load_row<uint8_t>;
    case at::kChar: return &load_row<int8_t>;
    case at::kShort: return &load_row<int16_t>;
    case at::kInt: return &load_row<int32_t>;
    case at::kLong: return &load_row<int64_t>;
    default: TORCH_CHECK(false, "gae_forward: unsupported dtype for ", name, ": ", dtype);
  }
  return nullptr;
}

static_assert(kRows % kLanes == 0, "rows are processed a vector at a time (csrc/cpu_lanes.h)");

// One [B, T] input of gae_rows: its data, strides (elements), element size, and the loader of its dtype;
// `direct`: fp32 with unit stride, read by rows_to_interleaved (4 x 4 blocks transposed in registers).
struct GaeInput {
  const char* data;
  int64_t row_stride, stride, item;
  RowLoader load;
  bool direct;

  GaeInput(const at::Tensor& t, const char* name)
      : data(static_cast<const char*>(t.const_data_ptr())),
        row_stride(t.stride(0)),
        stride(t.stride(1)),
        item(static_cast<int64_t>(t.element_size())),
        load(loader_for(t.scalar_type(), name)),
        direct(t.scalar_type() == at::kFloat && t.stride(1) == 1) {}

  // Positions [lo, lo + n) of rows [b, b + count) into buf[i·kRows + (row − b)].
  void fill(int64_t b, int64_t count, int64_t lo, int64_t n, float* buf) const {
    const char* at = data + (b * row_stride + lo * stride) * item;
    if (direct) {
      rows_to_interleaved(reinterpret_cast<const float*>(at), row_stride, count, n, buf, kRows);
    } else {
      for (int64_t r = 0; r < count; ++r) load(at + r * row_stride * item, stride, n, buf + r);
    }
  }
};

template <bool kCarry>
void gae_rows(const GaeInput& rewards, const GaeInput& values, const GaeInput& mask, float* advantages,
              float* returns, int64_t b_begin, int64_t b_end, int64_t T, float gamma, float gamma_lam) {
  // Buffers are interleaved [position][row]: one position of four of the eight rows is one Lanes vector.
  const int64_t chunk = std::min(T, kChunk);
  std::vector<float> r_buf(kRows * chunk), v_buf(kRows * chunk), m_buf(kRows * chunk);
  std::vector<float> a_buf(kRows * chunk), ret_buf(kRows * chunk);
  for (int64_t b0 = b_begin; b0 < b_end; b0 += kRows) {
    const int64_t rows = std::min(kRows, b_end - b0);
    Lanes nv[kRows / kLanes] = {}, lg[kRows / kLanes] = {};
    for (int64_t hi = T; hi > 0; hi -= kChunk) {
      const int64_t lo = std::max<int64_t>(0, hi - kChunk);
      const int64_t n = hi - lo;
      rewards.fill(b0, rows, lo, n, r_buf.data());
      values.fill(b0, rows, lo, n, v_buf.data());
      mask.fill(b0, rows, lo, n, m_buf.data());
      for (int64_t g = rows; g < kRows; ++g) {  // padding rows of the last group: masked out, never stored
        for (int64_t i = 0; i < n; ++i) r_buf[i * kRows + g] = v_buf[i * kRows + g] = m_buf[i * kRows + g] = 0.f;
      }
      for (int64_t i = n - 1; i >= 0; --i) {
#pragma GCC unroll 2
        for (int64_t h = 0; h < kRows / kLanes; ++h) {  // independent chains: their latencies overlap
          const int64_t at = i * kRows + h * kLanes;
          const Lanes v_ret = gae_step(load_lanes(&r_buf[at]), load_lanes(&v_buf[at]), load_lanes(&m_buf[at]),
                                       gamma, gamma_lam, kCarry, nv[h], lg[h]);
          store_lanes(&a_buf[at], lg[h]);
          store_lanes(&ret_buf[at], lg[h] + v_ret);
        }
      }
      interleaved_to_rows(a_buf.data(), kRows, rows, n, advantages + b0 * T + lo, T);
      interleaved_to_rows(ret_buf.data(), kRows, rows, n, returns + b0 * T + lo, T);
    }
  }
}

}  // namespace

// advantages, returns: fp32 [B, T] contiguous.  mask_mode carry (carry=true) or zero.
std::tuple<at::Tensor, at::Tensor> gae_forward_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                                   const at::Tensor& mask, double gamma, double lam, bool carry) {
  TORCH_CHECK(rewards.dim() == 2, "gae_forward: rewards must be 2-D [B, T]");
  TORCH_CHECK(values.sizes() == rewards.sizes() && mask.sizes() == rewards.sizes(),
              "gae_forward: rewards, values and mask must have one shape");
  TORCH_CHECK(rewards.device().is_cpu() && values.device().is_cpu() && mask.device().is_cpu(),
              "gae_forward: CPU tensors expected");
  const int64_t B = rewards.size(0), T = rewards.size(1);
  auto opts = rewards.options().dtype(at::kFloat);
  at::Tensor advantages = empty_output({B, T}, opts);
  at::Tensor returns = empty_output({B, T}, opts);
  if (B == 0 || T == 0) return {advantages, returns};

  const GaeInput r_in(rewards, "rewards"), v_in(values, "values"), m_in(mask, "mask");
  float* a_ptr = advantages.mutable_data_ptr<float>();
  float* ret_ptr = returns.mutable_data_ptr<float>();
  const float gamma_f = static_cast<float>(gamma);
  const float gamma_lam = gamma_f * static_cast<float>(lam);

  // Work items are groups of kRows rows.  A grain of 2^17 positions (~0.3 ms of work on one core) keeps
  // smaller batches on the calling thread: on a busy machine (an RL trainer's CPU is shared with data
  // loaders and workers) waking OpenMP threads cost 2-8 ms per call at 64 x 1024, 30x the work itself.
  const int64_t groups = (B + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / (kRows * T));
  at::parallel_for(0, groups, grain, [&](int64_t g_begin, int64_t g_end) {
    const int64_t b_begin = g_begin * kRows, b_end = std::min(B, g_end * kRows);
    if (carry) {
      gae_rows<true>(r_in, v_in, m_in, a_ptr, ret_ptr, b_begin, b_end, T, gamma_f, gamma_lam);
    } else {
      gae_rows<false>(r_in, v_in, m_in, a_ptr, ret_ptr, b_begin, b_end, T, gamma_f, gamma_lam);
    }
  });
  return {advantages, returns};
}

}  // namespace rlhf_kernels
