// Shared by the C++ CPU kernels (csrc/*.cpp other than the CUDA binding; one extension module whose
// Python functions csrc/cpu_bindings.cpp binds from each family's header).
//
// empty_output(): large outputs backed by transparent huge pages, recycled.  A fresh [B, T] output is
// written once by a kernel whose own work is one pass: the page faults of its first touch cost as much as
// the pass (a fresh 32 MiB tensor: ~8,000 faults, 16-20 ms on one core; 4 MiB: ~1,000, ~1.2 ms), and a
// huge page still costs its zeroing (~0.1 ms per 2 MiB).  So outputs of at least 4 MiB come from
// HugePageAllocator: 2 MiB-aligned blocks advised MADV_HUGEPAGE, and a freed block is kept (up to
// $RLHF_KERNELS_CPU_CACHE_MB in all, default 256; 0 turns the cache off) for the next output of the same
// rounded size: a training step's outputs have the same shapes every step, so from the second step on
// they cost no fault at all.  (Off Linux: the same blocks and cache, without the advice.)  release_cached_outputs() (Python: rlhf_kernels.release_cpu_cache()) frees
// the kept blocks.  Used where rounding up to whole huge pages wastes at most 1/8 of the size (else plain
// at::empty); tensors from it are ordinary resizable CPU tensors.

#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <iterator>
#include <mutex>
#include <unordered_map>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace rlhf_kernels {

constexpr size_t kHugePageBytes = size_t{1} << 21;

inline size_t huge_page_rounded(size_t bytes) { return (bytes + kHugePageBytes - 1) & ~(kHugePageBytes - 1); }

inline bool wants_huge_pages(size_t bytes) {
  return bytes >= 2 * kHugePageBytes && huge_page_rounded(bytes) - bytes <= bytes / 8;
}

inline void* aligned_block(size_t bytes) {
#if defined(_WIN32)
  return _aligned_malloc(bytes, kHugePageBytes);
#else
  return std::aligned_alloc(kHugePageBytes, bytes);
#endif
}

inline void free_block(void* data) {
#if defined(_WIN32)
  _aligned_free(data);
#else
  std::free(data);
#endif
}

// The blocks of empty_output(): allocation sizes of live blocks (to recycle them when freed) and the
// freed blocks kept for reuse, oldest first.  One instance per process, never destroyed (tensors may be
// freed during interpreter shutdown).
class HugePageAllocator final : public c10::Allocator {
 public:
  static HugePageAllocator& get() {
    static auto* instance = new HugePageAllocator();
    return *instance;
  }

  c10::DataPtr allocate(size_t bytes) override {
    if (bytes == 0) return {nullptr, nullptr, &release, c10::Device(c10::DeviceType::CPU)};
    const size_t rounded = huge_page_rounded(bytes);
    void* data = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = kept_.rbegin(); it != kept_.rend(); ++it) {  // most recently freed first: warm
        if (it->second == rounded) {
          data = it->first;
          kept_bytes_ -= rounded;
          kept_.erase(std::next(it).base());
          break;
        }
      }
    }
    if (data == nullptr) {
      data = aligned_block(rounded);
      TORCH_CHECK(data != nullptr, "rlhf_kernels: out of memory allocating ", bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      madvise(data, rounded, MADV_HUGEPAGE);  // advice only: a failure changes nothing
#endif
    }
    std::lock_guard<std::mutex> lock(mutex_);
    live_[data] = rounded;
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  // Frees every kept block; returns how many bytes were kept.
  size_t release_kept() {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t bytes = kept_bytes_;
    for (const auto& block : kept_) free_block(block.first);
    kept_.clear();
    kept_bytes_ = 0;
    return bytes;
  }

  size_t kept_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return kept_bytes_;
  }

 private:
  HugePageAllocator() {
    const char* env = std::getenv("RLHF_KERNELS_CPU_CACHE_MB");
    const long long mib = env != nullptr ? std::atoll(env) : 256;
    limit_ = mib > 0 ? static_cast<size_t>(mib) << 20 : 0;
  }

  static void release(void* data) {
    if (data == nullptr) return;
    HugePageAllocator& self = get();
    std::lock_guard<std::mutex> lock(self.mutex_);
    const auto live = self.live_.find(data);
    const size_t rounded = live->second;
    self.live_.erase(live);
    self.kept_.emplace_back(data, rounded);
    self.kept_bytes_ += rounded;
    while (self.kept_bytes_ > self.limit_) {  // oldest first
      free_block(self.kept_.front().first);
      self.kept_bytes_ -= self.kept_.front().second;
      self.kept_.pop_front();
    }
  }

  std::mutex mutex_;
  std::unordered_map<void*, size_t> live_;
  std::deque<std::pair<void*, size_t>> kept_;
  size_t kept_bytes_ = 0, limit_ = 0;
};

inline size_t release_cached_outputs() { return HugePageAllocator::get().release_kept(); }
inline size_t cached_output_bytes() { return HugePageAllocator::get().kept_bytes(); }

// An uninitialised contiguous CPU tensor for a kernel's output (see above); other devices: at::empty.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const auto dtype = c10::typeMetaToScalarType(options.dtype());
  int64_t numel = 1;
  for (const int64_t size : sizes) numel *= size;
  const auto bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  if (!options.device().is_cpu() || !wants_huge_pages(bytes) || options.requires_grad()) {
    return at::empty(sizes, options);
  }
  return at::detail::empty_generic(sizes, &HugePageAllocator::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, std::nullopt);
}

}  // namespace rlhf_kernels
