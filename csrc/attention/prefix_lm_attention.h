// Shared by the kernels of m6::prefix_lm_attention: argument checks with one wording, and the
// counter-based dropout RNG (a pure function of seed and element coordinates, so forward, backward
// and an activation recompute regenerate the same keep mask without storing it). See
// csrc/registration.cpp for the schema and m6_engine/ops/attention.py for the math.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cstdint>

#include "../common/dtypes.h"
#include "../masked_softmax/masked_softmax.h"

namespace m6 {

constexpr const char* kAttentionOp = "prefix_lm_attention";

// q (B, H, Sq, D), k and v (B, H, Sk, D) of one dtype and device, lengths (B,).
inline void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& prefix_len, const at::Tensor& valid_len,
                                  const at::Tensor& q_offset, double dropout_p) {
  const std::pair<const at::Tensor*, const char*> qkv[] = {{&q, "q"}, {&k, "k"}, {&v, "v"}};
  for (const auto& [t, name] : qkv) {
    TORCH_CHECK(t->dim() == 4, kAttentionOp, ": ", name, " must be 4-D (B, H, S, D), got ", t->dim(), "-D");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), kAttentionOp, ": ", name, " must have q's dtype ",
                q.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), kAttentionOp, ": ", name, " must be on q's device ", q.device(),
                ", got ", t->device());
  }
  TORCH_CHECK(kernel_dtype_ok(q.scalar_type(), q.device()), kAttentionOp, ": q, k, v must be ",
              kernel_dtypes_text(q.device()), ", got ", q.scalar_type());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == q.size(1) && v.size(1) == q.size(1),
              kAttentionOp, ": q, k, v must agree in batch and heads, got q ", q.sizes(), ", k ", k.sizes(),
              ", v ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), kAttentionOp, ": k and v must have one shape, got k ", k.sizes(), ", v ",
              v.sizes());
  TORCH_CHECK(k.size(3) == q.size(3), kAttentionOp, ": q and k must have one head dim, got ", q.size(3), " and ",
              k.size(3));
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, kAttentionOp, ": dropout_p must be in [0, 1), got ", dropout_p);
  check_per_sample_args(q, prefix_len, valid_len, q_offset, kAttentionOp, "q");
}

// --- Dropout RNG -----------------------------------------------------------------------------
// Element (b, h, i, j) of the (B, H, Sq, Sk) probabilities is kept iff
//   dropout_bits(dropout_row_key(seed, (b * H + h) * Sq + i), j) >= dropout_threshold(p),
// i.e. with probability 1 - p (to 2^-32). The row key is SplitMix64 of the seed and row index (high
// 32 bits); the element bits are the "lowbias32" integer hash of key + j, a bijection of 32-bit
// integers whose output bits each flip with probability ~1/2 when any input bit flips. Both are
// written in plain integer arithmetic so the CPU vector path, the scalar path and the Python test
// oracle (tests/attention_rng.py) compute identical bits.

C10_HOST_DEVICE inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

C10_HOST_DEVICE inline uint32_t dropout_row_key(uint64_t seed, uint64_t row) {
  return static_cast<uint32_t>(splitmix64(seed + row * 0x9E3779B97F4A7C15ull) >> 32);
}

C10_HOST_DEVICE inline uint32_t dropout_bits(uint32_t key, uint32_t j) {
  uint32_t x = key + j;
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Elements whose bits are below this are dropped: floor(p * 2^32), p in [0, 1).
inline uint32_t dropout_threshold(double p) { return static_cast<uint32_t>(p * 4294967296.0); }

}  // namespace m6
