// CPU kernels of m6::normal_shard_ and m6::philox4x32_10_ (schemas: csrc/registration.cpp; the
// values: csrc/init/philox_normal.h).
//
// A row of the block is the run [first, first + C) of the full tensor's flat indices. Its whole
// counters go sixteen at a time through the AVX2 path below (the last group of a run may be partial:
// it is computed whole and only its counters are stored); the partial counters at either end of the
// run (a row that starts or ends inside a counter's four elements) through the scalar definition,
// philox::normal4. The AVX2 path is that definition lane by lane: the same integer and fp32 steps,
// then the same float64 multiplies, FMAs and correctly rounded sqrt and conversions, so both give
// the same bits (tests/test_normal_shard.py checks blocks whose rows split the counters
// differently against one another, bit for bit). Builds without AVX2 run the scalar path only.
//
// Threads: at::parallel_for over units of (row, kChunk columns). Every element's value depends on
// its index alone, so the result does not depend on the thread count or the split.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../common/cpu_vec.h"
#include "normal_shard.h"
#include "philox_normal.h"

// The sixteen-counter path: AVX2 integer and float64 vectors (also in AVX-512 builds, whose flags include AVX2).
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#define M6_PHILOX_AVX2 1
#endif

namespace m6 {
namespace {

constexpr int64_t kChunk = 8192;             // columns per scheduling unit
constexpr int64_t kElementsPerTask = 65536;  // the grain of the threads
constexpr int64_t kLanes = 8;                // counters per vector of words: one uint32 lane each
// Vectors of counters drawn together: Philox's ten rounds are one dependency chain per vector, so
// two independent chains in flight keep the multipliers busy (30% faster than one on the dev machine).
constexpr int kInterleave = 2;
constexpr int64_t kGroupCounters = kLanes * kInterleave;   // counters per AVX2 group
constexpr int64_t kGroupElements = kGroupCounters * philox::kWordsPerCounter;

#if defined(M6_PHILOX_AVX2)

// Round keys of a call: the key words of round r, broadcast, bumped as philox4x32_10 bumps them.
struct RoundKeys {
  __m256i k0[philox::kRounds], k1[philox::kRounds];

  explicit RoundKeys(uint64_t key) {
    uint32_t a = static_cast<uint32_t>(key), b = static_cast<uint32_t>(key >> 32);
    for (int r = 0; r < philox::kRounds; ++r, a += philox::kWeyl0, b += philox::kWeyl1) {
      k0[r] = _mm256_set1_epi32(static_cast<int>(a));
      k1[r] = _mm256_set1_epi32(static_cast<int>(b));
    }
  }
};

// Four words of eight counters, one counter per lane (structure of arrays).
struct Words8 {
  __m256i x0, x1, x2, x3;
};

// hi, lo = the 64-bit products multiplier * a, lane by lane: vpmuludq multiplies the even lanes,
// the odd ones are shifted down into even position first.
inline void mulhilo8(__m256i a, __m256i multiplier, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, multiplier);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), multiplier);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// A group's words: w[g] holds counters counter + 8 g .. counter + 8 g + 7 (philox::philox4x32_10 per lane).
inline void philox_group(uint64_t counter, const RoundKeys& keys, Words8 (&w)[kInterleave]) {
  const uint32_t first_lo = static_cast<uint32_t>(counter), first_hi = static_cast<uint32_t>(counter >> 32);
  if (first_lo <= UINT32_MAX - static_cast<uint32_t>(kGroupCounters - 1)) {  // no carry into word 1
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
#pragma GCC unroll 2
    for (int g = 0; g < kInterleave; ++g) {
      w[g] = {_mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first_lo + kLanes * g)), lanes),
              _mm256_set1_epi32(static_cast<int>(first_hi)), _mm256_setzero_si256(), _mm256_setzero_si256()};
    }
  } else {  // the group crosses a multiple of 2^32: lane by lane
    alignas(32) uint32_t lo[kGroupCounters], hi[kGroupCounters];
    for (int64_t lane = 0; lane < kGroupCounters; ++lane) {
      const uint64_t c = counter + static_cast<uint64_t>(lane);
      lo[lane] = static_cast<uint32_t>(c);
      hi[lane] = static_cast<uint32_t>(c >> 32);
    }
    for (int g = 0; g < kInterleave; ++g) {
      w[g] = {_mm256_load_si256(reinterpret_cast<const __m256i*>(lo + kLanes * g)),
              _mm256_load_si256(reinterpret_cast<const __m256i*>(hi + kLanes * g)), _mm256_setzero_si256(),
              _mm256_setzero_si256()};
    }
  }
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(philox::kMultiplier0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(philox::kMultiplier1));
  for (int r = 0; r < philox::kRounds; ++r) {
#pragma GCC unroll 2
    for (int g = 0; g < kInterleave; ++g) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(w[g].x0, m0, hi0, lo0);
      mulhilo8(w[g].x2, m1, hi1, lo1);
      w[g] = {_mm256_xor_si256(_mm256_xor_si256(hi1, w[g].x1), keys.k0[r]), lo1,
              _mm256_xor_si256(_mm256_xor_si256(hi0, w[g].x3), keys.k1[r]), lo0};
    }
  }
}

