// CUDA kernels of m6::layer_norm and m6::layer_norm_backward (schema: csrc/registration.cpp).
//
// Shapes: x, y, grad_y, grad_x (rows, N) contiguous inside the kernels (x's leading dims flattened),
// fp32 | fp16 | bf16; weight, bias, grad_weight, grad_bias (N,) in x's dtype; mean, rstd (rows,) fp32.
//   forward:  mean, var over the row in fp32; rstd = 1 / sqrt(var + eps);
//             y = (x - mean) * rstd * weight + bias
//   backward: xhat = (x - mean) * rstd, g = grad_y * weight;
//             grad_x = rstd * (g - mean(g) - xhat * mean(g * xhat))
//             grad_weight = sum_rows(grad_y * xhat), grad_bias = sum_rows(grad_y)
// Access: VEC = 16 bytes of T (4 fp32, 8 fp16 / bf16) per load and store when the op's row pointers
// (x, weight, bias, y; or grad_y, x, weight, grad_x) are 16-byte aligned and N % VEC == 0
// ("vectorised"), else one element ("scalar"). B = sizeof(T); "DRAM" counts each tensor once.
//
// Register paths (vectorised; forward N <= 1024 * 4 * VEC: 32768 16-bit, 16384 fp32; backward
// N <= 256 * 4 * VEC: 8192 16-bit, 4096 fp32). A row group of tpr threads holds one row in registers,
// kRegVecs = 4 vectors per thread: vector c of the row is thread c % tpr's. tpr is the least power
// of two >= 32 with tpr * 4 * VEC >= N (a template parameter: the vectors' offsets are immediates);
// the block is 128 threads (128 / tpr row groups) up to tpr = 128; past that the forward's block is
// 1024 threads (1024 / tpr row groups) and the backward's one row group of 256.
//   forward:  x read once into registers; mean = sum / N, then var = sum((x - mean)^2) / N over the
//             registers (the exact two-pass, at least as accurate as Welford); y written once.
//             DRAM 2B per element (x in, y out); weight and bias come from L1 / L2 for every row.
//   backward: block b reduces chunk b, a fixed range of rows (below), holding weight in registers for
//             the chunk. Per row: dy and x read once (the row group's next row is loaded while this
//             one is reduced), one all-reduce of (sum g, sum g * xhat), grad_x written once. The
//             chunk's sums of dy * xhat and dy accumulate per column in registers; at the end the
//             block adds its row groups' sums in shared memory, in group order, and writes them to
//             the fp32 workspace part (2, chunks, N). DRAM 3B per element, plus 8 bytes per column
//             and chunk, written here and read by stage 2 (chunks hold >= 16 rows: <= 0.5 byte per
//             element each way).
// Loop paths (every other N <= 65536 and alignment): a row group of up to 512 threads loops over the
// row, about 4 accesses per thread and pass, several rows per 512-thread block for short rows.
//   forward:  pass 1 Welford states, merged across the group; pass 2 re-reads x (from L1 / L2) and
//             writes y. DRAM 2B per element when the re-read hits the cache, 3B else.
//   backward: grad_x alike (pass 1 sums, pass 2 re-reads dy and x, writes grad_x: 3B to 5B); then
//             stage 1, blocks of 32 columns x one chunk, re-reads dy and x (2B more) and writes the
//             same workspace as the register path.
// Stage 2 (both paths): per column, the sum of the chunks' partials in a fixed order, cast to T.
// Before this layout (one kernel shape for every N): forward 2B DRAM + a second pass over x from
// cache; backward grad_x two passes (3B to 5B) + stage 1 (2B) = 5B to 7B per element.
//
// Determinism: the chunks depend on (rows, N) alone (rows_per_chunk below), the path and block shape
// on (N, dtype, alignment), so every sum is formed in one order that no device property (SM count)
// or launch size changes: grad_weight and grad_bias are bit-identical across runs and GPUs. No
// atomics. The workspace is the one allocation per backward call besides the outputs (the caching
// allocator's: no cudaMalloc once warm); the forward allocates only its outputs. No assert kernels.
#include <ATen/ATen.h>
// Stream and device from c10 alone: ATen/cuda/CUDAContext.h pulls in cuBLAS and cuSPARSE headers,
// which a bare CUDA toolkit (nvcc + cudart) does not have.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../common/cuda_utils.cuh"
#include "layer_norm.h"

