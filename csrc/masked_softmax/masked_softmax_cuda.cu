// CUDA kernels of m6::masked_softmax and m6::masked_softmax_backward (schema: csrc/registration.cpp).
//
// Shapes: scores, out, grads (B, H, Sq, Sk) fp32 | fp16 | bf16, contiguous inside the kernels, seen
// as rows = B * H * Sq rows of Sk keys; prefix_len, valid_len, q_offset (B,) int32 | int64 on the
// same device. Row r = ((b * H) + h) * Sq + i is query i of sample b, at absolute position
// q_offset[b] + i; it sees keys [0, n) with n = visible_keys(q_offset[b], i, prefix_len[b],
// valid_len[b]). Keys past n are never read and are written as zeros (padded rows, n = 0, are all
// zeros).
//   forward:  y_j = exp(scale * x_j - m) / sum_{k<n} exp(scale * x_k - m),  m = max_{k<n} scale * x_k
//   backward: dx_j = scale * y_j * (dy_j - sum_{k<n} dy_k * y_k)
// Math in fp32; the 16-bit forwards exponentiate with the hardware 2^x (MUFU.EX2) on logits pre-scaled
// by log2(e), fp32 with a ~1 ulp polynomial (ForwardExp).
//
// Memory access: a row is read and written in chunks of VEC keys aligned to 16 bytes ("A row as 16-byte chunks" below):
// whole chunks move as one 16-byte access, and only a row's first and last chunk go key by key when
// Sk is not a multiple of VEC (the KV-cache decode case, Sk = prefix + t) or the tensor starts off
// a 16-byte boundary. VEC = 1 only when the tensors of one call sit at different offsets from a
// 16-byte boundary (their rows are then never aligned together).
//
// Paths, chosen per call from the chunks per row:
//   forward, row in registers: the row's tx threads hold it, K chunks each; shuffle (+ shared memory)
//               max and sum; read once, one exp per key, written once. softmax_fwd_regs: tx <= 128
//               (rows share 128-thread blocks), up to 32 floats per thread: one warp up to 1024 keys
//               vectorised (256 scalar), 128 threads up to 4096 (1024 scalar). softmax_fwd_regs_wide:
//               one row per block of up to 1024 threads, 16 floats per thread (64 registers): up to
//               16384 keys vectorised, 8192 scalar.
//   forward, row in shared memory: one block per row stages the row's logits (fp32) in dynamic shared
//               memory: read once, one exp per key (in place), written once; rows up to what one block
//               may hold (the device's opt-in limit: 227 KB on H100/H200, ~58000 keys; 163 KB on A100).
//   forward, longer rows: one block per row, streaming. Pass 1 reads the visible keys once, keeping
//               an online (max, sum) per thread (the sum is rescaled only when the max grows); pass 2
//               re-reads them (from L2) and writes: about 2 exps per key.
//   backward, warp path: one warp per row, y and dy held in registers (in their storage type);
//               up to 32 * 8 chunks (2048 fp16/bf16 keys, 1024 fp32, 256 scalar).
//   backward, block path: one block per row, any Sk; pass 1 reduces sum(dy * y), pass 2 re-reads.
#include <ATen/ATen.h>
// Stream from c10 alone: ATen/cuda/CUDAContext.h pulls in cuBLAS and cuSPARSE headers, which a
// bare CUDA toolkit (nvcc + cudart) does not have.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../common/cuda_utils.cuh"
#include "masked_softmax.h"

