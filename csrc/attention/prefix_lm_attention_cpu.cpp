// CPU kernels of m6::prefix_lm_attention and its backward (schema: csrc/registration.cpp).
//
// Shapes: q (B, H, Sq, D), k / v (B, H, Sk, D), any strides with a unit last stride (others are
// made contiguous); out (B, H, Sq, D) with the memory of a (B, Sq, H, D) tensor, so merging the
// heads afterwards (context.transpose(1, 2).reshape(B, Sq, H * D)) is a view, not a copy; lse
// (B, H, Sq) fp32 (fp64 for fp64): the log-sum-exp of each row's scaled scores, -inf for padded rows.
//
// Query row i of sample b sees keys [0, n_i), n_i = visible_keys(q_offset[b], i, prefix_len[b],
// valid_len[b]) (the allowed set is always a prefix of the keys). FlashAttention-2's scheme, tiled
// for the CPU caches: a task takes kQueryTile rows of one head and walks key tiles of kKeyTile
// only up to the largest n_i of its rows, so tiles above the causal diagonal and past valid_len are
// never touched (with M6's multimodal prefix 272 of 528 that is 37% of the S x S pairs).
// Forward per key tile:  S = scale Q K^T (BLAS);  online softmax per row (running max m, sum l,
//                         the output accumulator rescaled by exp(m_old - m_new));  O += P V.
//                         out = O / l, lse = m + log l.
// Backward per head, query tile by query tile (FlashAttention-2's recomputation; nothing S x S is
// saved): P = exp(S - lse) recomputed,  dV += P^T dO,  dP = dO V^T,  dS = P (dP - rowsum(dO out)),
//                         dQ += scale dS K,  dK += scale dS^T Q.
// Dropout (p > 0): P' = P * keep / (1 - p) replaces P in O += P' V and dV += P'^T dO, and dP is
// masked alike; the keep mask is regenerated from the seed (prefix_lm_attention.h), never stored.
// Math in fp32 (fp64 for fp64, the exact path for gradcheck); fp16 / bf16 tiles are widened into
// per-task fp32 buffers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/cpu_gemm.h"
#include "../common/cpu_output_cache.h"
#include "../common/cpu_vec.h"
#include "prefix_lm_attention.h"

namespace m6 {
namespace {

using cpu::Vec;
using cpu::kVecWidth;

// Query rows per task and keys per tile: the 64 x 128 fp32 tiles of S, P and dP (32 KiB each) stay
// in L2 next to the Q, K, V tiles; the diagonal tile's masked half is the only wasted work.
// Measured on the 2-core dev machine at (8, 16, 528, 64), prefix 272, fwd / fwd+bwd ms: 64 x 64
// 62 / 199, 64 x 128 56 / 195, 128 x 64 59 / 190, 32 x 128 65 / 221 (within noise of each other
// but the last; the BLAS is at its small-matrix speed from 64 on).
constexpr int64_t kQueryTile = 64;
constexpr int64_t kKeyTile = 128;

// A (B, H, S, D) tensor with unit last stride: the row pointer of (b, h, i).
template <typename T>
struct HeadRows {
  const T* data;
  int64_t stride_b, stride_h, stride_s;

  explicit HeadRows(const at::Tensor& t)
      : data(t.const_data_ptr<T>()), stride_b(t.stride(0)), stride_h(t.stride(1)), stride_s(t.stride(2)) {}
  const T* row(int64_t b, int64_t h, int64_t i) const { return data + b * stride_b + h * stride_h + i * stride_s; }
};

// Rows [i0, i0 + n) of head (b, h) as a math-type matrix: a pointer and its row stride. fp32 and
// fp64 inputs are read in place; fp16 / bf16 rows are widened into buf (n x d).
template <typename acc_t>
struct Tile {
  const acc_t* p;
  int64_t ld;
};

template <typename acc_t, typename T>
Tile<acc_t> tile_rows(const HeadRows<T>& x, int64_t b, int64_t h, int64_t i0, int64_t n, int64_t d, acc_t* buf) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return {x.row(b, h, i0), x.stride_s};
  } else {
    for (int64_t r = 0; r < n; ++r) cpu::load_row_as_float(x.row(b, h, i0 + r), buf + r * d, d);
    return {buf, d};
  }
}

