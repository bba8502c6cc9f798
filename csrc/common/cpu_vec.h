// SIMD helpers shared by the CPU kernels (csrc/*/*_cpu.cpp): the fp32 vector type, and row
// conversions between fp16/bf16 storage and fp32 math buffers.
//
// at::vec::Vectorized<float> is 8-wide AVX2 only when this file is compiled with the capability
// macro and the matching -m flags (setup.py adds them); otherwise it silently becomes a scalar
// emulation. The static_assert below turns "macro set but flags lost" into a compile error.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace m6::cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVecWidth = Vec::size();

#if defined(CPU_CAPABILITY_AVX2)
static_assert(Vec::size() == 8 && sizeof(Vec) == 32,
              "CPU_CAPABILITY_AVX2 is defined but Vectorized<float> is not 8-wide AVX2");
#elif defined(CPU_CAPABILITY_AVX512)
static_assert(Vec::size() == 16, "CPU_CAPABILITY_AVX512 is defined but Vectorized<float> is not 16-wide");
#endif

// dst[0:n) = float(src[0:n)). For fp16/bf16, two fp32 vectors per 16-bit vector.
template <typename T>
inline void load_row_as_float(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, sizeof(float) * n);
  } else {
    using HalfVec = at::vec::Vectorized<T>;
    int64_t i = 0;
    for (; i + HalfVec::size() <= n; i += HalfVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(HalfVec::loadu(src + i));
      lo.store(dst + i);
      hi.store(dst + i + kVecWidth);
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

// dst[0:n) = T(src[0:n)), rounding to nearest even.
template <typename T>
inline void store_row_from_float(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, sizeof(float) * n);
  } else {
    using HalfVec = at::vec::Vectorized<T>;
    int64_t i = 0;
    for (; i + HalfVec::size() <= n; i += HalfVec::size()) {
      at::vec::convert_from_float<T>(Vec::loadu(src + i), Vec::loadu(src + i + kVecWidth))
          .store(dst + i);
    }
    for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

// dst[0:n) = 0 for any of our storage types (+0.0 is all-zero bits in fp32, fp64, fp16 and bf16).
template <typename T>
inline void zero_row(T* dst, int64_t n) {
  if (n > 0) std::memset(static_cast<void*>(dst), 0, sizeof(T) * n);
}

// The first `count` floats at p as a vector (count < width: a partial load, the rest zero-filled).
inline Vec load_n(const float* p, int64_t count) {
  return count == kVecWidth ? Vec::loadu(p) : Vec::loadu(p, count);
}

// *p[0:count) = v[0:count) (count < width: a partial store).
inline void store_n(const Vec& v, float* p, int64_t count) {
  if (count == kVecWidth) v.store(p); else v.store(p, count);
}

// f(j, count) for the vectors of a row of n floats: count = width, then once count = n % width.
// Inlined, the full vectors see a constant count, so load_n/store_n compile to plain loads/stores.
template <typename F>
inline void for_each_vector(int64_t n, const F& f) {
  int64_t j = 0;
  for (; j + kVecWidth <= n; j += kVecWidth) f(j, kVecWidth);
  if (j < n) f(j, n - j);
}

// Calls fn(T{}) with T the storage type of `dtype`: float, c10::Half, c10::BFloat16 or double
// (the dtypes the m6 ops accept on the CPU, csrc/common/dtypes.h; callers have already rejected
// the others with a clear message).
template <typename Fn>
inline void dispatch_storage_type(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kDouble: fn(double{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dtype);
  }
}

// Vector of the first `count` lanes of `v`, the rest filled with `fill` (count in [0, width]).
inline Vec head_lanes(const Vec& v, int64_t count, float fill) {
  return Vec::set(Vec(fill), v, count);
}

// Sum of the lanes of v, halving the vector width each round (a tree, like at::vec::vec_reduce_all
// but from stored lanes: GCC 12 warns that ATen's AVX-512 shuffle "uses an uninitialised value").
// Called once per row, so the stores cost nothing measurable.
inline float reduce_add(const Vec& v) {
  float lanes[kVecWidth];
  v.store(lanes);
  for (int64_t width = kVecWidth / 2; width > 0; width /= 2) {
    for (int64_t k = 0; k < width; ++k) lanes[k] += lanes[k + width];
  }
  return lanes[0];
}

// max(a, b) lane by lane, one instruction: a NaN lane gives b's lane (at::vec::maximum spends three
// more instructions propagating NaN; the callers' later arithmetic propagates it anyway).
inline Vec max_fast(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(_mm512_max_ps(a, b));
#elif defined(CPU_CAPABILITY_AVX2)
  return Vec(_mm256_max_ps(a, b));
#else
  return at::vec::maximum(a, b);
#endif
}

// min(a, b) lane by lane, as max_fast.
inline Vec min_fast(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(_mm512_min_ps(a, b));
#elif defined(CPU_CAPABILITY_AVX2)
  return Vec(_mm256_min_ps(a, b));
#else
  return at::vec::minimum(a, b);
#endif
}

// Stores v at p (vector-aligned) with a non-temporal store: the line goes to memory without first
// being read into the cache. Writing a buffer far larger than the caches this way moves half the
// bytes of a normal store (measured on the dev machine: 143 MB in 4.2 ms vs 8.4 ms). The stores
// are weakly ordered: the writer calls stream_fence() before anyone else reads them.
inline void store_stream(const Vec& v, float* p) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_ps(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_stream_ps(p, v);
#else
  v.store(p);
#endif
}

// Asks for the cache lines of p[0:n) ahead of their use. Rows of a masked softmax are read from
// memory once, and a causal row reads only its first keys: the gaps between rows keep the hardware
// prefetcher from running ahead, so the kernels prefetch the next row while computing this one.
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t k = 0; k < bytes; k += 64) __builtin_prefetch(c + k, 0, 3);
}