inline __m256d low_half_pd(__m256 v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
inline __m256d high_half_pd(__m256 v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }
inline __m256d low_half_pd(__m256i v) { return _mm256_cvtepi32_pd(_mm256_castsi256_si128(v)); }
inline __m256d high_half_pd(__m256i v) { return _mm256_cvtepi32_pd(_mm256_extracti128_si256(v, 1)); }
// A 32-bit lane mask (0 / -1) widened to the 64-bit lanes of one half.
inline __m256d low_half_mask(__m256i m) { return _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(m))); }
inline __m256d high_half_mask(__m256i m) {
  return _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(m, 1)));
}

inline __m256d fma_pd(__m256d a, __m256d b, __m256d c) { return _mm256_fmadd_pd(a, b, c); }

// philox::horner on four lanes.
template <typename... Rest>
inline __m256d horner_pd(__m256d x, double c0, Rest... rest) {
  if constexpr (sizeof...(rest) == 0) {
    return _mm256_set1_pd(c0);
  } else {
    return fma_pd(horner_pd(x, rest...), x, _mm256_set1_pd(c0));
  }
}

// philox::scaled_radius of four lanes: x = f - 1 and e from the fp32 steps, then float64.
inline __m256d scaled_radius4(__m256d x, __m256d e, __m256d neg_two_var) {
  const __m256d ln_f = fma_pd(_mm256_mul_pd(x, x), horner_pd(x, M6_PHILOX_LOG_Q), x);
  const __m256d ln_u = fma_pd(e, _mm256_set1_pd(philox::kLn2), ln_f);
  return _mm256_sqrt_pd(_mm256_mul_pd(ln_u, neg_two_var));
}

// philox::scaled_radius of eight words: lanes 0-3 in lo, 4-7 in hi.
inline void scaled_radius8(__m256i word, __m256d neg_two_var, __m256d& lo, __m256d& hi) {
  const __m256i k = _mm256_add_epi32(_mm256_srli_epi32(word, 8), _mm256_set1_epi32(1));
  const __m256i biased = _mm256_add_epi32(_mm256_castps_si256(_mm256_cvtepi32_ps(k)),
                                          _mm256_set1_epi32(static_cast<int>(philox::kLogBias)));
  const __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(biased, 23), _mm256_set1_epi32(philox::kExponentOffset));
  const __m256 f = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_and_si256(biased, _mm256_set1_epi32(0x7fffff)),
                                                        _mm256_set1_epi32(static_cast<int>(philox::kSqrtHalfBits))));
  const __m256 x = _mm256_sub_ps(f, _mm256_set1_ps(1.f));
  lo = scaled_radius4(low_half_pd(x), low_half_pd(e), neg_two_var);
  hi = scaled_radius4(high_half_pd(x), high_half_pd(e), neg_two_var);
}

struct SinCos4 {
  __m256d sin, cos;
};

// philox::sincos_of_turn's polynomials and octant symmetries for four lanes.
inline SinCos4 sincos4(__m256d steps, __m256d swap, __m256d neg_sin, __m256d neg_cos) {
  const __m256d a = _mm256_mul_pd(steps, _mm256_set1_pd(philox::kAngleStep));
  const __m256d a2 = _mm256_mul_pd(a, a);
  const __m256d s = fma_pd(_mm256_mul_pd(a, a2), horner_pd(a2, M6_PHILOX_SIN_S), a);
  const __m256d c = fma_pd(a2, horner_pd(a2, M6_PHILOX_COS_C), _mm256_set1_pd(1.0));
  const __m256d sign = _mm256_set1_pd(-0.0);
  const __m256d sin_value = _mm256_blendv_pd(s, c, swap), cos_value = _mm256_blendv_pd(c, s, swap);
  return {_mm256_xor_pd(sin_value, _mm256_and_pd(neg_sin, sign)), _mm256_xor_pd(cos_value, _mm256_and_pd(neg_cos, sign))};
}