template <typename T>
void store_row(const float* src, T* dst, int64_t n) { cpu::store_row_from_float(src, dst, n); }
inline void store_row(const double* src, double* dst, int64_t n) { std::copy(src, src + n, dst); }

// --- Row operations (fp32 vectorised; fp64 scalar) ---------------------------------------------

float row_max(const float* x, int64_t n) {
  Vec m(x[0]);
  cpu::for_each_vector(n, [&](int64_t j, int64_t c) {
    m = cpu::max_fast(m, cpu::head_lanes(cpu::load_n(x + j, c), c, x[0]));
  });
  float lanes[kVecWidth];
  m.store(lanes);
  return *std::max_element(lanes, lanes + kVecWidth);
}
double row_max(const double* x, int64_t n) { return *std::max_element(x, x + n); }

// x[j] = exp(x[j] - sub) for j < n; returns their sum.
float exp_row(float* x, int64_t n, float sub) {
  const Vec vsub(sub);
  Vec sum(0.f);
  cpu::for_each_vector(n, [&](int64_t j, int64_t c) {
    const Vec e = cpu::fast_exp(cpu::load_n(x + j, c) - vsub);
    cpu::store_n(e, x + j, c);
    sum += cpu::head_lanes(e, c, 0.f);
  });
  return cpu::reduce_add(sum);
}
double exp_row(double* x, int64_t n, double sub) {
  double sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += (x[j] = std::exp(x[j] - sub));
  return sum;
}

template <typename acc_t>
void scale_row(acc_t* x, int64_t n, acc_t factor) {
  for (int64_t j = 0; j < n; ++j) x[j] *= factor;
}

// sum_j a[j] * b[j] with a, b of storage type T (rows of dO and out).
template <typename T>
float dot_rows(const T* a, const T* b, int64_t n, float* buf) {
  const float* af;
  const float* bf;
  if constexpr (std::is_same_v<T, float>) {
    af = a;
    bf = b;
  } else {
    cpu::load_row_as_float(a, buf, n);
    cpu::load_row_as_float(b, buf + n, n);
    af = buf;
    bf = buf + n;
  }
  Vec acc(0.f);
  cpu::for_each_vector(n, [&](int64_t j, int64_t c) { acc = at::vec::fmadd(cpu::load_n(af + j, c), cpu::load_n(bf + j, c), acc); });
  return cpu::reduce_add(acc);
}
double dot_rows(const double* a, const double* b, int64_t n, double*) {
  double acc = 0;
  for (int64_t j = 0; j < n; ++j) acc += a[j] * b[j];
  return acc;
}

// x[j] *= keep(j0 + j) / (1 - p) for j < n, 0 where dropped (the rule of prefix_lm_attention.h).
void dropout_row(float* x, int64_t n, uint32_t key, uint32_t j0, uint32_t threshold, float inv_keep) {
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  // Eight lanes at a time in AVX2 integer arithmetic (the same 32-bit operations as dropout_bits).
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i vthr = _mm256_set1_epi32(static_cast<int>(threshold));
  const __m256 vinv = _mm256_set1_ps(inv_keep);
  for (; j + 8 <= n; j += 8) {
    __m256i h = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(key + j0 + static_cast<uint32_t>(j))), lane);
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0x7FEB352D));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0x846CA68Bu)));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    // Unsigned h >= threshold  <=>  max_u(h, threshold) == h.
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_max_epu32(h, vthr), h));
    _mm256_storeu_ps(x + j, _mm256_and_ps(keep, _mm256_mul_ps(_mm256_loadu_ps(x + j), vinv)));
  }
#endif
  for (; j < n; ++j) {
    x[j] = dropout_bits(key, j0 + static_cast<uint32_t>(j)) >= threshold ? x[j] * inv_keep : 0.f;
  }
}
void dropout_row(double* x, int64_t n, uint32_t key, uint32_t j0, uint32_t threshold, double inv_keep) {
  for (int64_t j = 0; j < n; ++j) {
    x[j] = dropout_bits(key, j0 + static_cast<uint32_t>(j)) >= threshold ? x[j] * inv_keep : 0.0;
  }
}