namespace m6 {
namespace {

using namespace m6::cuda;

constexpr int kMinRowBlockThreads = 128;  // register forward: rows share a block up to this many threads
constexpr int kRowsPerWarpBlock = 4;      // backward warp path: 4 rows (warps) per 128-thread block
constexpr int kWarpMaxK = 8;              // backward warp path: at most 8 vectors per lane
constexpr int kBlockChunksPerThread = 4;  // two-pass block paths: about 4 accesses per thread

// Register forward: at most this many fp32 keys per thread (K * VEC). Rows of up to 128 threads
// share 128-thread blocks of softmax_fwd_regs (launch bounds (128, kNarrowMinBlocks): 128
// registers) and hold 32 keys per thread; longer rows take one block of up to 1024 threads of
// softmax_fwd_regs_wide (64 registers, so 16 keys per thread, ptxas spilled with 32). Scalar
// access keeps K <= 8 in both.
template <int VEC>
constexpr int kRegMaxK = VEC == 1 ? 8 : 32 / VEC;
template <int VEC>
constexpr int kWideMaxK = VEC == 1 ? 8 : 16 / VEC;
constexpr int kNarrowMinBlocks = 4;

// Where row r sits. Passed by value to the kernels. The reciprocals let a kernel find a row's
// sample and query without a 64-bit integer division, which compiles to a subroutine call whose
// stack frame spills registers to local memory (floor_div). Within a row, indices are 32-bit (the
// host refuses Sk past kMaxKeys); only the row's start is computed in 64 bits.
struct RowGeom {
  int64_t rows;             // B * H * Sq
  int64_t rows_per_sample;  // H * Sq
  int64_t sq;
  int64_t batch;
  double inv_rows_per_sample;  // 1 / (H * Sq), 0 when there are no rows
  double inv_sq;               // 1 / Sq, 0 when Sq = 0
  int sk;
  int chunks;  // the most 16-byte chunks any row spans (see "A row as 16-byte chunks"), the plans' unit
};

// Sk bound of the 32-bit indices within a row: a key index plus one block-stride step (at most
// 1024 threads * 8 keys) stays below 2^31.
constexpr int64_t kMaxKeys = int64_t{1} << 30;

// ---- A row as 16-byte chunks.
//
// Chunk c of the row starting at `row` holds keys j0 + e (e < VEC), j0 = c * VEC - lead, where
// lead = (row's address / sizeof(T)) % VEC: chunk boundaries fall on 16-byte boundaries of memory,
// so a chunk wholly inside the keys to touch is one aligned vector access. Only the first chunk
// (keys before 0 when lead > 0) and the last (keys past the end) go element by element. A row
// spans at most ceil((Sk + VEC - 1) / VEC) chunks; with Sk a multiple of VEC and aligned tensors
// lead is 0 for every row and the chunks are exactly Sk / VEC whole vectors.

template <typename T, int VEC>
__device__ __forceinline__ int row_lead(const T* row) {
  return static_cast<int>((reinterpret_cast<uintptr_t>(row) / sizeof(T)) % VEC);
}

template <int VEC>
__device__ __forceinline__ bool whole_chunk(int j0, int end) {
  return j0 >= 0 && j0 + VEC <= end;
}

// Keys j0 .. j0 + VEC - 1 of a row; those outside [0, end) are not read and come back as 0.
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_chunk(const T* __restrict__ row, int j0, int end) {
  if (whole_chunk<VEC>(j0, end)) return load_vec<T, VEC>(row + j0);
  Vec<T, VEC> v;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    v.val[e] = j0 + e >= 0 && j0 + e < end ? row[j0 + e] : static_cast<T>(0.f);
  }
  return v;
}

// Writes the keys of chunk j0 that lie in [0, end).
template <typename T, int VEC>
__device__ __forceinline__ void store_chunk(T* __restrict__ row, int j0, int end, const Vec<T, VEC>& v) {
  if (whole_chunk<VEC>(j0, end)) {
    store_vec<T, VEC>(row + j0, v);
    return;
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    if (j0 + e >= 0 && j0 + e < end) row[j0 + e] = v.val[e];
  }
}

// ---- Length values.
//
// The CPU kernel checks length and offset values on the host. Here that would cost a
// device-to-host copy and a stream synchronisation on every call (and break CUDA-graph capture),
// so the values never reach the host. The kernels read the caller's per-sample tensors directly and
// clamp each value (valid into [0, Sk], prefix into [0, valid], q_offset into [0, valid]: rows at or
// past valid are padding either way), so any value is memory-safe and no position arithmetic can
// overflow; block 0 of each kernel also checks that every value is in range and, if one is not,
// stops the kernel with a device-side assert
// (CUDA_KERNEL_ASSERT_MSG, active in release builds too) reported at the next synchronisation. A
// bad value thus fails loudly rather than silently using another mask, with no allocation and no
// extra launch per call. Like any device-side assert it leaves the CUDA context unusable, the
// contract of torch's own CUDA indexing kernels for an out-of-range index.

// The per-sample tensors as the kernels see them: (B,) int32 or int64 each, contiguous.
struct Lengths {
  const void* prefix;
  const void* valid;
  const void* q_offset;
  bool prefix_is_long;
  bool valid_is_long;
  bool q_offset_is_long;
};

__device__ __forceinline__ int64_t load_length(const void* p, bool is_long, int64_t b) {
  return is_long ? static_cast<const int64_t*>(p)[b] : static_cast<const int32_t*>(p)[b];
}

// floor(a / d) for 0 <= a < 2^52, d >= 1, inv_d = 1 / d rounded: the double product is within
// a * 2^-52 < 1 of a / d, so its truncation is off by at most one, which one comparison corrects.
__device__ __forceinline__ int64_t floor_div(int64_t a, int64_t d, double inv_d) {
  int64_t q = __double2ll_rz(static_cast<double>(a) * inv_d);
  if (q * d > a) {
    --q;
  } else if ((q + 1) * d <= a) {
    ++q;
  }
  return q;
}

__device__ __forceinline__ int64_t row_visible_keys(int64_t row, const RowGeom& g, const Lengths& lens) {
  const int64_t b = floor_div(row, g.rows_per_sample, g.inv_rows_per_sample);
  const int64_t i = row - floor_div(row, g.sq, g.inv_sq) * g.sq;
  const int64_t v = load_length(lens.valid, lens.valid_is_long, b);
  const int64_t p = load_length(lens.prefix, lens.prefix_is_long, b);
  const int64_t o = load_length(lens.q_offset, lens.q_offset_is_long, b);
  const int64_t valid = v < 0 ? 0 : (v > g.sk ? g.sk : v);
  const int64_t prefix = p < 0 ? 0 : (p > valid ? valid : p);
  return visible_keys(o < 0 ? 0 : o, i, prefix, valid);  // in [0, valid]; clamps o to valid itself
}

// Asserts that every length and offset is in range. Every thread of block 0 calls it, before any row.
__device__ __forceinline__ void check_lengths_in_range(const RowGeom& g, const Lengths& lens) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int threads = blockDim.x * blockDim.y;
  int ok = 1;
  // 32-bit loop (B < 2^31, row_geom checks): a 64-bit trip count would be a division subroutine
  // call, and ptxas spills registers around calls.
  for (int b = tid; b < static_cast<int>(g.batch); b += threads) {
    const int64_t p = load_length(lens.prefix, lens.prefix_is_long, b);
    const int64_t v = load_length(lens.valid, lens.valid_is_long, b);
    const int64_t o = load_length(lens.q_offset, lens.q_offset_is_long, b);
    ok &= static_cast<int>(p >= 0 && p <= v && v <= g.sk && o >= 0);  // p >= 0 and p <= v imply v >= 0
  }
  ok = __syncthreads_and(ok);
  CUDA_KERNEL_ASSERT_MSG(ok, "masked_softmax: lengths or q_offset out of range: need 0 <= prefix_len <= "
                             "valid_len <= Sk and q_offset >= 0 for every sample");
}