namespace m6 {
namespace {

using namespace m6::cuda;

// Register paths.
constexpr int kRegVecs = 4;              // 16-byte vectors per thread and row
constexpr int kRegBlock = 128;           // block size while row groups share a block (tpr <= 128)
constexpr int kFwdRegMaxThreads = 1024;  // forward: widest row group
constexpr int kBwdRegMaxThreads = 256;   // backward: widest row group (its per-column sums fill registers)
// Loop paths.
constexpr int kLoopThreads = 512;       // block size
constexpr int kLoopChunksPerThread = 4;  // accesses per thread and pass, about
// grad_weight / grad_bias.
constexpr int64_t kChunkMinRows = 16;  // rows per chunk, at least: partials stay <= 1/16 row per row
constexpr int64_t kMaxChunks = 512;    // chunks, at most (stage 2's work and the workspace stay small)
constexpr int64_t kMaxPartials = int64_t{1} << 23;  // chunks * N, at most: <= 64 MiB of workspace
constexpr int kColTile = 32;           // stage 1 and 2: columns per block (one per lane)
constexpr int kColRows = 8;            // stage 1: rows in flight per block
constexpr int kFinalLanes = 32;        // stage 2: threads per column, each summing every 32nd chunk

// Launch bounds of the register kernels. Each kernel family has one block size and one minBlocks
// (tests/test_sass.py's MIN_BLOCKS is per family), so the narrow and wide row groups are separate
// kernels sharing one body:
//   forward, kTpr <= 128: layer_norm_fwd_regs_kernel, 128 threads, 8 blocks per SM (<= 64 registers);
//   forward, kTpr >= 256: layer_norm_fwd_regs_wide_kernel, 1024 threads (1024 / kTpr rows), 1 block
//     per SM (<= 64 registers as well);
//   backward, kTpr <= 128: layer_norm_bwd_regs_kernel, 128 threads, 3 blocks per SM (<= 170
//     registers: the row in flight, the next row and the per-column sums);
//   backward, kTpr == 256: layer_norm_bwd_regs_wide_kernel, 256 threads, 1 block per SM.
constexpr int kFwdRegMinBlocks = 8;
constexpr int kFwdWideThreads = kMaxThreads;
constexpr int kBwdRegMinBlocks = 3;
template <int kTpr>
constexpr int kFwdRegThreads = kTpr > kRegBlock ? kFwdWideThreads : kRegBlock;
template <int kTpr>
constexpr int kBwdRegThreads = kTpr > kRegBlock ? kTpr : kRegBlock;

template <typename T>
using Vec16 = Vec<T, kVec16<T>>;

// ---- Register-path helpers. The thread owns vectors threadIdx.x + k * kTpr (k < K) of its row
// group's row; `nvec` is the row's length in vectors. kTpr (== blockDim.x) is a template parameter
// so that the K vectors' offsets are immediates of one address, not K address registers.

template <int kTpr>
__device__ __forceinline__ bool owns(int k, int nvec) {
  return static_cast<int>(threadIdx.x) + k * kTpr < nvec;
}

// The thread's vectors of the row at p. Vectors it does not own are left as they are.
template <int kTpr, typename T, int K>
__device__ __forceinline__ void load_own(Vec16<T> (&v)[K], const T* p, int nvec) {
  p += threadIdx.x * kVec16<T>;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (owns<kTpr>(k, nvec)) v[k] = load_vec<T, kVec16<T>>(p + k * kTpr * kVec16<T>);
  }
}

// Makes the registers of v opaque to the compiler, so that a later use converts them afresh instead
// of reusing fp32 values computed from them earlier: those would stay live across the row's
// all-reduce, at twice the registers of 16-bit storage (and spill).
template <typename T>
__device__ __forceinline__ void launder(Vec16<T>& v) {
  uint4 u;
  memcpy(&u, &v, sizeof(u));
  asm volatile("" : "+r"(u.x), "+r"(u.y), "+r"(u.z), "+r"(u.w));
  memcpy(&v, &u, sizeof(u));
}

template <typename T, int K>
__device__ __forceinline__ void launder(Vec16<T> (&v)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k) launder<T>(v[k]);
}

// All-reduce over each row group of kTpr threads (threadIdx.y's), as group_allreduce but with the
// group's warp count known at compile time: a one-warp group has no shared-memory step, a wider
// one merges its kTpr / 32 warp results in warp order. Every lane gets the same bits. `smem` holds
// kMaxWarps values; with kTpr > 32 it has barriers, and every thread of the block must call it.
template <int kTpr, typename V, typename Op>
__device__ __forceinline__ V row_allreduce(V v, Op op, V* smem) {
  constexpr int kWarps = kTpr / kWarpSize;
  v = warp_allreduce(v, op);
  if constexpr (kWarps > 1) {
    V* group = smem + threadIdx.y * kWarps;
    if (threadIdx.x % kWarpSize == 0) group[threadIdx.x / kWarpSize] = v;
    __syncthreads();
    v = group[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) v = op(v, group[w]);
    __syncthreads();  // the next call overwrites smem
  }
  return v;
}

// Sum of the thread's elements: a tree within each vector, then across vectors.
template <int kTpr, typename T, int K>
__device__ __forceinline__ float own_sum(const Vec16<T> (&v)[K], int nvec) {
  constexpr int VEC = kVec16<T>;
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (!owns<kTpr>(k, nvec)) continue;
    float t[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) t[e] = static_cast<float>(v[k].val[e]);
#pragma unroll
    for (int w = VEC / 2; w > 0; w /= 2) {
#pragma unroll
      for (int e = 0; e < w; ++e) t[e] += t[e + w];
    }
    s += t[0];
  }
  return s;
}

// Sum of (x - mu)^2 over the thread's elements.
template <int kTpr, typename T, int K>
__device__ __forceinline__ float own_sq_dev(const Vec16<T> (&v)[K], int nvec, float mu) {
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (!owns<kTpr>(k, nvec)) continue;
#pragma unroll
    for (int e = 0; e < kVec16<T>; ++e) {
      const float d = static_cast<float>(v[k].val[e]) - mu;
      s = fmaf(d, d, s);
    }
  }
  return s;
}

