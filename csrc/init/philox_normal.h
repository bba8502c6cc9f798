// The counter-based normal draws of m6::normal_shard_ and m6::philox4x32_10_, one scalar definition
// for the CUDA kernel and the CPU kernel's scalar path (the CPU's AVX2 path, normal_shard_cpu.cpp,
// is the same operations in the same order, eight counters at a time).
//
// Element i of a full tensor (its flat, row-major index) is a pure function of the tensor's 64-bit
// key and i, so any shard of the tensor can be drawn alone, on any device, with the values the
// whole tensor would have there:
//
//   counter c = i / 4;   (x0, x1, x2, x3) = Philox4x32-10(ctr = (c mod 2^32, c / 2^32, 0, 0),
//                                                          key = (key mod 2^32, key / 2^32))
//   pair p in {0, 1}:    u = ((x_2p >> 8) + 1) 2^-24 in (0, 1],   v = (x_2p+1 >> 8) 2^-24 in [0, 1)
//   element 4c + 2p      = std sqrt(-2 ln u) cos(2 pi v)     (Box-Muller)
//   element 4c + 2p + 1  = std sqrt(-2 ln u) sin(2 pi v)
//
// Philox4x32-10 is Random123's (Salmon et al., SC'11; cuRAND's Philox4_32_10): ten rounds of two
// 32 x 32 -> 64-bit products, the key bumped by the Weyl constants between rounds. 24-bit uniforms
// are exact in any float format, and u > 0 keeps the log finite (|value| <= 5.77 std).
//
// Why double: the transform runs in float64 and is rounded to fp32 once, so the fp32 result is
// within 1 ulp of the exact value (its rounding error 0.5 ulp plus the polynomials' ~2e-10
// relative error; an fp32 Box-Muller gathers 3-4 ulp from its log, sqrt, sin and products). The
// functions are polynomials of our own fit (Lawson-weighted least squares on Chebyshev nodes, in
// float64) evaluated with explicit fused multiply-adds, and the reductions are exact integer and
// fp32 operations, so no libm and no compiler choice (FMA contraction, --use_fast_math's
// intrinsics) enters: the CPU and CUDA kernels compute the same bits.
//   ln u:   u = 2^e f with f in [sqrt(1/2), sqrt(2)) read off the fp32 bits of the 24-bit integer
//           k = u 2^24 (exact); ln u = e ln 2 + x + x^2 Q(x), x = f - 1 (exact in fp32), Q of degree
//           10: relative error < 1.1e-10.
//   angle:  2 pi v = octant pi/4 + a with the octant and a's numerator taken from the integer
//           m = v 2^24 (exact; odd octants mirrored, a = (2^21 - m mod 2^21) 2 pi / 2^24), so
//           a in [0, pi/4] carries no cancellation; sin a = a + a^3 S(a^2), cos a = 1 + a^2 C(a^2),
//           S and C of degree 3: relative error < 6.4e-11. Octant symmetries swap and negate them.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/bit_cast.h>

#include <cmath>
#include <cstdint>