// ---- Forward.

// How a dtype's forward exponentiates. fp32: logits scale * x, exp to about 1 ulp (AccurateExp, a
// polynomial on the FMA pipe). 16-bit types: logits pre-scaled by log2(e) (the host passes
// scale * log2(e)), so the exp is one hardware 2^x (HardwareExp2, MUFU.EX2): a 16-bit output
// cannot tell the two apart, and the polynomial's ~20 instructions per key would make the kernel
// issue-bound instead of bandwidth-bound.
template <typename T>
struct ForwardExp {
  using Exp = HardwareExp2;
  static constexpr double kLogitScale = 1.4426950408889634;  // log2(e)
};
template <>
struct ForwardExp<float> {
  using Exp = AccurateExp;
  static constexpr double kLogitScale = 1.0;
};

// scale * x rounded to fp32, never contracted into an FMA with what follows (--use_fast_math
// allows that): every pass of a kernel then sees the same logits, so the numerators and the sum
// of the two-pass path agree.
template <typename T>
__device__ __forceinline__ float scaled(T x, float scale) {
  return __fmul_rn(static_cast<float>(x), scale);
}

// The logits of chunk j0 (keys in [0, n) visible), -inf for the others.
template <typename T, int VEC>
__device__ __forceinline__ void chunk_logits(const T* __restrict__ row, int j0, int n, float scale,
                                             float (&v)[VEC]) {
  const Vec<T, VEC> raw = load_chunk<T, VEC>(row, j0, n);
#pragma unroll
  for (int e = 0; e < VEC; ++e) v[e] = j0 + e >= 0 && j0 + e < n ? scaled(raw.val[e], scale) : -INFINITY;
}

// y = p * inv on the visible keys of chunk j0, exactly 0 on the others (whatever p and inv hold
// there: a NaN sum must not reach masked keys), written where the row has keys.
template <typename T, int VEC>
__device__ __forceinline__ void store_probabilities(T* __restrict__ row, int j0, int n, int sk,
                                                    const float (&p)[VEC], float inv) {
  Vec<T, VEC> out;
#pragma unroll
  for (int e = 0; e < VEC; ++e) out.val[e] = static_cast<T>(j0 + e >= 0 && j0 + e < n ? p[e] * inv : 0.f);
  store_chunk<T, VEC>(row, j0, sk, out);
}