template <int kTpr, typename T, int K>
__device__ __forceinline__ void store_y(const Vec16<T> (&xv)[K], const T* __restrict__ weight,
                                        const T* __restrict__ bias, T* yr, int nvec, float mu, float rs) {
  constexpr int VEC = kVec16<T>;
  const int j = threadIdx.x * VEC;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (!owns<kTpr>(k, nvec)) continue;
    const int j0 = j + k * kTpr * VEC;
    const Vec16<T> wv = load_vec<T, VEC>(weight + j0);
    const Vec16<T> bv = load_vec<T, VEC>(bias + j0);
    Vec16<T> out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float xhat = (static_cast<float>(xv[k].val[e]) - mu) * rs;
      out.val[e] = static_cast<T>(xhat * static_cast<float>(wv.val[e]) + static_cast<float>(bv.val[e]));
    }
    store_vec<T, VEC>(yr + j0, out);
  }
}

// ---- Forward, register path. Block (kTpr, kFwdRegThreads / kTpr); the row loop has a block-uniform
// bound, so every thread reaches row_allreduce's barriers; a row group past the last row adds zeros.

#define M6_LN_FWD_REGS_PARAMS                                                                     \
  const T *__restrict__ x, const T *__restrict__ weight, const T *__restrict__ bias,              \
      T *__restrict__ y, float *__restrict__ mean, float *__restrict__ rstd, int64_t rows, int n, \
      float inv_n, float eps

template <typename T, int kTpr>
__device__ __forceinline__ void fwd_regs_body(M6_LN_FWD_REGS_PARAMS) {
  constexpr int kRowsPerBlock = kFwdRegThreads<kTpr> / kTpr;
  __shared__ float smem[kMaxWarps];
  const int nvec = n / kVec16<T>;  // exact on this path
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock; base < rows;
       base += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t row = base + threadIdx.y;
    const bool active = row < rows;
    Vec16<T> xv[kRegVecs];
    if (active) load_own<kTpr>(xv, x + row * n, nvec);
    const float sum = row_allreduce<kTpr>(active ? own_sum<kTpr>(xv, nvec) : 0.f, SumOp{}, smem);
    // __fmul_rn: no contraction into the x - mu below, so every use sees the stored mean.
    const float mu = __fmul_rn(sum, inv_n);
    const float sq = row_allreduce<kTpr>(active ? own_sq_dev<kTpr>(xv, nvec, mu) : 0.f, SumOp{}, smem);
    if (!active) continue;  // no barrier follows in this iteration
    const float rs = rsqrtf(sq * inv_n + eps);
    if (threadIdx.x == 0) {
      mean[row] = mu;
      rstd[row] = rs;
    }
    launder(xv);
    store_y<kTpr>(xv, weight, bias, y + row * n, nvec, mu, rs);
  }
}

template <typename T, int kTpr>
__global__ void __launch_bounds__(kRegBlock, kFwdRegMinBlocks)
layer_norm_fwd_regs_kernel(M6_LN_FWD_REGS_PARAMS) {
  static_assert(kTpr <= kRegBlock);
  fwd_regs_body<T, kTpr>(x, weight, bias, y, mean, rstd, rows, n, inv_n, eps);
}

template <typename T, int kTpr>
__global__ void __launch_bounds__(kFwdWideThreads, 1)
layer_norm_fwd_regs_wide_kernel(M6_LN_FWD_REGS_PARAMS) {
  static_assert(kTpr > kRegBlock && kTpr <= kFwdWideThreads);
  fwd_regs_body<T, kTpr>(x, weight, bias, y, mean, rstd, rows, n, inv_n, eps);
}

// ---- Backward, register path.

// One row of a row group: its vectors of x and dy, and its statistics.
template <typename T, int K>
struct RowIn {
  Vec16<T> x[K];
  Vec16<T> dy[K];
  float mu;
  float rs;
};

template <int kTpr, typename T, int K>
__device__ __forceinline__ void load_row_in(RowIn<T, K>& r, const T* __restrict__ dy, const T* __restrict__ x,
                                            const float* __restrict__ mean, const float* __restrict__ rstd,
                                            int64_t row, int n) {
  const int nvec = n / kVec16<T>;
  load_own<kTpr>(r.x, x + row * n, nvec);
  load_own<kTpr>(r.dy, dy + row * n, nvec);
  r.mu = mean[row];
  r.rs = rstd[row];
}

// Adds the row to the per-column sums (acc_w += dy * xhat, acc_b += dy); returns the thread's
// (sum g, sum g * xhat).
template <int kTpr, typename T, int K>
__device__ __forceinline__ float2 accumulate_row(const RowIn<T, K>& r, const Vec16<T> (&wv)[K], int nvec,
                                                 float (&acc_w)[K][kVec16<T>], float (&acc_b)[K][kVec16<T>]) {
  float2 sums = make_float2(0.f, 0.f);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (!owns<kTpr>(k, nvec)) continue;
#pragma unroll
    for (int e = 0; e < kVec16<T>; ++e) {
      const float d = static_cast<float>(r.dy[k].val[e]);
      const float xhat = (static_cast<float>(r.x[k].val[e]) - r.mu) * r.rs;
      const float g = d * static_cast<float>(wv[k].val[e]);
      sums.x += g;
      sums.y += g * xhat;
      acc_w[k][e] += d * xhat;
      acc_b[k][e] += d;
    }
  }
  return sums;
}

