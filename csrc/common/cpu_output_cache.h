// Allocation of the CPU kernels' large outputs from a bounded cache of reused blocks.
//
// Why: torch's CPU allocator gives every output of tens of MiB a fresh mapping, and the kernel
// then pays a page fault and a zero-fill for each page before its first write. On the 2-core dev
// machine a fresh 143 MB masked-softmax output costs ~39 ms of faults against ~10 ms to write it
// into memory already mapped. The cache keeps freed blocks (advised to transparent huge pages)
// and hands them out again to outputs of the same size class, as CUDA's caching allocator does:
// a block returns to the cache only when torch frees the last tensor using it, so no live tensor
// ever shares memory with another.
//
// It holds at most `limit` bytes of *free* blocks (default 1 GiB; M6_CPU_OUTPUT_CACHE_MB, or
// set_output_cache_limit; 0 turns caching off); the least recently freed go first. Outputs under
// kMinCachedBytes come from at::empty as before.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace m6::cpu {

constexpr int64_t kHugePageBytes = int64_t{2} << 20;
constexpr int64_t kMinCachedBytes = 2 * kHugePageBytes;

// An uninitialised contiguous CPU tensor of `sizes` and `options`; large ones from the cache.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

struct OutputCacheStats {
  int64_t limit_bytes;    // most free bytes kept
  int64_t cached_bytes;   // free bytes held now
  int64_t cached_blocks;  // free blocks held now
  int64_t live_bytes;     // bytes of cache blocks held by live tensors
  int64_t hits;           // outputs served from a cached block
  int64_t misses;         // large outputs that needed a new block
};

OutputCacheStats output_cache_stats();
// Frees every cached (free) block; live blocks return to the cache when their tensors die.
void empty_output_cache();
// Sets the limit on free cached bytes (evicting down to it); 0 disables caching. Returns the old one.
int64_t set_output_cache_limit(int64_t bytes);

}  // namespace m6::cpu