// Block (tx, ty): ty rows per block, the tx threads of threadIdx.y (whole warps) on one row; thread
// t holds chunks k * tx + t (k < K) of the row, so tx * K >= chunks. The row loop has a
// block-uniform bound, so every thread reaches group_allreduce's barriers; a row past the end
// (row >= rows) takes part with n = 0 and writes nothing.
template <typename T, int VEC, int K>
__device__ __forceinline__ void softmax_rows_in_registers(const T* __restrict__ x, T* __restrict__ y,
                                                          const Lengths& lens, const RowGeom& g, float scale) {
  using Exp = typename ForwardExp<T>::Exp;
  if (blockIdx.x == 0) check_lengths_in_range(g, lens);
  __shared__ float smem[kMaxWarps];
  const int tx = blockDim.x;
  const int64_t rows_per_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < g.rows; base += rows_per_step) {
    const int64_t row = base + threadIdx.y;
    const bool active = row < g.rows;
    const int n = active ? static_cast<int>(row_visible_keys(row, g, lens)) : 0;
    const T* xr = x + (active ? row : 0) * g.sk;
    const int lead = row_lead<T, VEC>(xr);  // y's rows share it (the host checks)
    float v[K][VEC];
    float row_max = -INFINITY;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j0 = (k * tx + static_cast<int>(threadIdx.x)) * VEC - lead;
      if (j0 < n) {
        chunk_logits<T, VEC>(xr, j0, n, scale, v[k]);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[k][e] = -INFINITY;
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) row_max = fmaxf(row_max, v[k][e]);
    }
    row_max = group_allreduce(row_max, MaxOp{}, smem);
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j0 = (k * tx + static_cast<int>(threadIdx.x)) * VEC - lead;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        // Masked keys add 0; a visible -inf key of an all -inf row gives NaN, as torch's softmax.
        v[k][e] = j0 + e >= 0 && j0 + e < n ? Exp{}(v[k][e] - row_max) : 0.f;
        sum += v[k][e];
      }
    }
    sum = group_allreduce(sum, SumOp{}, smem);
    if (!active) continue;  // no barrier follows in this iteration
    T* yr = y + row * g.sk;
    const float inv = n > 0 ? __frcp_rn(sum) : 0.f;  // IEEE 1/x: fast math would approximate 1.f / x
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j0 = (k * tx + static_cast<int>(threadIdx.x)) * VEC - lead;
      if (j0 < g.sk) store_probabilities<T, VEC>(yr, j0, n, g.sk, v[k], inv);
    }
  }
}

// Rows of 32 to 128 threads, 128 / tx rows per 128-thread block.
template <typename T, int VEC, int K>
__global__ void __launch_bounds__(kMinRowBlockThreads, kNarrowMinBlocks)
softmax_fwd_regs(const T* __restrict__ x, T* __restrict__ y, Lengths lens, RowGeom g, float scale) {
  softmax_rows_in_registers<T, VEC, K>(x, y, lens, g, scale);
}

// Rows of more than 128 threads (up to 1024), one per block.
template <typename T, int VEC, int K>
__global__ void __launch_bounds__(kMaxThreads)
softmax_fwd_regs_wide(const T* __restrict__ x, T* __restrict__ y, Lengths lens, RowGeom g, float scale) {
  static_assert(K <= kWideMaxK<VEC>, "a 1024-thread block has 64 registers per thread");
  softmax_rows_in_registers<T, VEC, K>(x, y, lens, g, scale);
}

// Shared-memory staging of a row's fp32 values, VEC per chunk, as VEC / W planes of W-float
// vectors: value e of chunk c is lane e % W of vector (e / W) * chunks + c. Consecutive threads
// hold consecutive chunks, so each plane's accesses are conflict-free 4W-byte accesses.
template <int VEC>
struct RowStage {
  static constexpr int W = VEC % 4 == 0 ? 4 : 1;
  float* base;
  int chunks;

  __device__ __forceinline__ void store(int c, const float (&v)[VEC]) const {
#pragma unroll
    for (int q = 0; q < VEC / W; ++q) {
      Vec<float, W> w;
#pragma unroll
      for (int e = 0; e < W; ++e) w.val[e] = v[q * W + e];
      reinterpret_cast<Vec<float, W>*>(base)[q * chunks + c] = w;
    }
  }
  __device__ __forceinline__ void load(int c, float (&v)[VEC]) const {
#pragma unroll
    for (int q = 0; q < VEC / W; ++q) {
      const Vec<float, W> w = reinterpret_cast<const Vec<float, W>*>(base)[q * chunks + c];
#pragma unroll
      for (int e = 0; e < W; ++e) v[q * W + e] = w.val[e];
    }
  }
};

constexpr int kStageBatch = 4;  // chunks a thread loads before it uses the first: loads in flight