// grad_x = rs * (g - mean_g - xhat * mean_gx) = g * rs + ((x - mu) * c1 + c0) with the row's
// c0 = -rs * mean_g and c1 = -rs^2 * mean_gx: two FMAs per element after g, the difference x - mu
// still formed first (no cancellation between x * c1 and mu * c1 when |mean| >> std).
template <int kTpr, typename T, int K>
__device__ __forceinline__ void store_dx(const RowIn<T, K>& r, const Vec16<T> (&wv)[K], int nvec, float mean_g,
                                         float mean_gx, T* dxr) {
  constexpr int VEC = kVec16<T>;
  const float c0 = -r.rs * mean_g;
  const float c1 = -r.rs * r.rs * mean_gx;
  dxr += threadIdx.x * VEC;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (!owns<kTpr>(k, nvec)) continue;
    Vec16<T> out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float g = static_cast<float>(r.dy[k].val[e]) * static_cast<float>(wv[k].val[e]);
      const float t = fmaf(static_cast<float>(r.x[k].val[e]) - r.mu, c1, c0);
      out.val[e] = static_cast<T>(fmaf(g, r.rs, t));
    }
    store_vec<T, VEC>(dxr + k * kTpr * VEC, out);
  }
}

// Writes the block's per-column sums: part_w[col] = sum over row groups, in group order, of acc_w;
// part_b likewise. One vector slot k of every thread at a time goes through `stage` (2 * kTpr * VEC
// floats per row group); all threads then add and store coalesced. Every thread of the block calls
// it (it has barriers).
template <int kTpr, int kThreads, int K, int VEC>
__device__ __forceinline__ void write_partials(const float (&acc_w)[K][VEC], const float (&acc_b)[K][VEC],
                                               float* stage, float* __restrict__ part_w,
                                               float* __restrict__ part_b, int n) {
  constexpr int kSpan = kTpr * VEC;  // columns of one slot k, over the row group
  constexpr int kGroups = kThreads / kTpr;
  const int tid = threadIdx.y * kTpr + threadIdx.x;
  float* mine = stage + threadIdx.y * 2 * kSpan + threadIdx.x * VEC;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (k * kSpan >= n) break;  // block-uniform: slots past the row hold no column
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      mine[e] = acc_w[k][e];
      mine[kSpan + e] = acc_b[k][e];
    }
    __syncthreads();
    for (int i = tid; i < 2 * kSpan; i += kThreads) {
      const int q = i < kSpan ? 0 : 1;  // 0: weight, 1: bias
      const int j = i - q * kSpan;
      const int col = k * kSpan + j;
      if (col >= n) continue;
      float s = stage[q * kSpan + j];
#pragma unroll
      for (int grp = 1; grp < kGroups; ++grp) s += stage[(2 * grp + q) * kSpan + j];
      (q == 0 ? part_w : part_b)[col] = s;
    }
    __syncthreads();  // the next slot overwrites stage
  }
}

// Block (kTpr, kBwdRegThreads / kTpr) = chunk blockIdx.x: rows [first, last). Row group threadIdx.y
// takes rows first + threadIdx.y, + kGroups, ...; the loop bound is block-uniform (row_allreduce's
// barriers). While the group reduces one row, its next row's dy, x, mean and rstd are in flight.
#define M6_LN_BWD_REGS_PARAMS                                                                         \
  const T *__restrict__ dy, const T *__restrict__ x, const T *__restrict__ weight,                    \
      const float *__restrict__ mean, const float *__restrict__ rstd, T *__restrict__ dx,             \
      float *__restrict__ part, int64_t rows, int n, float inv_n, int64_t rows_per_chunk

template <typename T, int kTpr>
__device__ __forceinline__ void bwd_regs_body(M6_LN_BWD_REGS_PARAMS) {
  constexpr int VEC = kVec16<T>;
  constexpr int K = kRegVecs;
  constexpr int kThreads = kBwdRegThreads<kTpr>;
  constexpr int kGroups = kThreads / kTpr;
  __shared__ float2 red[kMaxWarps];
  __shared__ __align__(16) float stage[2 * kThreads * VEC];
  const int nvec = n / VEC;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_chunk;
  const int64_t last = std::min(rows, first + rows_per_chunk);
  Vec16<T> wv[K];
  load_own<kTpr>(wv, weight, nvec);
  float acc_w[K][VEC] = {};
  float acc_b[K][VEC] = {};
  RowIn<T, K> cur;
  if (first + threadIdx.y < last) load_row_in<kTpr>(cur, dy, x, mean, rstd, first + threadIdx.y, n);
  for (int64_t base = first; base < last; base += kGroups) {
    const int64_t row = base + threadIdx.y;
    const bool active = row < last;
    RowIn<T, K> next;  // loaded iff the next iteration's row is active
    if (row + kGroups < last) load_row_in<kTpr>(next, dy, x, mean, rstd, row + kGroups, n);
    float2 sums = make_float2(0.f, 0.f);
    if (active) sums = accumulate_row<kTpr>(cur, wv, nvec, acc_w, acc_b);
    sums = row_allreduce<kTpr>(sums, SumOp{}, red);
    launder(cur.x);
    launder(cur.dy);
    launder(wv);
    if (active) store_dx<kTpr>(cur, wv, nvec, sums.x * inv_n, sums.y * inv_n, dx + row * n);
    cur = next;
  }
  const int64_t chunks = gridDim.x;
  write_partials<kTpr, kThreads>(acc_w, acc_b, stage, part + blockIdx.x * static_cast<int64_t>(n),
                                 part + (chunks + blockIdx.x) * static_cast<int64_t>(n), n);
}