namespace m6::philox {

constexpr uint32_t kMultiplier0 = 0xD2511F53u;
constexpr uint32_t kMultiplier1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;  // the key bumps between rounds
constexpr uint32_t kWeyl1 = 0xBB67AE85u;
constexpr int kRounds = 10;
constexpr int kWordsPerCounter = 4;       // outputs of one counter: four uint32, four elements

// The polynomials' coefficients, constant term first, as lists for horner() (macros, not arrays:
// a host array is not readable in device code, and the AVX2 path takes the same lists).
// ln(1 + x) = x + x^2 Q(x) on [sqrt(1/2) - 1, sqrt(2) - 1], Q of degree 10.
#define M6_PHILOX_LOG_Q                                                                        \
  -0.5000000028416755, 0.3333333198271343, -0.24999938116043005, 0.20000096459320102,          \
      -0.1667032763228567, 0.14285697960421423, -0.12412643898435168, 0.11021093308845804,      \
      -0.10870501069170693, 0.10727001721559833, -0.05994138109783834
// sin a = a + a^3 S(a^2), cos a = 1 + a^2 C(a^2) on [0, pi/4], S and C of degree 3.
#define M6_PHILOX_SIN_S -0.16666666640797106, 0.008333329304847358, -0.000198393122706933, 2.7181216372376867e-06
#define M6_PHILOX_COS_C -0.49999999694476166, 0.0416666203571494, -0.0013886681648481447, 2.4383567352865426e-05
constexpr double kLn2 = 0.6931471805599453;
constexpr double kAngleStep = 3.7450702829239286e-07;  // 2 pi / 2^24 = pi 2^-23 (exact scaling of fl(pi))

// The fp32 bit trick of the log's range reduction: adding kLogBias to the bits of k > 0 carries
// into the exponent exactly when k's mantissa is >= sqrt(2), so (bits >> 23) - 127 is e and the
// mantissa bits plus kSqrtHalfBits are f in [sqrt(1/2), sqrt(2)).
constexpr uint32_t kSqrtHalfBits = 0x3f3504f3u;         // fp32 sqrt(1/2)
constexpr uint32_t kLogBias = 0x3f800000u - kSqrtHalfBits;
constexpr int kUniformBits = 24;
constexpr int kExponentOffset = 127 + kUniformBits;     // u = k 2^-24
constexpr uint32_t kOctantBits = 21;                    // an octant is 2^21 of the 2^24 angle steps
constexpr uint32_t kOctantSteps = 1u << kOctantBits;

// The four 32-bit outputs of one counter.
struct Words {
  uint32_t x0, x1, x2, x3;
};

// Arithmetic every compiler and device does alike: explicit roundings (nvcc's -fmad would fuse a
// product into a following add; GCC's -ffp-contract=fast likewise).
C10_HOST_DEVICE inline double fma_rn(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

C10_HOST_DEVICE inline double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

C10_HOST_DEVICE inline double sqrt_rn(double a) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

C10_HOST_DEVICE inline float to_float_rn(double a) {
#if defined(__CUDA_ARCH__)
  return __double2float_rn(a);
#else
  return static_cast<float>(a);
#endif
}

// c0 + x (c1 + x (c2 + ...)), innermost first, one fused multiply-add per coefficient.
template <typename... Rest>
C10_HOST_DEVICE inline double horner(double x, double c0, Rest... rest) {
  if constexpr (sizeof...(rest) == 0) {
    return c0;
  } else {
    return fma_rn(horner(x, rest...), x, c0);
  }
}

// Philox4x32-10 of counter (c mod 2^32, c / 2^32, 0, 0) under key (key mod 2^32, key / 2^32).
C10_HOST_DEVICE inline Words philox4x32_10(uint64_t counter, uint64_t key) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
#pragma unroll
  for (int round = 0; round < kRounds; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kMultiplier0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kMultiplier1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return {c0, c1, c2, c3};
}

// std sqrt(-2 ln u) for u = ((word >> 8) + 1) 2^-24, as sqrt(ln u * neg_two_var), neg_two_var = -2 std^2.
C10_HOST_DEVICE inline double scaled_radius(uint32_t word, double neg_two_var) {
  const uint32_t k = (word >> 8) + 1u;  // [1, 2^24]: exact in fp32
  const uint32_t biased = c10::bit_cast<uint32_t>(static_cast<float>(k)) + kLogBias;
  const int e = static_cast<int>(biased >> 23) - kExponentOffset;
  const float f = c10::bit_cast<float>((biased & 0x7fffffu) + kSqrtHalfBits);
  const double x = static_cast<double>(f - 1.0f);  // exact (Sterbenz)
  const double ln_f = fma_rn(mul_rn(x, x), horner(x, M6_PHILOX_LOG_Q), x);
  const double ln_u = fma_rn(static_cast<double>(e), kLn2, ln_f);
  return sqrt_rn(mul_rn(ln_u, neg_two_var));
}

struct SinCos {
  double sin, cos;
};

// sin and cos of 2 pi m 2^-24 for m = word >> 8.
C10_HOST_DEVICE inline SinCos sincos_of_turn(uint32_t word) {
  const uint32_t m = word >> 8;
  const uint32_t octant = m >> kOctantBits, within = m & (kOctantSteps - 1);
  const uint32_t steps = (octant & 1u) ? kOctantSteps - within : within;  // odd octants: from the far end
  const double a = mul_rn(static_cast<double>(steps), kAngleStep);       // [0, pi/4]
  const double a2 = mul_rn(a, a);
  const double s = fma_rn(mul_rn(a, a2), horner(a2, M6_PHILOX_SIN_S), a);
  const double c = fma_rn(a2, horner(a2, M6_PHILOX_COS_C), 1.0);
  // Octants 1, 2, 5, 6 take the co-function; sin < 0 in octants 4-7, cos < 0 in octants 2-5.
  const bool swap = ((octant + 1u) >> 1) & 1u;
  double sin_value = swap ? c : s, cos_value = swap ? s : c;
  if (octant >= 4u) sin_value = -sin_value;
  if (((octant + 2u) >> 2) & 1u) cos_value = -cos_value;
  return {sin_value, cos_value};
}

// Elements 4 counter .. 4 counter + 3 of the stream of `key`, scaled by std (neg_two_var = -2 std^2).
C10_HOST_DEVICE inline void normal4(uint64_t counter, uint64_t key, double neg_two_var, float out[4]) {
  const Words w = philox4x32_10(counter, key);
  const double r0 = scaled_radius(w.x0, neg_two_var), r1 = scaled_radius(w.x2, neg_two_var);
  const SinCos t0 = sincos_of_turn(w.x1), t1 = sincos_of_turn(w.x3);
  out[0] = to_float_rn(mul_rn(r0, t0.cos));
  out[1] = to_float_rn(mul_rn(r0, t0.sin));
  out[2] = to_float_rn(mul_rn(r1, t1.cos));
  out[3] = to_float_rn(mul_rn(r1, t1.sin));
}

}  // namespace m6::philox