// One row per block; every thread touches only its own chunks c = threadIdx.x + i * blockDim.x of
// the staging area, so the two reductions are the only barriers. Dynamic shared memory: g.chunks *
// VEC floats.
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
softmax_fwd_smem(const T* __restrict__ x, T* __restrict__ y, Lengths lens, RowGeom g, float scale) {
  using Exp = typename ForwardExp<T>::Exp;
  if (blockIdx.x == 0) check_lengths_in_range(g, lens);
  extern __shared__ float4 stage_memory[];  // float4: 16-byte aligned
  __shared__ float smem[kMaxWarps];
  const RowStage<VEC> stage{reinterpret_cast<float*>(stage_memory), g.chunks};
  const int step = blockDim.x;
  for (int64_t row = blockIdx.x; row < g.rows; row += gridDim.x) {  // block-uniform
    const int n = static_cast<int>(row_visible_keys(row, g, lens));
    const T* xr = x + row * g.sk;
    const int lead = row_lead<T, VEC>(xr);
    const int visible_chunks = (n + lead + VEC - 1) / VEC;  // chunks with a visible key
    float row_max = -INFINITY;
    for (int c0 = threadIdx.x; c0 < visible_chunks; c0 += kStageBatch * step) {
      float v[kStageBatch][VEC];
#pragma unroll
      for (int b = 0; b < kStageBatch; ++b) {  // all loads first
        const int c = c0 + b * step;
        if (c < visible_chunks) chunk_logits<T, VEC>(xr, c * VEC - lead, n, scale, v[b]);
      }
#pragma unroll
      for (int b = 0; b < kStageBatch; ++b) {
        const int c = c0 + b * step;
        if (c < visible_chunks) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) row_max = fmaxf(row_max, v[b][e]);
          stage.store(c, v[b]);
        }
      }
    }
    row_max = group_allreduce(row_max, MaxOp{}, smem);
    float sum = 0.f;
    for (int c = threadIdx.x; c < visible_chunks; c += step) {
      const int j0 = c * VEC - lead;
      float v[VEC];
      stage.load(c, v);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        v[e] = j0 + e >= 0 && j0 + e < n ? Exp{}(v[e] - row_max) : 0.f;
        sum += v[e];
      }
      stage.store(c, v);
    }
    sum = group_allreduce(sum, SumOp{}, smem);
    const float inv = n > 0 ? __frcp_rn(sum) : 0.f;
    T* yr = y + row * g.sk;
    const int row_chunks = (g.sk + lead + VEC - 1) / VEC;
    for (int c = threadIdx.x; c < row_chunks; c += step) {
      float p[VEC] = {};
      if (c < visible_chunks) stage.load(c, p);
      store_probabilities<T, VEC>(yr, c * VEC - lead, n, g.sk, p, inv);
    }
  }
}