// philox::sincos_of_turn of eight words: lanes 0-3 in lo, 4-7 in hi.
inline void sincos8(__m256i word, SinCos4& lo, SinCos4& hi) {
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i m = _mm256_srli_epi32(word, 8);
  const __m256i octant = _mm256_srli_epi32(m, philox::kOctantBits);
  const __m256i within = _mm256_and_si256(m, _mm256_set1_epi32(static_cast<int>(philox::kOctantSteps - 1)));
  const __m256i odd = _mm256_cmpeq_epi32(_mm256_and_si256(octant, one), one);
  const __m256i steps = _mm256_blendv_epi8(
      within, _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(philox::kOctantSteps)), within), odd);
  const __m256i swap = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_srli_epi32(_mm256_add_epi32(octant, one), 1), one), one);
  const __m256i neg_sin = _mm256_cmpgt_epi32(octant, _mm256_set1_epi32(3));
  const __m256i neg_cos = _mm256_cmpeq_epi32(
      _mm256_and_si256(_mm256_srli_epi32(_mm256_add_epi32(octant, _mm256_set1_epi32(2)), 2), one), one);
  lo = sincos4(low_half_pd(steps), low_half_mask(swap), low_half_mask(neg_sin), low_half_mask(neg_cos));
  hi = sincos4(high_half_pd(steps), high_half_mask(swap), high_half_mask(neg_sin), high_half_mask(neg_cos));
}

// Elements 4 c .. 4 c + 3 of four counters (r: a pair's radius, t: its angle) in counter order.
inline void store_counters4(float* dst, __m256d r0, const SinCos4& t0, __m256d r1, const SinCos4& t1) {
  __m128 e0 = _mm256_cvtpd_ps(_mm256_mul_pd(r0, t0.cos));  // element 0 of each counter
  __m128 e1 = _mm256_cvtpd_ps(_mm256_mul_pd(r0, t0.sin));
  __m128 e2 = _mm256_cvtpd_ps(_mm256_mul_pd(r1, t1.cos));
  __m128 e3 = _mm256_cvtpd_ps(_mm256_mul_pd(r1, t1.sin));
  _MM_TRANSPOSE4_PS(e0, e1, e2, e3);                        // e_j: the four elements of counter j
  _mm_storeu_ps(dst, e0);
  _mm_storeu_ps(dst + 4, e1);
  _mm_storeu_ps(dst + 8, e2);
  _mm_storeu_ps(dst + 12, e3);
}

// dst[0:4 kGroupCounters) = elements 4 counter .. of the group's counters (philox::normal4 of each).
inline void normal_group(uint64_t counter, const RoundKeys& keys, __m256d neg_two_var, float* dst) {
  Words8 words[kInterleave];
  philox_group(counter, keys, words);
  for (const Words8& w : words) {
    __m256d r0_lo, r0_hi, r1_lo, r1_hi;
    scaled_radius8(w.x0, neg_two_var, r0_lo, r0_hi);
    scaled_radius8(w.x2, neg_two_var, r1_lo, r1_hi);
    SinCos4 t0_lo, t0_hi, t1_lo, t1_hi;
    sincos8(w.x1, t0_lo, t0_hi);
    sincos8(w.x3, t1_lo, t1_hi);
    store_counters4(dst, r0_lo, t0_lo, r1_lo, t1_lo);
    store_counters4(dst + 16, r0_hi, t0_hi, r1_hi, t1_hi);
    dst += kLanes * philox::kWordsPerCounter;
  }
}

// The words of the group's counters, counter by counter (four int32 each).
inline void store_group_words(uint64_t counter, const RoundKeys& keys, int32_t* dst) {
  Words8 words[kInterleave];
  philox_group(counter, keys, words);
  for (const Words8& w : words) {
    alignas(32) uint32_t lanes[4][kLanes];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[0]), w.x0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[1]), w.x1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[2]), w.x2);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[3]), w.x3);
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      for (int word = 0; word < 4; ++word) dst[lane * 4 + word] = static_cast<int32_t>(lanes[word][lane]);
    }
    dst += kLanes * 4;
  }
}
#endif

// One call's stream: the key and -2 std^2, with the AVX2 path's broadcast forms.
struct Stream {
  uint64_t key;
  double neg_two_var;
#if defined(M6_PHILOX_AVX2)
  RoundKeys keys;
  __m256d neg_two_var_pd;
  Stream(uint64_t k, double v) : key(k), neg_two_var(v), keys(k), neg_two_var_pd(_mm256_set1_pd(v)) {}
#else
  Stream(uint64_t k, double v) : key(k), neg_two_var(v) {}
#endif
};

// out[0:count) = values of counter's elements [skip, skip + count) (scalar definition).
template <typename T>
void store_partial_counter(const Stream& s, uint64_t counter, int64_t skip, int64_t count, T* out) {
  float v[philox::kWordsPerCounter];
  philox::normal4(counter, s.key, s.neg_two_var, v);
  for (int64_t j = 0; j < count; ++j) out[j] = static_cast<T>(v[skip + j]);
}