template <typename T, int kTpr>
__global__ void __launch_bounds__(kRegBlock, kBwdRegMinBlocks)
layer_norm_bwd_regs_kernel(M6_LN_BWD_REGS_PARAMS) {
  static_assert(kTpr <= kRegBlock);
  bwd_regs_body<T, kTpr>(dy, x, weight, mean, rstd, dx, part, rows, n, inv_n, rows_per_chunk);
}

template <typename T, int kTpr>
__global__ void __launch_bounds__(kBwdRegMaxThreads, 1)
layer_norm_bwd_regs_wide_kernel(M6_LN_BWD_REGS_PARAMS) {
  static_assert(kTpr == kBwdRegMaxThreads);
  bwd_regs_body<T, kTpr>(dy, x, weight, mean, rstd, dx, part, rows, n, inv_n, rows_per_chunk);
}

// ---- Loop paths. Block (tx, kLoopThreads / tx): ty rows per block, tx threads per row; the row
// loop has a block-uniform bound (group_allreduce's barriers), rows past the end add identities.

template <typename T, int VEC>
__global__ void __launch_bounds__(kLoopThreads, 2)
layer_norm_fwd_loop_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                           const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ mean,
                           float* __restrict__ rstd, int64_t rows, int n, float eps) {
  __shared__ Welford smem[kMaxWarps];
  const int chunks = n / VEC;  // exact: VEC > 1 only when n % VEC == 0
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows;
       base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = base + threadIdx.y;
    const bool active = row < rows;
    const T* xr = x + (active ? row : 0) * n;
    Welford acc{0.f, 0.f, 0.f};
    if (active) {
      for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        const Vec<T, VEC> xv = load_vec<T, VEC>(xr + c * VEC);
        float v[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = static_cast<float>(xv.val[e]);
        welford_add(acc, v);
      }
    }
    acc = group_allreduce(acc, WelfordOp{}, smem);
    if (!active) continue;  // no barrier follows in this iteration
    const float mu = acc.mean;
    const float rs = rsqrtf(fmaxf(acc.m2 / static_cast<float>(n), 0.f) + eps);
    if (threadIdx.x == 0) {
      mean[row] = mu;
      rstd[row] = rs;
    }
    T* yr = y + row * n;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
      const Vec<T, VEC> xv = load_vec<T, VEC>(xr + c * VEC);
      const Vec<T, VEC> wv = load_vec<T, VEC>(weight + c * VEC);
      const Vec<T, VEC> bv = load_vec<T, VEC>(bias + c * VEC);
      Vec<T, VEC> out;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float xhat = (static_cast<float>(xv.val[e]) - mu) * rs;
        out.val[e] = static_cast<T>(xhat * static_cast<float>(wv.val[e]) + static_cast<float>(bv.val[e]));
      }
      store_vec<T, VEC>(yr + c * VEC, out);
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kLoopThreads, 2)
layer_norm_bwd_dx_loop_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                              const T* __restrict__ weight, const float* __restrict__ mean,
                              const float* __restrict__ rstd, T* __restrict__ dx, int64_t rows, int n,
                              float inv_n) {
  __shared__ float2 smem[kMaxWarps];
  const int chunks = n / VEC;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows;
       base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = base + threadIdx.y;
    const bool active = row < rows;
    const int64_t offset = (active ? row : 0) * n;
    const float mu = active ? mean[row] : 0.f;
    const float rs = active ? rstd[row] : 0.f;
    float2 sums = make_float2(0.f, 0.f);  // (sum g, sum g * xhat)
    if (active) {
      for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        const Vec<T, VEC> gv = load_vec<T, VEC>(dy + offset + c * VEC);
        const Vec<T, VEC> xv = load_vec<T, VEC>(x + offset + c * VEC);
        const Vec<T, VEC> wv = load_vec<T, VEC>(weight + c * VEC);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float g = static_cast<float>(gv.val[e]) * static_cast<float>(wv.val[e]);
          const float xhat = (static_cast<float>(xv.val[e]) - mu) * rs;
          sums.x += g;
          sums.y += g * xhat;
        }
      }
    }
    sums = group_allreduce(sums, SumOp{}, smem);
    if (!active) continue;  // no barrier follows in this iteration
    const float mean_g = sums.x * inv_n;
    const float mean_gx = sums.y * inv_n;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
      const Vec<T, VEC> gv = load_vec<T, VEC>(dy + offset + c * VEC);
      const Vec<T, VEC> xv = load_vec<T, VEC>(x + offset + c * VEC);
      const Vec<T, VEC> wv = load_vec<T, VEC>(weight + c * VEC);
      Vec<T, VEC> out;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float g = static_cast<float>(gv.val[e]) * static_cast<float>(wv.val[e]);
        const float xhat = (static_cast<float>(xv.val[e]) - mu) * rs;
        out.val[e] = static_cast<T>(rs * (g - mean_g - xhat * mean_gx));
      }
      store_vec<T, VEC>(dx + offset + c * VEC, out);
    }
  }
}