// Rows past shared memory: pass 1 keeps a per-thread online (max, sum), pass 2 re-reads the row.
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
softmax_fwd_block(const T* __restrict__ x, T* __restrict__ y, Lengths lens, RowGeom g, float scale) {
  using Exp = typename ForwardExp<T>::Exp;
  if (blockIdx.x == 0) check_lengths_in_range(g, lens);
  __shared__ MaxSum smem[kMaxWarps];
  for (int64_t row = blockIdx.x; row < g.rows; row += gridDim.x) {  // block-uniform
    const int n = static_cast<int>(row_visible_keys(row, g, lens));
    const T* xr = x + row * g.sk;
    T* yr = y + row * g.sk;
    const int lead = row_lead<T, VEC>(xr);
    MaxSum acc{-INFINITY, 0.f};
    for (int j0 = static_cast<int>(threadIdx.x) * VEC - lead; j0 < n; j0 += blockDim.x * VEC) {
      float v[VEC];
      chunk_logits<T, VEC>(xr, j0, n, scale, v);
      float chunk_max = -INFINITY;
#pragma unroll
      for (int e = 0; e < VEC; ++e) chunk_max = fmaxf(chunk_max, v[e]);
      // One exp per key; the running sum is rescaled only when the max grows (rarely, after the
      // first chunks). Masked keys (-inf) add 0, also while the max is still -inf.
      // (Exp(-inf - chunk_max) = 0 while nothing finite was seen; a NaN sum stays NaN.)
      if (chunk_max > acc.max) {
        acc.sum *= Exp{}(acc.max - chunk_max);
        acc.max = chunk_max;
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc.sum += v[e] == -INFINITY ? 0.f : Exp{}(v[e] - acc.max);
    }
    acc = group_allreduce(acc, MaxSumOp<Exp>{}, smem);
    const float inv = n > 0 ? __frcp_rn(acc.sum) : 0.f;
    for (int j0 = static_cast<int>(threadIdx.x) * VEC - lead; j0 < g.sk; j0 += blockDim.x * VEC) {
      float p[VEC] = {};
      if (j0 < n) {
        chunk_logits<T, VEC>(xr, j0, n, scale, p);
#pragma unroll
        for (int e = 0; e < VEC; ++e) p[e] = Exp{}(p[e] - acc.max);
      }
      store_probabilities<T, VEC>(yr, j0, n, g.sk, p, inv);
    }
  }
}

// ---- Backward.

template <typename T, int VEC, int K>
__global__ void __launch_bounds__(kWarpSize * kRowsPerWarpBlock)
softmax_bwd_warp(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx,
                 Lengths lens, RowGeom g, float scale) {
  if (blockIdx.x == 0) check_lengths_in_range(g, lens);
  const int lane = threadIdx.x % kWarpSize;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kRowsPerWarpBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerWarpBlock + threadIdx.x / kWarpSize;
       row < g.rows; row += step) {  // warp-uniform
    const int n = static_cast<int>(row_visible_keys(row, g, lens));
    const T* yr = y + row * g.sk;
    const T* dyr = dy + row * g.sk;
    T* dxr = dx + row * g.sk;
    const int lead = row_lead<T, VEC>(yr);  // dy's and dx's rows share it (the host checks)
    // Held in the storage type: half the registers of fp32 copies for 16-bit inputs.
    Vec<T, VEC> yv[K] = {};
    Vec<T, VEC> gv[K] = {};
    float dot = 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j0 = (k * kWarpSize + lane) * VEC - lead;
      if (j0 < n) {
        if (whole_chunk<VEC>(j0, n)) {
          yv[k] = load_vec<T, VEC>(yr + j0);
          gv[k] = load_vec<T, VEC>(dyr + j0);
        } else {  // the row's first or last chunk: keys outside [0, n) stay 0 and add nothing
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            if (j0 + e >= 0 && j0 + e < n) {
              yv[k].val[e] = yr[j0 + e];
              gv[k].val[e] = dyr[j0 + e];
            }
          }
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) dot += static_cast<float>(yv[k].val[e]) * static_cast<float>(gv[k].val[e]);
      }
    }
    dot = warp_allreduce(dot, SumOp{});
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j0 = (k * kWarpSize + lane) * VEC - lead;
      if (j0 < g.sk) {
        Vec<T, VEC> out;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float yf = static_cast<float>(yv[k].val[e]);
          const float d = scale * yf * (static_cast<float>(gv[k].val[e]) - dot);
          out.val[e] = static_cast<T>(j0 + e >= 0 && j0 + e < n ? d : 0.f);
        }
        store_chunk<T, VEC>(dxr, j0, g.sk, out);
      }
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
softmax_bwd_block(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx,
                  Lengths lens, RowGeom g, float scale) {
  if (blockIdx.x == 0) check_lengths_in_range(g, lens);
  __shared__ float smem[kMaxWarps];
  for (int64_t row = blockIdx.x; row < g.rows; row += gridDim.x) {  // block-uniform
    const int n = static_cast<int>(row_visible_keys(row, g, lens));
    const int64_t offset = row * g.sk;
    const int lead = row_lead<T, VEC>(y + offset);
    float dot = 0.f;
    for (int j0 = static_cast<int>(threadIdx.x) * VEC - lead; j0 < n; j0 += blockDim.x * VEC) {
      const Vec<T, VEC> yv = load_chunk<T, VEC>(y + offset, j0, n);
      const Vec<T, VEC> gv = load_chunk<T, VEC>(dy + offset, j0, n);
#pragma unroll
      for (int e = 0; e < VEC; ++e) dot += static_cast<float>(yv.val[e]) * static_cast<float>(gv.val[e]);
    }
    dot = group_allreduce(dot, SumOp{}, smem);
    for (int j0 = static_cast<int>(threadIdx.x) * VEC - lead; j0 < g.sk; j0 += blockDim.x * VEC) {
      Vec<T, VEC> yv{}, gv{};
      if (j0 < n) {
        yv = load_chunk<T, VEC>(y + offset, j0, n);
        gv = load_chunk<T, VEC>(dy + offset, j0, n);
      }
      Vec<T, VEC> out;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float d = scale * static_cast<float>(yv.val[e]) * (static_cast<float>(gv.val[e]) - dot);
        out.val[e] = static_cast<T>(j0 + e >= 0 && j0 + e < n ? d : 0.f);
      }
      store_chunk<T, VEC>(dx + offset, j0, g.sk, out);
    }
  }
}

// ---- Launch.

// Backward: calls f(std::integral_constant<int, K>{}) with the smallest K in {1, 2, 4, 8} such
// that K chunks per lane cover the row; false when the row is too long for the warp path.
template <typename F>
bool with_warp_k(int64_t chunks, F&& f) {
  const int64_t per_lane = ceil_div(chunks, kWarpSize);
  static_assert(kWarpMaxK == 8, "the cases below go up to K = 8");
  if (per_lane <= 1) f(std::integral_constant<int, 1>{});
  else if (per_lane <= 2) f(std::integral_constant<int, 2>{});
  else if (per_lane <= 4) f(std::integral_constant<int, 4>{});
  else if (per_lane <= 8) f(std::integral_constant<int, 8>{});
  else return false;
  return true;
}