// --- Shared set-up -------------------------------------------------------------------------

struct Lengths {
  at::Tensor prefix, valid, q_offset;  // host int64 copies

  Lengths(const at::Tensor& prefix_len, const at::Tensor& valid_len, const at::Tensor& q_offset_in, int64_t batch,
          int64_t sk)
      : prefix(prefix_len.to(at::kCPU, at::kLong).contiguous()),
        valid(valid_len.to(at::kCPU, at::kLong).contiguous()),
        q_offset(q_offset_in.to(at::kCPU, at::kLong).contiguous()) {
    check_length_values(prefix.const_data_ptr<int64_t>(), valid.const_data_ptr<int64_t>(),
                        q_offset.const_data_ptr<int64_t>(), batch, sk, kAttentionOp);
  }
  int64_t keys(int64_t b, int64_t i) const {
    return visible_keys(q_offset.const_data_ptr<int64_t>()[b], i, prefix.const_data_ptr<int64_t>()[b],
                        valid.const_data_ptr<int64_t>()[b]);
  }
};

struct Dims {
  int64_t batch, heads, sq, sk, d;
};

struct Dropout {
  uint64_t seed;
  uint32_t threshold;
  double inv_keep;
  bool on;

  Dropout(double p, int64_t seed_in)
      : seed(static_cast<uint64_t>(seed_in)), threshold(dropout_threshold(p)), inv_keep(1.0 / (1.0 - p)),
        on(p > 0.0) {}
  uint32_t key(const Dims& dims, int64_t b, int64_t h, int64_t i) const {
    return dropout_row_key(seed, static_cast<uint64_t>((b * dims.heads + h) * dims.sq + i));
  }
};

// Unit last stride for the BLAS and the row loops; anything else (rare: a transposed head dim) is
// copied once.
at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

// --- Forward ---------------------------------------------------------------------------------

