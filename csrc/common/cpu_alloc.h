// Allocation of the CPU kernels' outputs.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace m6::cpu {

constexpr uintptr_t kHugePageBytes = uintptr_t{2} << 20;

// at::empty(sizes, options), with the interior 2 MiB-aligned range of a large buffer advised to
// transparent huge pages (Linux). Why: a fresh output of tens of MiB is mapped by the allocator
// on every call, and its 4 KiB page faults cost more than the kernel writing it (a 143 MB
// softmax output: ~65 ms of faults vs ~40 ms to write on the 2-core dev machine); huge pages
// fault 512x less often. Only a hint on our own buffer: it does nothing where THP is disabled or
// the memory is already mapped, and a failure is harmless.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t first = (begin + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
  const uintptr_t last = (begin + out.nbytes()) & ~(kHugePageBytes - 1);
  if (last >= first + 2 * kHugePageBytes) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

}  // namespace m6::cpu