// Calls f(std::integral_constant<int, K>{}, wide, tx) for the register forward, whose rows of
// `chunks` chunks are held by tx threads with K chunks each: one warp (tx = 32) with the smallest K
// that covers the row; past kRegMaxK, K = kRegMaxK and the fewest whole warps that do, up to 128
// threads (wide = false_type: softmax_fwd_regs); beyond, K = kWideMaxK and up to 1024 threads
// (wide = true_type: softmax_fwd_regs_wide). False when even that does not cover the row.
template <int VEC, int K = 1, typename F>
bool with_register_plan(int64_t chunks, F&& f) {
  if (chunks <= int64_t{kWarpSize} * K) {
    f(std::integral_constant<int, K>{}, std::false_type{}, kWarpSize);
    return true;
  }
  if constexpr (K < kRegMaxK<VEC>) {
    return with_register_plan<VEC, 2 * K>(chunks, f);
  } else {
    const int64_t tx = round_up(ceil_div(chunks, K), kWarpSize);
    if (tx <= kMinRowBlockThreads) {
      f(std::integral_constant<int, K>{}, std::false_type{}, static_cast<int>(tx));
      return true;
    }
    constexpr int kWide = kWideMaxK<VEC>;
    const int64_t wide_tx = round_up(ceil_div(chunks, kWide), kWarpSize);
    if (wide_tx > kMaxThreads) return false;
    f(std::integral_constant<int, kWide>{}, std::true_type{}, static_cast<int>(wide_tx));
    return true;
  }
}