template <typename T, typename acc_t>
void forward_kernel(const at::Tensor& q_t, const at::Tensor& k_t, const at::Tensor& v_t, const Lengths& lens,
                    const Dims& dims, double scale_in, const Dropout& drop, at::Tensor& out_t, at::Tensor& lse_t) {
  const HeadRows<T> q(q_t), k(k_t), v(v_t);
  T* out = out_t.mutable_data_ptr<T>();            // (B, Sq, H, D) memory
  acc_t* lse = lse_t.mutable_data_ptr<acc_t>();    // (B, H, Sq)
  const int64_t d = dims.d;
  const acc_t scale = static_cast<acc_t>(scale_in);
  const int64_t q_tiles = (dims.sq + kQueryTile - 1) / kQueryTile;
  constexpr bool kWiden = !std::is_same_v<T, acc_t>;
  at::parallel_for(0, dims.batch * dims.heads * q_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s_buf(kQueryTile * kKeyTile), o_buf(kQueryTile * d), m(kQueryTile), l(kQueryTile);
    std::vector<acc_t> q_buf(kWiden ? kQueryTile * d : 0), k_buf(kWiden ? kKeyTile * d : 0),
        v_buf(kWiden ? kKeyTile * d : 0);
    int64_t keys[kQueryTile];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qt = task % q_tiles, bh = task / q_tiles, h = bh % dims.heads, b = bh / dims.heads;
      const int64_t i0 = qt * kQueryTile, nq = std::min(kQueryTile, dims.sq - i0);
      int64_t max_keys = 0;
      for (int64_t r = 0; r < nq; ++r) max_keys = std::max(max_keys, keys[r] = lens.keys(b, i0 + r));
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(l.begin(), l.end(), acc_t(0));
      std::fill(o_buf.begin(), o_buf.end(), acc_t(0));
      const Tile<acc_t> qs = max_keys > 0 ? tile_rows<acc_t>(q, b, h, i0, nq, d, q_buf.data()) : Tile<acc_t>{};
      for (int64_t k0 = 0; k0 < max_keys; k0 += kKeyTile) {
        const int64_t nk = std::min(kKeyTile, max_keys - k0);
        const Tile<acc_t> ks = tile_rows<acc_t>(k, b, h, k0, nk, d, k_buf.data());
        const Tile<acc_t> vs = tile_rows<acc_t>(v, b, h, k0, nk, d, v_buf.data());
        acc_t* s = s_buf.data();
        cpu::gemm(false, true, nq, nk, d, scale, qs.p, qs.ld, ks.p, ks.ld, acc_t(0), s, kKeyTile);
        for (int64_t r = 0; r < nq; ++r) {
          acc_t* sr = s + r * kKeyTile;
          const int64_t n = std::clamp<int64_t>(keys[r] - k0, 0, nk);
          if (n > 0) {
            const acc_t m_new = std::max(m[r], row_max(sr, n));
            const acc_t alpha = std::exp(m[r] - m_new);  // 0 on the row's first tile (m = -inf)
            l[r] = l[r] * alpha + exp_row(sr, n, m_new);
            m[r] = m_new;
            if (alpha != acc_t(1)) scale_row(o_buf.data() + r * d, d, alpha);
            if (drop.on) {
              dropout_row(sr, n, drop.key(dims, b, h, i0 + r), static_cast<uint32_t>(k0), drop.threshold,
                          static_cast<acc_t>(drop.inv_keep));
            }
          }
          std::fill(sr + n, sr + nk, acc_t(0));  // keys this row may not see (or the whole tile)
        }
        cpu::gemm(false, false, nq, d, nk, acc_t(1), s, kKeyTile, vs.p, vs.ld, acc_t(1), o_buf.data(), d);
      }
      for (int64_t r = 0; r < nq; ++r) {
        const int64_t i = i0 + r;
        T* out_row = out + ((b * dims.sq + i) * dims.heads + h) * d;
        acc_t* o = o_buf.data() + r * d;
        if (keys[r] == 0) {  // a padded row attends nothing: zeros, and lse -inf
          cpu::zero_row(out_row, d);
          lse[bh * dims.sq + i] = -std::numeric_limits<acc_t>::infinity();
          continue;
        }
        scale_row(o, d, acc_t(1) / l[r]);
        store_row(o, out_row, d);
        lse[bh * dims.sq + i] = m[r] + std::log(l[r]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> prefix_lm_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                           const at::Tensor& v_in, const at::Tensor& prefix_len,
                                                           const at::Tensor& valid_len, const at::Tensor& q_offset,
                                                           double scale, double dropout_p, int64_t dropout_seed) {
  check_attention_args(q_in, k_in, v_in, prefix_len, valid_len, q_offset, dropout_p);
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const Dims dims{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  const Lengths lens(prefix_len, valid_len, q_offset, dims.batch, dims.sk);
  const bool fp64 = q.scalar_type() == at::kDouble;
  at::Tensor out = cpu::empty_output({dims.batch, dims.sq, dims.heads, dims.d}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({dims.batch, dims.heads, dims.sq}, q.options().dtype(fp64 ? at::kDouble : at::kFloat));
  const Dropout drop(dropout_p, dropout_seed);
  cpu::dispatch_storage_type(q.scalar_type(), kAttentionOp, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_kernel<scalar_t, acc_t>(q, k, v, lens, dims, scale, drop, out, lse);
  });
  return {out, lse};
}

// --- Backward --------------------------------------------------------------------------------

template <typename T, typename acc_t>
void backward_kernel(const at::Tensor& dout_t, const at::Tensor& q_t, const at::Tensor& k_t, const at::Tensor& v_t,
                     const at::Tensor& out_t, const at::Tensor& lse_t, const Lengths& lens, const Dims& dims,
                     double scale_in, const Dropout& drop, at::Tensor& dq_t, at::Tensor& dk_t, at::Tensor& dv_t) {
  const HeadRows<T> q(q_t), k(k_t), v(v_t), out(out_t), dout(dout_t);
  const acc_t* lse = lse_t.const_data_ptr<acc_t>();
  T* dq = dq_t.mutable_data_ptr<T>();  // (B, H, Sq, D), contiguous
  T* dk = dk_t.mutable_data_ptr<T>();  // (B, H, Sk, D), contiguous
  T* dv = dv_t.mutable_data_ptr<T>();
  const int64_t d = dims.d;
  const acc_t scale = static_cast<acc_t>(scale_in);
  constexpr bool kWiden = !std::is_same_v<T, acc_t>;
  // One task per head: its dK and dV accumulate over all of its query tiles without races.
  at::parallel_for(0, dims.batch * dims.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> p_buf(kQueryTile * kKeyTile), dp_buf(kQueryTile * kKeyTile),
        pd_buf(drop.on ? kQueryTile * kKeyTile : 0), dq_buf(kQueryTile * d), delta(kQueryTile), dot_buf(2 * d);
    std::vector<acc_t> q_buf(kWiden ? kQueryTile * d : 0), do_buf(kWiden ? kQueryTile * d : 0),
        k_buf(kWiden ? kKeyTile * d : 0), v_buf(kWiden ? kKeyTile * d : 0);
    std::vector<acc_t> dk_acc, dv_acc;
    int64_t keys[kQueryTile];
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t h = bh % dims.heads, b = bh / dims.heads;
      int64_t head_keys = 0;  // keys any row of the head sees: dK, dV are zero past them
      for (int64_t i = 0; i < dims.sq; ++i) head_keys = std::max(head_keys, lens.keys(b, i));
      dk_acc.assign(head_keys * d, acc_t(0));
      dv_acc.assign(head_keys * d, acc_t(0));
      for (int64_t i0 = 0; i0 < dims.sq; i0 += kQueryTile) {
        const int64_t nq = std::min(kQueryTile, dims.sq - i0);
        int64_t max_keys = 0;
        for (int64_t r = 0; r < nq; ++r) max_keys = std::max(max_keys, keys[r] = lens.keys(b, i0 + r));
        T* dq_rows = dq + (bh * dims.sq + i0) * d;
        if (max_keys == 0) {  // every row padded: no gradient flows
          cpu::zero_row(dq_rows, nq * d);
          continue;
        }
        // delta_i = sum_d dO_i out_i = sum_j P'_ij dP'_ij: the softmax backward's row term.
        for (int64_t r = 0; r < nq; ++r) {
          delta[r] = keys[r] > 0 ? dot_rows(dout.row(b, h, i0 + r), out.row(b, h, i0 + r), d, dot_buf.data()) : 0;
        }
        const Tile<acc_t> qs = tile_rows<acc_t>(q, b, h, i0, nq, d, q_buf.data());
        const Tile<acc_t> dos = tile_rows<acc_t>(dout, b, h, i0, nq, d, do_buf.data());
        const acc_t* lse_rows = lse + bh * dims.sq + i0;
        std::fill(dq_buf.begin(), dq_buf.end(), acc_t(0));
        for (int64_t k0 = 0; k0 < max_keys; k0 += kKeyTile) {
          const int64_t nk = std::min(kKeyTile, max_keys - k0);
          const Tile<acc_t> ks = tile_rows<acc_t>(k, b, h, k0, nk, d, k_buf.data());
          const Tile<acc_t> vs = tile_rows<acc_t>(v, b, h, k0, nk, d, v_buf.data());
          acc_t* p = p_buf.data();
          acc_t* dp = dp_buf.data();
          cpu::gemm(false, true, nq, nk, d, scale, qs.p, qs.ld, ks.p, ks.ld, acc_t(0), p, kKeyTile);
          cpu::gemm(false, true, nq, nk, d, acc_t(1), dos.p, dos.ld, vs.p, vs.ld, acc_t(0), dp, kKeyTile);
          for (int64_t r = 0; r < nq; ++r) {
            acc_t* pr = p + r * kKeyTile;
            const int64_t n = std::clamp<int64_t>(keys[r] - k0, 0, nk);
            if (n > 0) exp_row(pr, n, lse_rows[r]);
            std::fill(pr + n, pr + nk, acc_t(0));
            if (drop.on) {
              const uint32_t key = drop.key(dims, b, h, i0 + r);
              acc_t* pd = pd_buf.data() + r * kKeyTile;
              std::copy(pr, pr + nk, pd);
              dropout_row(pd, n, key, static_cast<uint32_t>(k0), drop.threshold, static_cast<acc_t>(drop.inv_keep));
              dropout_row(dp + r * kKeyTile, n, key, static_cast<uint32_t>(k0), drop.threshold,
                          static_cast<acc_t>(drop.inv_keep));
            }
          }
          const acc_t* pd = drop.on ? pd_buf.data() : p;
          cpu::gemm(true, false, nk, d, nq, acc_t(1), pd, kKeyTile, dos.p, dos.ld, acc_t(1), dv_acc.data() + k0 * d, d);
          for (int64_t r = 0; r < nq; ++r) {  // dS = P (dP - delta), in place of dP
            const acc_t* pr = p + r * kKeyTile;
            acc_t* ds = dp + r * kKeyTile;
            for (int64_t j = 0; j < nk; ++j) ds[j] = pr[j] * (ds[j] - delta[r]);
          }
          cpu::gemm(false, false, nq, d, nk, scale, dp, kKeyTile, ks.p, ks.ld, acc_t(1), dq_buf.data(), d);
          cpu::gemm(true, false, nk, d, nq, scale, dp, kKeyTile, qs.p, qs.ld, acc_t(1), dk_acc.data() + k0 * d, d);
        }
        for (int64_t r = 0; r < nq; ++r) store_row(dq_buf.data() + r * d, dq_rows + r * d, d);
      }
      T* dk_head = dk + bh * dims.sk * d;
      T* dv_head = dv + bh * dims.sk * d;
      for (int64_t j = 0; j < head_keys; ++j) {
        store_row(dk_acc.data() + j * d, dk_head + j * d, d);
        store_row(dv_acc.data() + j * d, dv_head + j * d, d);
      }
      cpu::zero_row(dk_head + head_keys * d, (dims.sk - head_keys) * d);
      cpu::zero_row(dv_head + head_keys * d, (dims.sk - head_keys) * d);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prefix_lm_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, const at::Tensor& prefix_len, const at::Tensor& valid_len,
    const at::Tensor& q_offset, double scale, double dropout_p, int64_t dropout_seed) {
  check_attention_args(q_in, k_in, v_in, prefix_len, valid_len, q_offset, dropout_p);
  TORCH_CHECK(grad_out.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(), kAttentionOp,
              "_backward: grad_out and out must have q's shape ", q_in.sizes(), ", got ", grad_out.sizes(), " and ",
              out_in.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q_in.scalar_type() && out_in.scalar_type() == q_in.scalar_type(),
              kAttentionOp, "_backward: grad_out and out must have q's dtype ", q_in.scalar_type());
  const bool fp64 = q_in.scalar_type() == at::kDouble;
  TORCH_CHECK(lse.scalar_type() == (fp64 ? at::kDouble : at::kFloat) &&
                  lse.sizes() == at::IntArrayRef({q_in.size(0), q_in.size(1), q_in.size(2)}),
              kAttentionOp, "_backward: lse must be (B, H, Sq) ", fp64 ? "float64" : "float32", ", got ", lse.sizes(),
              " ", lse.scalar_type());
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const at::Tensor out = unit_last_stride(out_in), dout = unit_last_stride(grad_out), lse_c = lse.contiguous();
  const Dims dims{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  const Lengths lens(prefix_len, valid_len, q_offset, dims.batch, dims.sk);
  at::Tensor dq = cpu::empty_output(q.sizes(), q.options());
  at::Tensor dk = cpu::empty_output(k.sizes(), k.options());
  at::Tensor dv = cpu::empty_output(v.sizes(), v.options());
  const Dropout drop(dropout_p, dropout_seed);
  cpu::dispatch_storage_type(q.scalar_type(), kAttentionOp, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_kernel<scalar_t, acc_t>(dout, q, k, v, out, lse_c, lens, dims, scale, drop, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace m6

TORCH_LIBRARY_IMPL(m6, CPU, m) {
  m.impl("prefix_lm_attention", &m6::prefix_lm_attention_cpu);
  m.impl("prefix_lm_attention_backward", &m6::prefix_lm_attention_backward_cpu);
}