// out[0:4 counters) = the elements of the whole counters counter .. counter + counters - 1.
template <typename T>
void store_whole_counters(const Stream& s, uint64_t counter, int64_t counters, T* out) {
  float buffer[kGroupElements];
#if defined(M6_PHILOX_AVX2)
  for (int64_t g = 0; g < counters; g += kGroupCounters) {
    const int64_t n = std::min(kGroupCounters, counters - g) * philox::kWordsPerCounter;
    normal_group(counter + static_cast<uint64_t>(g), s.keys, s.neg_two_var_pd, buffer);
    cpu::store_row_from_float(buffer, out + g * philox::kWordsPerCounter, n);
  }
#else
  for (int64_t g = 0; g < counters; ++g) {
    philox::normal4(counter + static_cast<uint64_t>(g), s.key, s.neg_two_var, buffer);
    cpu::store_row_from_float(buffer, out + g * philox::kWordsPerCounter, philox::kWordsPerCounter);
  }
#endif
}

// out[0:n) = the elements [first, first + n) of the full tensor's stream.
template <typename T>
void fill_run(const Stream& s, uint64_t first, int64_t n, T* out) {
  constexpr int64_t kWords = philox::kWordsPerCounter;
  int64_t done = 0;
  if (const int64_t skip = static_cast<int64_t>(first % kWords); skip != 0 && n > 0) {  // starts inside a counter
    done = std::min(kWords - skip, n);
    store_partial_counter(s, first / kWords, skip, done, out);
  }
  const uint64_t counter = (first + static_cast<uint64_t>(done)) / kWords;
  const int64_t whole = (n - done) / kWords;
  store_whole_counters(s, counter, whole, out + done);
  done += whole * kWords;
  if (done < n) store_partial_counter(s, counter + static_cast<uint64_t>(whole), 0, n - done, out + done);  // ends inside one
}

template <typename T>
void fill_block(const ShardGeometry& g, const Stream& s, T* out) {
  const int64_t chunks = (g.cols + kChunk - 1) / kChunk;
  at::parallel_for(0, g.rows * chunks, std::max<int64_t>(1, kElementsPerTask / kChunk), [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t row = unit / chunks, col = (unit % chunks) * kChunk;
      const uint64_t first = g.first + static_cast<uint64_t>(row * g.full_cols + col);
      fill_run(s, first, std::min(kChunk, g.cols - col), out + row * g.row_stride + col);
    }
  });
}

void normal_shard_cpu(const at::Tensor& out, int64_t key, int64_t full_cols, int64_t row0, int64_t col0, double std) {
  const ShardGeometry g = normal_shard_geometry(out, full_cols, row0, col0, std);
  TORCH_CHECK(out.device().is_cpu(), "normal_shard_: out must be a CPU tensor here, got ", out.device());
  if (g.rows == 0 || g.cols == 0) return;
  const Stream s(static_cast<uint64_t>(key), neg_two_variance(std));
  switch (out.scalar_type()) {
    case at::kFloat: fill_block(g, s, out.mutable_data_ptr<float>()); break;
    case at::kHalf: fill_block(g, s, out.mutable_data_ptr<c10::Half>()); break;
    default: fill_block(g, s, out.mutable_data_ptr<c10::BFloat16>()); break;
  }
}

void philox4x32_10_cpu(const at::Tensor& out, int64_t key, int64_t counter) {
  check_philox_args(out, counter);
  TORCH_CHECK(out.device().is_cpu(), "philox4x32_10_: out must be a CPU tensor here, got ", out.device());
  const int64_t n = out.size(0);
  int32_t* words = out.mutable_data_ptr<int32_t>();
  const uint64_t first = static_cast<uint64_t>(counter), k = static_cast<uint64_t>(key);
  int64_t done = 0;
#if defined(M6_PHILOX_AVX2)
  const RoundKeys keys(k);
  for (; done + kGroupCounters <= n; done += kGroupCounters) {
    store_group_words(first + static_cast<uint64_t>(done), keys, words + done * 4);
  }
#endif
  for (; done < n; ++done) {  // the scalar definition: the last n % 16 counters (all without AVX2)
    const philox::Words w = philox::philox4x32_10(first + static_cast<uint64_t>(done), k);
    const uint32_t four[4] = {w.x0, w.x1, w.x2, w.x3};
    for (int word = 0; word < 4; ++word) words[done * 4 + word] = static_cast<int32_t>(four[word]);
  }
}

}  // namespace
}  // namespace m6

TORCH_LIBRARY_IMPL(m6, CPU, m) {
  m.impl("normal_shard_", &m6::normal_shard_cpu);
  m.impl("philox4x32_10_", &m6::philox4x32_10_cpu);
}