// Outputs from this size on are written with non-temporal stores: far beyond the per-core caches,
// so nothing would find the lines there anyway. Smaller ones (a decode step's, the demo model's)
// keep normal stores, which leave them in cache for the matmul that reads them next.
constexpr int64_t kStreamMinBytes = int64_t{16} << 20;

inline bool use_streaming_stores(int64_t output_bytes) { return output_bytes >= kStreamMinBytes; }

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// dst[0:len) = value(j, count) for j < n and 0 for n <= j < len, where value(j, count) returns
// the vector of elements [j, j + count) of the row (count < width only at the row's end; lanes
// >= count are ignored). dst may alias what value() reads: each vector is read before it is stored.
// kStream: full vector-aligned vectors go out with store_stream (the caller fences), for outputs
// too large to stay in cache; the unaligned head and the tail use normal stores.
template <bool kStream = false, typename F>
inline void write_row(float* dst, int64_t n, int64_t len, const F& value) {
  if constexpr (!kStream) {
    for_each_vector(n, [&](int64_t j, int64_t c) { store_n(value(j, c), dst + j, c); });
    zero_row(dst + n, len - n);
  } else {
    // Vector [j, j + c) of the whole row: value() before n, zeros from n on.
    const auto row_vector = [&](int64_t j, int64_t c) {
      if (j + c <= n) return value(j, c);
      if (j >= n) return Vec(0.f);
      return head_lanes(value(j, n - j), n - j, 0.f);
    };
    const auto misaligned = static_cast<int64_t>((reinterpret_cast<uintptr_t>(dst) / sizeof(float)) % kVecWidth);
    int64_t j = std::min<int64_t>(len, (kVecWidth - misaligned) % kVecWidth);
    if (j > 0) store_n(row_vector(0, j), dst, j);
    for (; j + kVecWidth <= len; j += kVecWidth) store_stream(row_vector(j, kVecWidth), dst + j);
    if (j < len) store_n(row_vector(j, len - j), dst + j, len - j);
  }
}

// The exponential of the softmax and attention kernels, for arguments <= 0 (scale * x - max, up to rounding).
// AVX-512: exp(a) = 2^n * e^r with n = round(a / ln 2), r = a - n ln 2 (ln 2 split in two for an
// exact product), e^r by its degree-6 Taylor polynomial (|r| <= ln2/2: relative error < 1.3e-7),
// 2^n applied by vscalefps, which also gives 0 below 2^-149; a is clamped to -110 first, so -inf
// scores give exactly 0, and NaN stays NaN. 12 instructions against 19 for ATen's exp_u20.
// AVX2 and scalar builds: ATen's exp_u20 (error within 20 ulp; 0 below ln(FLT_MIN)), which clamps
// NaN to a finite value: NaN lanes are put back, so a NaN score still makes its row NaN (as in the
// composite) instead of finite garbage that would hide an overflow.
// Both are as accurate as the composite's softmax in the tests' three-way comparison.
inline Vec fast_exp(const Vec& a) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(-110.f), a);  // NaN lanes keep a (the 2nd operand)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);     // ln 2, high bits (exact product)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);         // ln 2, the rest
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return Vec(_mm512_scalef_ps(p, n));
#else
  return Vec::blendv(a.exp_u20(), a, a.isnan());
#endif
}

}  // namespace m6::cpu
