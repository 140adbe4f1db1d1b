// Shared by the C++ CPU kernels (csrc/*.cpp other than the CUDA binding; one extension module whose
// Python functions csrc/cpu_bindings.cpp binds from each family's header).
//
// empty_output(): outputs of [B, T] size allocated with transparent huge pages advised.  A fresh
// 32 MiB tensor otherwise costs ~8,000 page faults when first written (16-20 ms on one core, more than
// the kernels' own work); with MADV_HUGEPAGE it costs ~16 (about 3 ms, the kernel zeroing the pages).
// The advice covers only the 2 MiB-aligned interior of the tensor's own memory and only changes how its
// pages are backed; where THP are off or unsupported it does nothing.

#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace rlhf_kernels {

constexpr int64_t kHugePageBytes = int64_t{1} << 21;

inline void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes < 2 * kHugePageBytes) return;
  const auto begin = reinterpret_cast<uintptr_t>(data);
  const auto mask = static_cast<uintptr_t>(kHugePageBytes - 1);
  const uintptr_t first = (begin + mask) & ~mask;
  const uintptr_t last = (begin + static_cast<uintptr_t>(bytes)) & ~mask;
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice only
#else
  (void)data;
  (void)bytes;
#endif
}

// at::empty with huge pages advised before anything touches the memory (see above).
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  advise_huge_pages(out.data_ptr(), static_cast<int64_t>(out.nbytes()));
  return out;
}

}  // namespace rlhf_kernels