// Launches softmax_fwd_smem when a row's staging area fits in one block's shared memory on this
// device (beyond the 48 KB default, the kernel opts in, as CUDA requires); false when it does not.
template <typename T, int VEC>
bool launch_staged_forward(const T* x, T* y, const Lengths& lens, const RowGeom& g, float scale,
                           cudaStream_t stream) {
  const int64_t bytes = int64_t{g.chunks} * VEC * static_cast<int64_t>(sizeof(float));
  int device = 0;
  int optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  constexpr int64_t kStaticBytes = kMaxWarps * sizeof(float);  // the kernel's reduction buffer
  if (bytes + kStaticBytes > optin) return false;
  constexpr int64_t kDefaultBytes = 48 * 1024;  // what a launch may use without opting in
  if (bytes > kDefaultBytes) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(softmax_fwd_smem<T, VEC>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
  const int threads = threads_per_row(g.chunks, kBlockChunksPerThread);
  softmax_fwd_smem<T, VEC><<<grid_size(g.rows), threads, static_cast<size_t>(bytes), stream>>>(x, y, lens, g, scale);
  return true;
}

template <typename T, int VEC>
void forward_rows(const T* x, T* y, const Lengths& lens, const RowGeom& g, float scale,
                  cudaStream_t stream) {
  const bool in_registers = with_register_plan<VEC>(g.chunks, [&](auto k, auto wide, int tx) {
    constexpr int K = decltype(k)::value;
    if constexpr (decltype(wide)::value) {
      softmax_fwd_regs_wide<T, VEC, K><<<grid_size(g.rows), tx, 0, stream>>>(x, y, lens, g, scale);
    } else {
      const int ty = kMinRowBlockThreads / tx;  // rows per 128-thread block
      softmax_fwd_regs<T, VEC, K><<<grid_size(ceil_div(g.rows, ty)), dim3(tx, ty), 0, stream>>>(
          x, y, lens, g, scale);
    }
  });
  if (!in_registers && !launch_staged_forward<T, VEC>(x, y, lens, g, scale, stream)) {
    const int threads = threads_per_row(g.chunks, kBlockChunksPerThread);
    softmax_fwd_block<T, VEC><<<grid_size(g.rows), threads, 0, stream>>>(x, y, lens, g, scale);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC>
void backward_rows(const T* dy, const T* y, T* dx, const Lengths& lens, const RowGeom& g,
                   float scale, cudaStream_t stream) {
  const bool warp = with_warp_k(g.chunks, [&](auto k) {
    softmax_bwd_warp<T, VEC, decltype(k)::value>
        <<<grid_size(ceil_div(g.rows, kRowsPerWarpBlock)), kWarpSize * kRowsPerWarpBlock, 0, stream>>>(
            dy, y, dx, lens, g, scale);
  });
  if (!warp) {
    const int threads = threads_per_row(g.chunks, kBlockChunksPerThread);
    softmax_bwd_block<T, VEC><<<grid_size(g.rows), threads, 0, stream>>>(dy, y, dx, lens, g, scale);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// True when the pointers all sit at the same offset from a 16-byte boundary: then every row starts
// equally misaligned in each tensor, and its chunks are aligned in all of them.
inline bool same_alignment(std::initializer_list<const void*> ptrs) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(*ptrs.begin()) % 16;
  return std::all_of(ptrs.begin(), ptrs.end(),
                     [first](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == first; });
}

// The most chunks of VEC keys a row of the tensor at `base` spans ("A row as 16-byte chunks").
template <typename T, int VEC>
int chunks_per_row(int64_t sk, const void* base) {
  const int64_t base_lead = static_cast<int64_t>(reinterpret_cast<uintptr_t>(base) / sizeof(T)) % VEC;
  const int64_t lead = sk % VEC == 0 ? base_lead : VEC - 1;  // every row's lead, or the worst one
  return static_cast<int>(ceil_div(sk + lead, VEC));
}

// Runs f(std::integral_constant<int, VEC>{}) with VEC = 16 bytes of T when the pointers allow it,
// else 1, after filling in the chunk count of that width.
template <typename T, typename F>
void with_vector_width(RowGeom& g, std::initializer_list<const void*> ptrs, F&& f) {
  if (same_alignment(ptrs)) {
    g.chunks = chunks_per_row<T, kVec16<T>>(g.sk, *ptrs.begin());
    f(std::integral_constant<int, kVec16<T>>{});
  } else {
    g.chunks = g.sk;
    f(std::integral_constant<int, 1>{});
  }
}

RowGeom row_geom(const at::Tensor& t) {  // t (B, H, Sq, Sk)
  TORCH_CHECK(t.size(0) < INT_MAX, "masked_softmax: B = ", t.size(0), " samples is more than the CUDA kernels "
              "index (", INT_MAX - 1, ")");
  TORCH_CHECK(t.size(3) <= kMaxKeys, "masked_softmax: Sk = ", t.size(3), " keys per row is more than the CUDA "
              "kernels index (", kMaxKeys, ")");
  const int64_t rows_per_sample = t.size(1) * t.size(2);
  const auto inverse = [](int64_t d) { return d > 0 ? 1.0 / static_cast<double>(d) : 0.0; };
  return RowGeom{t.size(0) * rows_per_sample, rows_per_sample, t.size(2), t.size(0),
                 inverse(rows_per_sample), inverse(t.size(2)), static_cast<int>(t.size(3)), 0};
}

// The caller's per-sample tensors as the kernels read them (contiguous (B,): no copy when they are).
struct DeviceLengths {
  at::Tensor prefix, valid, q_offset;

  DeviceLengths(const at::Tensor& prefix_len, const at::Tensor& valid_len, const at::Tensor& q_offset_in)
      : prefix(prefix_len.contiguous()), valid(valid_len.contiguous()), q_offset(q_offset_in.contiguous()) {}

  Lengths view() const {
    return Lengths{prefix.const_data_ptr(), valid.const_data_ptr(), q_offset.const_data_ptr(),
                   prefix.scalar_type() == at::kLong, valid.scalar_type() == at::kLong,
                   q_offset.scalar_type() == at::kLong};
  }
};

at::Tensor masked_softmax_cuda(const at::Tensor& scores, const at::Tensor& prefix_len,
                               const at::Tensor& valid_len, double scale, const at::Tensor& q_offset) {
  check_masked_softmax_args(scores, prefix_len, valid_len, q_offset, "scores");
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor x = scores.contiguous();            // (B, H, Sq, Sk)
  at::Tensor out = at::empty(x.sizes(), x.options());  // (B, H, Sq, Sk)
  if (x.size(0) == 0) return out;                      // no sample, no lengths
  const DeviceLengths lengths(prefix_len, valid_len, q_offset);
  const Lengths lens = lengths.view();
  RowGeom g = row_geom(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Launched even when there are no rows (H, Sq or Sk of 0): block 0 still checks the lengths.
  M6_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "masked_softmax", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    const float s = static_cast<float>(scale * ForwardExp<scalar_t>::kLogitScale);
    with_vector_width<scalar_t>(g, {xp, yp}, [&](auto vec) {
      forward_rows<scalar_t, decltype(vec)::value>(xp, yp, lens, g, s, stream);
    });
  });
  return out;
}

at::Tensor masked_softmax_backward_cuda(const at::Tensor& grad_out, const at::Tensor& out,
                                        const at::Tensor& prefix_len, const at::Tensor& valid_len,
                                        double scale, const at::Tensor& q_offset) {
  check_masked_softmax_backward_args(grad_out, out);
  check_masked_softmax_args(out, prefix_len, valid_len, q_offset, "out");
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor dy = grad_out.contiguous();        // (B, H, Sq, Sk)
  const at::Tensor y = out.contiguous();              // (B, H, Sq, Sk)
  at::Tensor dx = at::empty(y.sizes(), y.options());  // (B, H, Sq, Sk)
  if (y.size(0) == 0) return dx;                      // no sample, no lengths
  const DeviceLengths lengths(prefix_len, valid_len, q_offset);
  const Lengths lens = lengths.view();
  RowGeom g = row_geom(y);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  M6_DISPATCH_FLOAT_HALF_BF16(y.scalar_type(), "masked_softmax_backward", [&] {
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    const float s = static_cast<float>(scale);
    with_vector_width<scalar_t>(g, {yp, dyp, dxp}, [&](auto vec) {
      backward_rows<scalar_t, decltype(vec)::value>(dyp, yp, dxp, lens, g, s, stream);
    });
  });
  return dx;
}

}  // namespace
}  // namespace m6

TORCH_LIBRARY_IMPL(m6, CUDA, m) {
  m.impl("masked_softmax", &m6::masked_softmax_cuda);
  m.impl("masked_softmax_backward", &m6::masked_softmax_backward_cuda);
}