// ---- grad_weight / grad_bias.

// Stage 1 of the loop path. Block (kColTile, kColRows), grid (column tiles, chunks). Writes
// part_w[chunk, col] = sum_{rows r of chunk} dy[r, col] * xhat[r, col] and part_b likewise.
template <typename T>
__global__ void __launch_bounds__(kColTile * kColRows, 4)
layer_norm_bwd_wb_partial_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                 const float* __restrict__ mean, const float* __restrict__ rstd,
                                 float* __restrict__ part_w, float* __restrict__ part_b,
                                 int64_t rows, int n, int64_t rows_per_chunk) {
  __shared__ float sw[kColRows][kColTile + 1];
  __shared__ float sb[kColRows][kColTile + 1];
  const int col = blockIdx.x * kColTile + threadIdx.x;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t last = std::min(rows, first + rows_per_chunk);
  float acc_w = 0.f;
  float acc_b = 0.f;
  if (col < n) {
#pragma unroll 4
    for (int64_t r = first + threadIdx.y; r < last; r += kColRows) {
      const float g = static_cast<float>(dy[r * n + col]);
      const float xhat = (static_cast<float>(x[r * n + col]) - mean[r]) * rstd[r];
      acc_w += g * xhat;
      acc_b += g;
    }
  }
  sw[threadIdx.y][threadIdx.x] = acc_w;
  sb[threadIdx.y][threadIdx.x] = acc_b;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    float total_w = 0.f;
    float total_b = 0.f;
#pragma unroll
    for (int i = 0; i < kColRows; ++i) {
      total_w += sw[i][threadIdx.x];
      total_b += sb[i][threadIdx.x];
    }
    part_w[blockIdx.y * static_cast<int64_t>(n) + col] = total_w;
    part_b[blockIdx.y * static_cast<int64_t>(n) + col] = total_b;
  }
}

// Stage 2. Block (kColTile, kFinalLanes): lane threadIdx.y of column col sums chunks threadIdx.y,
// + kFinalLanes, ... in order; lane 0 adds the lanes in order and writes grad_weight[col], grad_bias[col].
template <typename T>
__global__ void __launch_bounds__(kColTile * kFinalLanes, 1)
layer_norm_bwd_wb_final_kernel(const float* __restrict__ part_w, const float* __restrict__ part_b,
                               T* __restrict__ grad_w, T* __restrict__ grad_b, int64_t chunks, int n) {
  __shared__ float sw[kFinalLanes][kColTile + 1];
  __shared__ float sb[kFinalLanes][kColTile + 1];
  const int col = blockIdx.x * kColTile + threadIdx.x;
  float acc_w = 0.f;
  float acc_b = 0.f;
  if (col < n) {
#pragma unroll 4
    for (int64_t c = threadIdx.y; c < chunks; c += kFinalLanes) {
      acc_w += part_w[c * n + col];
      acc_b += part_b[c * n + col];
    }
  }
  sw[threadIdx.y][threadIdx.x] = acc_w;
  sb[threadIdx.y][threadIdx.x] = acc_b;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    float total_w = 0.f;
    float total_b = 0.f;
#pragma unroll
    for (int i = 0; i < kFinalLanes; ++i) {
      total_w += sw[i][threadIdx.x];
      total_b += sb[i][threadIdx.x];
    }
    grad_w[col] = static_cast<T>(total_w);
    grad_b[col] = static_cast<T>(total_b);
  }
}

// ---- Launch.

struct RowLaunch {
  dim3 grid;
  dim3 block;
};

int pow2_at_least(int64_t v) {
  int p = 1;
  while (p < v) p *= 2;
  return p;
}

// Register paths: threads per row group for a row of `nvec` vectors (a power of two >= 32).
int regs_tpr(int64_t nvec) { return std::max(kWarpSize, pow2_at_least(ceil_div(nvec, kRegVecs))); }

// Loop paths: (tx, kLoopThreads / tx) with tx a power of two, about kLoopChunksPerThread accesses per
// thread, at most one block per row.
RowLaunch loop_launch(int64_t rows, int64_t chunks) {
  const int tx = std::clamp(pow2_at_least(ceil_div(chunks, kLoopChunksPerThread)), kWarpSize, kLoopThreads);
  const int ty = kLoopThreads / tx;
  return {dim3(grid_size(ceil_div(rows, ty))), dim3(tx, ty)};
}

// 1 / n rounded once (n a power of two: exact), so that a mean is a product, not a division that
// --use_fast_math would approximate.
float inverse(int64_t n) { return static_cast<float>(1.0 / static_cast<double>(n)); }

