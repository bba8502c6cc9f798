// The cache of large CPU kernel outputs (why and what: cpu_output_cache.h).
//
// Blocks are anonymous mappings of a whole number of 2 MiB huge pages, aligned to 2 MiB and
// advised MADV_HUGEPAGE, handed to torch through a c10::Allocator so an output is an ordinary
// resizable CPU tensor. A block is looked up by exact size class (bytes rounded up to 2 MiB), the
// most recently freed first; when the free blocks exceed the limit, the least recently freed are
// unmapped. One mutex guards the lists; a fork holds it (pthread_atfork) so a child never inherits
// it locked mid-update.
#include "cpu_output_cache.h"

#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <list>
#include <mutex>
#include <string>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#define M6_OUTPUT_CACHE 1
#endif

namespace m6::cpu {
namespace {

constexpr int64_t kDefaultLimitBytes = int64_t{1} << 30;

int64_t size_class(int64_t bytes) { return (bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes; }

// The limit from M6_CPU_OUTPUT_CACHE_MB (a whole number of MiB, 0 = off), else the default.
int64_t limit_from_env() {
  const char* text = std::getenv("M6_CPU_OUTPUT_CACHE_MB");
  if (text == nullptr || *text == '\0') return kDefaultLimitBytes;
  char* end = nullptr;
  errno = 0;
  const long long mib = std::strtoll(text, &end, 10);
  TORCH_CHECK(errno == 0 && *end == '\0' && mib >= 0 && mib < (int64_t{1} << 40),
              "M6_CPU_OUTPUT_CACHE_MB must be a whole number of MiB >= 0 (0 turns the cache off), got '",
              text, "'");
  return static_cast<int64_t>(mib) << 20;
}

struct Block {
  void* ptr;
  int64_t bytes;  // a multiple of kHugePageBytes
};

#if defined(M6_OUTPUT_CACHE)

// A fresh 2 MiB-aligned mapping of `bytes`, advised to huge pages; nullptr when the OS refuses.
void* map_block(int64_t bytes) {
  const size_t span = static_cast<size_t>(bytes + kHugePageBytes);
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const auto begin = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (begin + kHugePageBytes - 1) & ~static_cast<uintptr_t>(kHugePageBytes - 1);
  const size_t head = aligned - begin;
  const size_t tail = span - head - static_cast<size_t>(bytes);
  if (head > 0) munmap(raw, head);
  if (tail > 0) munmap(reinterpret_cast<void*>(aligned + bytes), tail);
  madvise(reinterpret_cast<void*>(aligned), static_cast<size_t>(bytes), MADV_HUGEPAGE);  // a hint
  return reinterpret_cast<void*>(aligned);
}

void unmap_block(const Block& block) { munmap(block.ptr, static_cast<size_t>(block.bytes)); }

class OutputCache {
 public:
  OutputCache() : limit_(limit_from_env()) {
    pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                   [] { instance().mutex_.unlock(); });
  }

  // Never destroyed: tensors may free their blocks during interpreter shutdown.
  static OutputCache& instance() {
    static auto* cache = new OutputCache();
    return *cache;
  }

  Block take(int64_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
        if (it->bytes == bytes) {
          const Block block = *it;
          free_.erase(std::next(it).base());
          cached_ -= bytes;
          live_ += bytes;
          ++hits_;
          return block;
        }
      }
      ++misses_;
    }
    void* ptr = map_block(bytes);
    if (ptr == nullptr) {  // the free blocks of other sizes may be what stands in the way
      clear();
      ptr = map_block(bytes);
    }
    TORCH_CHECK(ptr != nullptr, "m6 CPU kernels: out of memory mapping an output of ", bytes, " bytes (",
                std::strerror(errno), ")");
    std::lock_guard<std::mutex> lock(mutex_);
    live_ += bytes;
    return {ptr, bytes};
  }

  void give_back(const Block& block) {
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_ -= block.bytes;
      free_.push_back(block);
      cached_ += block.bytes;
      evict_locked(limit_, evicted);
    }
    for (const Block& b : evicted) unmap_block(b);
  }

  // Frees every cached block (the limit stays).
  void clear() { update(false, 0); }

  // Sets the limit and evicts down to it; returns the old limit.
  int64_t set_limit(int64_t limit) { return update(true, limit); }

  OutputCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {limit_, cached_, static_cast<int64_t>(free_.size()), live_, hits_, misses_};
  }

 private:
  // Under one lock: set the limit to `bytes` (when `set`) and evict down to `bytes`; the blocks
  // are unmapped after the lock is released. Returns the limit before.
  int64_t update(bool set, int64_t bytes) {
    std::vector<Block> evicted;
    int64_t old;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      old = limit_;
      if (set) limit_ = bytes;
      evict_locked(bytes, evicted);
    }
    for (const Block& b : evicted) unmap_block(b);
    return old;
  }

  void evict_locked(int64_t keep_bytes, std::vector<Block>& evicted) {
    while (cached_ > keep_bytes && !free_.empty()) {
      evicted.push_back(free_.front());
      cached_ -= free_.front().bytes;
      free_.pop_front();
    }
  }

  std::mutex mutex_;
  std::list<Block> free_;  // least recently freed first
  int64_t limit_;
  int64_t cached_ = 0, live_ = 0, hits_ = 0, misses_ = 0;
};

// Outputs of kMinCachedBytes or more come from the cache; smaller ones (a later resize_ of a
// small output, say) from torch's CPU allocator.
class CachedOutputAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (static_cast<int64_t>(n) < kMinCachedBytes) return c10::GetDefaultCPUAllocator()->allocate(n);
    auto* block = new Block(OutputCache::instance().take(size_class(static_cast<int64_t>(n))));
    return {block->ptr, block, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  static void release(void* context) {
    auto* block = static_cast<Block*>(context);
    OutputCache::instance().give_back(*block);
    delete block;
  }
};

#endif  // M6_OUTPUT_CACHE

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(M6_OUTPUT_CACHE)
  static CachedOutputAllocator allocator;
  at::Tensor out(at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                           c10::typeMetaToScalarType(options.dtype()), std::nullopt));
  // As at::empty does: under torch.use_deterministic_algorithms(True) with
  // torch.utils.deterministic.fill_uninitialized_memory, fresh memory reads as NaN (the tests'
  // proof that a kernel writes every element).
  const auto& context = at::globalContext();
  if (context.deterministicAlgorithms() && context.deterministicFillUninitializedMemory()) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return out;
#else
  return at::empty(sizes, options);
#endif
}

#if defined(M6_OUTPUT_CACHE)
OutputCacheStats output_cache_stats() { return OutputCache::instance().stats(); }
void empty_output_cache() { OutputCache::instance().clear(); }
int64_t set_output_cache_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "the CPU output cache limit must be >= 0 bytes, got ", bytes);
  return OutputCache::instance().set_limit(bytes);
}
#else
OutputCacheStats output_cache_stats() { return {0, 0, 0, 0, 0, 0}; }
void empty_output_cache() {}
int64_t set_output_cache_limit(int64_t bytes) { return 0; }
#endif

}  // namespace m6::cpu