template <typename T, int kTpr>
void launch_fwd_regs(const T* xp, const T* wp, const T* bp, T* yp, float* mp, float* rp, int64_t rows,
                     int n, float eps, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kFwdRegThreads<kTpr> / kTpr;
  const dim3 grid(grid_size(ceil_div(rows, kRowsPerBlock)));
  const dim3 block(kTpr, kRowsPerBlock);
  if constexpr (kTpr <= kRegBlock) {
    layer_norm_fwd_regs_kernel<T, kTpr><<<grid, block, 0, stream>>>(xp, wp, bp, yp, mp, rp, rows, n,
                                                                    inverse(n), eps);
  } else {
    layer_norm_fwd_regs_wide_kernel<T, kTpr><<<grid, block, 0, stream>>>(xp, wp, bp, yp, mp, rp, rows, n,
                                                                         inverse(n), eps);
  }
}

template <typename T>
void layer_norm_forward_launch(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                               at::Tensor& y, at::Tensor& mean, at::Tensor& rstd, float eps,
                               cudaStream_t stream) {
  const int n = static_cast<int>(x.size(-1));  // <= kLayerNormMaxHidden
  const int64_t rows = x.numel() / n;
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  const T* bp = b.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  float* mp = mean.mutable_data_ptr<float>();
  float* rp = rstd.mutable_data_ptr<float>();
  constexpr int kV = kVec16<T>;
  const bool vec = can_vectorize<T>(n, {xp, wp, bp, yp});
  if (vec && n <= kFwdRegMaxThreads * kRegVecs * kV) {
    switch (regs_tpr(n / kV)) {
      case 32: launch_fwd_regs<T, 32>(xp, wp, bp, yp, mp, rp, rows, n, eps, stream); break;
      case 64: launch_fwd_regs<T, 64>(xp, wp, bp, yp, mp, rp, rows, n, eps, stream); break;
      case 128: launch_fwd_regs<T, 128>(xp, wp, bp, yp, mp, rp, rows, n, eps, stream); break;
      case 256: launch_fwd_regs<T, 256>(xp, wp, bp, yp, mp, rp, rows, n, eps, stream); break;
      case 512: launch_fwd_regs<T, 512>(xp, wp, bp, yp, mp, rp, rows, n, eps, stream); break;
      default: launch_fwd_regs<T, 1024>(xp, wp, bp, yp, mp, rp, rows, n, eps, stream); break;
    }
  } else if (vec) {
    const RowLaunch l = loop_launch(rows, n / kV);
    layer_norm_fwd_loop_kernel<T, kV><<<l.grid, l.block, 0, stream>>>(xp, wp, bp, yp, mp, rp, rows, n, eps);
  } else {
    const RowLaunch l = loop_launch(rows, n);
    layer_norm_fwd_loop_kernel<T, 1><<<l.grid, l.block, 0, stream>>>(xp, wp, bp, yp, mp, rp, rows, n, eps);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The row chunks of the grad_weight / grad_bias reduction: a function of (rows, n) alone, so that
// the sums' order is the same on every device. At least kChunkMinRows rows per chunk; past
// kMaxChunks chunks (or kMaxPartials partials) the chunks grow instead.
int64_t rows_per_chunk(int64_t rows, int64_t n) {
  const int64_t max_chunks = std::clamp<int64_t>(kMaxPartials / n, 1, kMaxChunks);
  return std::max(kChunkMinRows, ceil_div(rows, max_chunks));
}

// Both quantities' partial sums, (2, chunks, n) fp32: one allocation per backward call, from the
// caching allocator (no cudaMalloc once warm), as torch's own LayerNorm backward does for its
// grad_weight / grad_bias partials. Without it the column sums would need float atomics (order, and
// so bits, depend on scheduling) or one block per column range reading every row (too few blocks for
// N = 1024). At most kMaxPartials floats per quantity.
struct Partials {
  at::Tensor storage;
  int64_t chunks;
  int64_t rows_per_chunk;
  float* w() { return storage.mutable_data_ptr<float>(); }
  float* b() { return w() + chunks * storage.size(2); }
};

Partials make_partials(const at::Tensor& x, int64_t rows, int64_t n) {
  const int64_t per = rows_per_chunk(rows, n);
  const int64_t chunks = ceil_div(rows, per);  // every chunk has at least one row
  return {at::empty({2, chunks, n}, x.options().dtype(at::kFloat)), chunks, per};
}

template <typename T, int kTpr>
void launch_bwd_regs(const T* dyp, const T* xp, const T* wp, const float* mp, const float* rp, T* dxp,
                     Partials& part, int64_t rows, int n, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>(part.chunks));  // <= kMaxChunks
  const dim3 block(kTpr, kBwdRegThreads<kTpr> / kTpr);
  if constexpr (kTpr <= kRegBlock) {
    layer_norm_bwd_regs_kernel<T, kTpr><<<grid, block, 0, stream>>>(dyp, xp, wp, mp, rp, dxp, part.w(), rows, n,
                                                                    inverse(n), part.rows_per_chunk);
  } else {
    layer_norm_bwd_regs_wide_kernel<T, kTpr><<<grid, block, 0, stream>>>(
        dyp, xp, wp, mp, rp, dxp, part.w(), rows, n, inverse(n), part.rows_per_chunk);
  }
}

// The loop path of the backward: grad_x, then stage 1 of grad_weight / grad_bias.
template <typename T>
void layer_norm_backward_loop(const T* dyp, const T* xp, const T* wp, const float* mp, const float* rp,
                              T* dxp, Partials& part, int64_t rows, int n, bool vec, cudaStream_t stream) {
  constexpr int kV = kVec16<T>;
  if (vec) {
    const RowLaunch l = loop_launch(rows, n / kV);
    layer_norm_bwd_dx_loop_kernel<T, kV><<<l.grid, l.block, 0, stream>>>(dyp, xp, wp, mp, rp, dxp, rows, n,
                                                                          inverse(n));
  } else {
    const RowLaunch l = loop_launch(rows, n);
    layer_norm_bwd_dx_loop_kernel<T, 1><<<l.grid, l.block, 0, stream>>>(dyp, xp, wp, mp, rp, dxp, rows, n,
                                                                         inverse(n));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 grid(static_cast<unsigned int>(ceil_div(n, kColTile)), static_cast<unsigned int>(part.chunks));
  layer_norm_bwd_wb_partial_kernel<T><<<grid, dim3(kColTile, kColRows), 0, stream>>>(
      dyp, xp, mp, rp, part.w(), part.b(), rows, n, part.rows_per_chunk);
}

template <typename T>
void layer_norm_backward_launch(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx,
                                at::Tensor& grad_w, at::Tensor& grad_b, cudaStream_t stream) {
  const int n = static_cast<int>(x.size(-1));  // <= kLayerNormMaxHidden
  const int64_t rows = x.numel() / n;
  const T* dyp = dy.const_data_ptr<T>();
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  const float* mp = mean.const_data_ptr<float>();
  const float* rp = rstd.const_data_ptr<float>();
  T* dxp = dx.mutable_data_ptr<T>();
  Partials part = make_partials(x, rows, n);
  constexpr int kV = kVec16<T>;
  const bool vec = can_vectorize<T>(n, {dyp, xp, wp, dxp});
  if (vec && n <= kBwdRegMaxThreads * kRegVecs * kV) {
    switch (regs_tpr(n / kV)) {
      case 32: launch_bwd_regs<T, 32>(dyp, xp, wp, mp, rp, dxp, part, rows, n, stream); break;
      case 64: launch_bwd_regs<T, 64>(dyp, xp, wp, mp, rp, dxp, part, rows, n, stream); break;
      case 128: launch_bwd_regs<T, 128>(dyp, xp, wp, mp, rp, dxp, part, rows, n, stream); break;
      default: launch_bwd_regs<T, 256>(dyp, xp, wp, mp, rp, dxp, part, rows, n, stream); break;
    }
  } else {
    layer_norm_backward_loop<T>(dyp, xp, wp, mp, rp, dxp, part, rows, n, vec, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 grid(static_cast<unsigned int>(ceil_div(n, kColTile)));
  layer_norm_bwd_wb_final_kernel<T><<<grid, dim3(kColTile, kFinalLanes), 0, stream>>>(
      part.w(), part.b(), grad_w.mutable_data_ptr<T>(), grad_b.mutable_data_ptr<T>(), part.chunks, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cuda(const at::Tensor& x,
                                                               const at::Tensor& weight,
                                                               const at::Tensor& bias, double eps) {
  check_layer_norm_args(x, weight, bias);
  check_layer_norm_eps(eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();                // (rows, N) viewed flat
  const at::Tensor w = weight.contiguous();            // (N,)
  const at::Tensor b = bias.contiguous();              // (N,)
  const int64_t rows = xc.numel() / xc.size(-1);
  at::Tensor y = at::empty(xc.sizes(), xc.options());  // x's shape
  at::Tensor mean = at::empty({rows}, xc.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, xc.options().dtype(at::kFloat));
  if (rows == 0) return {y, mean, rstd};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  M6_DISPATCH_FLOAT_HALF_BF16(xc.scalar_type(), "layer_norm", [&] {
    layer_norm_forward_launch<scalar_t>(xc, w, b, y, mean, rstd, static_cast<float>(eps), stream);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd) {
  check_layer_norm_args(x, weight, weight);  // no bias in backward: weight stands in for it
  check_layer_norm_backward_args(grad_y, x, mean, rstd);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dy = grad_y.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor mc = mean.contiguous();
  const at::Tensor rc = rstd.contiguous();
  at::Tensor dx = at::empty(xc.sizes(), xc.options());
  const int64_t rows = xc.numel() / xc.size(-1);
  if (rows == 0) return {dx, at::zeros_like(w), at::zeros_like(w)};
  at::Tensor grad_w = at::empty_like(w);
  at::Tensor grad_b = at::empty_like(w);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  M6_DISPATCH_FLOAT_HALF_BF16(xc.scalar_type(), "layer_norm_backward", [&] {
    layer_norm_backward_launch<scalar_t>(dy, xc, w, mc, rc, dx, grad_w, grad_b, stream);
  });
  return {dx, grad_w, grad_b};
}

}  // namespace
}  // namespace m6

TORCH_LIBRARY_IMPL(m6, CUDA, m) {
  m.impl("layer_norm", &m6::layer_norm_cuda);
  m.impl("layer_norm_backward", &m6::layer_norm_backward_cuda);
}
