// CUDA kernels of m6::masked_softmax and m6::masked_softmax_backward (schema: csrc/registration.cpp).
//
// Shapes: scores, out, grads (B, H, Sq, Sk) fp32 | fp16 | bf16, contiguous inside the kernels, seen
// as rows = B * H * Sq rows of Sk keys; prefix_len, valid_len (B,) int32 | int64 on the same device.
// Row r = ((b * H) + h) * Sq + i is query i of sample b, at absolute position q_offset + i; it sees
// keys [0, n) with n = visible_keys(q_offset + i, prefix_len[b], valid_len[b]). Keys past n are
// never read and are written as zeros (padded rows, n = 0, are all zeros).
//   forward:  y_j = exp(scale * x_j - m) / sum_{k<n} exp(scale * x_k - m),  m = max_{k<n} scale * x_k
//   backward: dx_j = scale * y_j * (dy_j - sum_{k<n} dy_k * y_k)
// Math in fp32; the 16-bit forwards exponentiate with the hardware 2^x (MUFU.EX2) on logits pre-scaled
// by log2(e), fp32 with a ~1 ulp polynomial (ForwardExp). Paths, chosen per call from Sk (VEC = 16
// bytes of keys per access when the pointers and Sk allow it, else 1):
//   forward, row in registers: the row's tx threads hold it, K vectors of VEC keys each; shuffle
//               (+ shared memory) max and sum; read once, one exp per key, written once.
//               softmax_fwd_regs: tx <= 128 (rows share 128-thread blocks), up to 32 floats per
//               thread: one warp up to 1024 keys vectorised (256 scalar), 128 threads up to 4096
//               (1024 scalar). softmax_fwd_regs_wide: one row per block of up to 1024 threads, 16
//               floats per thread (64 registers): up to 16384 keys vectorised, 8192 scalar.
//   forward, longer rows: one block per row. Pass 1 reads the visible keys once, keeping an online
//               (max, sum) per thread (the sum is rescaled when the max grows); pass 2 re-reads them
//               (from L2) and writes.
//   backward, warp path: one warp per row, y and dy held in registers (in their storage type);
//               Sk <= 32 * 8 * VEC (1024 fp32, 2048 fp16/bf16, 256 scalar).
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
// stack frame spills registers to local memory (floor_div).
struct RowGeom {
  int64_t rows;             // B * H * Sq
  int64_t rows_per_sample;  // H * Sq
  int64_t sq;
  int64_t sk;
  int64_t q_offset;
  int64_t batch;
  double inv_rows_per_sample;  // 1 / (H * Sq), 0 when there are no rows
  double inv_sq;               // 1 / Sq, 0 when Sq = 0
};

// ---- Length values.
//
// The CPU kernel checks length values on the host. Here that would cost a device-to-host copy and
// a stream synchronisation on every call (and break CUDA-graph capture), so the values never reach
// the host. The kernels read the caller's length tensors directly and clamp each value (valid into
// [0, Sk], prefix into [0, valid]), so any value is memory-safe; block 0 of each kernel also checks
// that every value is in range and, if one is not, stops the kernel with a device-side assert
// (CUDA_KERNEL_ASSERT_MSG, active in release builds too) reported at the next synchronisation. A
// bad value thus fails loudly rather than silently using another mask, with no allocation and no
// extra launch per call. Like any device-side assert it leaves the CUDA context unusable, the
// contract of torch's own CUDA indexing kernels for an out-of-range index.

// The lengths as the kernels see them: (B,) int32 or int64 each, contiguous.
struct Lengths {
  const void* prefix;
  const void* valid;
  bool prefix_is_long;
  bool valid_is_long;
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
  const int64_t valid = v < 0 ? 0 : (v > g.sk ? g.sk : v);
  const int64_t prefix = p < 0 ? 0 : (p > valid ? valid : p);
  return visible_keys(g.q_offset + i, prefix, valid);  // in [0, valid], whatever q_offset is
}

// Asserts that every length is in range. Every thread of block 0 calls it, before any row.
__device__ __forceinline__ void check_lengths_in_range(const RowGeom& g, const Lengths& lens) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int threads = blockDim.x * blockDim.y;
  int ok = 1;
  for (int64_t b = tid; b < g.batch; b += threads) {
    const int64_t p = load_length(lens.prefix, lens.prefix_is_long, b);
    const int64_t v = load_length(lens.valid, lens.valid_is_long, b);
    ok &= static_cast<int>(p >= 0 && p <= v && v <= g.sk);  // p >= 0 and p <= v imply v >= 0
  }
  ok = __syncthreads_and(ok);
  CUDA_KERNEL_ASSERT_MSG(ok, "masked_softmax: lengths out of range: need 0 <= prefix_len <= valid_len <= Sk "
                             "for every sample");
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

// A row whose sum is NaN: v * inv would make every key NaN, masked ones included. Writes what
// torch's softmax gives on the visible keys (all NaN: max - max or a NaN score reaches every
// term) and exactly 0 on the others, in the register path's layout.
template <typename T, int VEC, int K>
__device__ __forceinline__ void write_nan_row(T* yr, int n, int tx, int64_t sk) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int j0 = (k * tx + static_cast<int>(threadIdx.x)) * VEC;
    if (j0 < sk) {
      Vec<T, VEC> out;
#pragma unroll
      for (int e = 0; e < VEC; ++e) out.val[e] = static_cast<T>(j0 + e < n ? NAN : 0.f);
      store_vec<T, VEC>(yr + j0, out);
    }
  }
}

// Block (tx, ty): ty rows per block, the tx threads of threadIdx.y (whole warps) on one row; thread
// t holds vectors k * tx + t (k < K) of the row, so tx * K * VEC >= Sk. The row loop has a
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
    const int n = active ? static_cast<int>(row_visible_keys(row, g, lens)) : 0;  // <= Sk <= tx * K * VEC
    const T* xr = x + (active ? row : 0) * g.sk;
    float v[K][VEC];
    float row_max = -INFINITY;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j0 = (k * tx + static_cast<int>(threadIdx.x)) * VEC;
      Vec<T, VEC> raw{};
      // j0 < n <= Sk: with VEC > 1, Sk % VEC == 0, so the whole vector lies inside the row.
      if (j0 < n) raw = load_vec<T, VEC>(xr + j0);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        v[k][e] = j0 + e < n ? scaled(raw.val[e], scale) : -INFINITY;
        row_max = fmaxf(row_max, v[k][e]);
      }
    }
    row_max = group_allreduce(row_max, MaxOp{}, smem);
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j0 = (k * tx + static_cast<int>(threadIdx.x)) * VEC;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        v[k][e] = j0 + e < n ? Exp{}(v[k][e] - row_max) : 0.f;
        sum += v[k][e];
      }
    }
    sum = group_allreduce(sum, SumOp{}, smem);
    if (!active) continue;  // no barrier follows in this iteration
    T* yr = y + row * g.sk;
    if (sum != sum) {  // row-uniform and rare: a NaN or +inf score, or every visible score -inf
      write_nan_row<T, VEC, K>(yr, n, tx, g.sk);
      continue;
    }
    const float inv = n > 0 ? __frcp_rn(sum) : 0.f;  // IEEE 1/x: fast math would approximate 1.f / x
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j0 = (k * tx + static_cast<int>(threadIdx.x)) * VEC;
      if (j0 < g.sk) {
        Vec<T, VEC> out;
#pragma unroll
        for (int e = 0; e < VEC; ++e) out.val[e] = static_cast<T>(v[k][e] * inv);  // masked keys: v = 0
        store_vec<T, VEC>(yr + j0, out);
      }
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

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
softmax_fwd_block(const T* __restrict__ x, T* __restrict__ y, Lengths lens, RowGeom g, float scale) {
  using Exp = typename ForwardExp<T>::Exp;
  if (blockIdx.x == 0) check_lengths_in_range(g, lens);
  __shared__ MaxSum smem[kMaxWarps];
  const int64_t chunks = g.sk / VEC;  // exact: VEC > 1 only when Sk % VEC == 0
  for (int64_t row = blockIdx.x; row < g.rows; row += gridDim.x) {  // block-uniform
    const int64_t n = row_visible_keys(row, g, lens);
    const T* xr = x + row * g.sk;
    T* yr = y + row * g.sk;
    MaxSum acc{-INFINITY, 0.f};
    for (int64_t c = threadIdx.x; c * VEC < n; c += blockDim.x) {
      const int64_t j0 = c * VEC;
      const Vec<T, VEC> raw = load_vec<T, VEC>(xr + j0);
      float v[VEC];
      float chunk_max = -INFINITY;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        v[e] = j0 + e < n ? scaled(raw.val[e], scale) : -INFINITY;
        chunk_max = fmaxf(chunk_max, v[e]);
      }
      float chunk_sum = 0.f;
#pragma unroll
      for (int e = 0; e < VEC; ++e) chunk_sum += v[e] == -INFINITY ? 0.f : Exp{}(v[e] - chunk_max);
      acc = MaxSumOp<Exp>{}(acc, MaxSum{chunk_max, chunk_sum});
    }
    acc = group_allreduce(acc, MaxSumOp<Exp>{}, smem);
    const float inv = n > 0 ? __frcp_rn(acc.sum) : 0.f;
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      const int64_t j0 = c * VEC;
      Vec<T, VEC> out;
      if (j0 < n) {
        const Vec<T, VEC> raw = load_vec<T, VEC>(xr + j0);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float p = Exp{}(scaled(raw.val[e], scale) - acc.max) * inv;
          out.val[e] = static_cast<T>(j0 + e < n ? p : 0.f);
        }
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) out.val[e] = static_cast<T>(0.f);
      }
      store_vec<T, VEC>(yr + j0, out);
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
    const int64_t offset = row * g.sk;
    // Held in the storage type: half the registers of fp32 copies for 16-bit inputs.
    Vec<T, VEC> yv[K] = {};
    Vec<T, VEC> gv[K] = {};
    float dot = 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j0 = (k * kWarpSize + lane) * VEC;
      if (j0 < n) {
        yv[k] = load_vec<T, VEC>(y + offset + j0);
        gv[k] = load_vec<T, VEC>(dy + offset + j0);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          if (j0 + e < n) dot += static_cast<float>(yv[k].val[e]) * static_cast<float>(gv[k].val[e]);
        }
      }
    }
    dot = warp_allreduce(dot, SumOp{});
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j0 = (k * kWarpSize + lane) * VEC;
      if (j0 < g.sk) {
        Vec<T, VEC> out;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float yf = static_cast<float>(yv[k].val[e]);
          const float d = scale * yf * (static_cast<float>(gv[k].val[e]) - dot);
          out.val[e] = static_cast<T>(j0 + e < n ? d : 0.f);
        }
        store_vec<T, VEC>(dx + offset + j0, out);
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
  const int64_t chunks = g.sk / VEC;
  for (int64_t row = blockIdx.x; row < g.rows; row += gridDim.x) {  // block-uniform
    const int64_t n = row_visible_keys(row, g, lens);
    const int64_t offset = row * g.sk;
    float dot = 0.f;
    for (int64_t c = threadIdx.x; c * VEC < n; c += blockDim.x) {
      const int64_t j0 = c * VEC;
      const Vec<T, VEC> yv = load_vec<T, VEC>(y + offset + j0);
      const Vec<T, VEC> gv = load_vec<T, VEC>(dy + offset + j0);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (j0 + e < n) dot += static_cast<float>(yv.val[e]) * static_cast<float>(gv.val[e]);
      }
    }
    dot = group_allreduce(dot, SumOp{}, smem);
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      const int64_t j0 = c * VEC;
      Vec<T, VEC> out;
      if (j0 < n) {
        const Vec<T, VEC> yv = load_vec<T, VEC>(y + offset + j0);
        const Vec<T, VEC> gv = load_vec<T, VEC>(dy + offset + j0);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float d = scale * static_cast<float>(yv.val[e]) * (static_cast<float>(gv.val[e]) - dot);
          out.val[e] = static_cast<T>(j0 + e < n ? d : 0.f);
        }
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) out.val[e] = static_cast<T>(0.f);
      }
      store_vec<T, VEC>(dx + offset + j0, out);
    }
  }
}

// ---- Launch.

// Backward: calls f(std::integral_constant<int, K>{}) with the smallest K in {1, 2, 4, 8} such
// that K vectors per lane cover the row; false when the row is too long for the warp path.
template <int VEC, typename F>
bool with_warp_k(int64_t sk, F&& f) {
  const int64_t per_lane = ceil_div(ceil_div(sk, VEC), kWarpSize);
  static_assert(kWarpMaxK == 8, "the cases below go up to K = 8");
  if (per_lane <= 1) f(std::integral_constant<int, 1>{});
  else if (per_lane <= 2) f(std::integral_constant<int, 2>{});
  else if (per_lane <= 4) f(std::integral_constant<int, 4>{});
  else if (per_lane <= 8) f(std::integral_constant<int, 8>{});
  else return false;
  return true;
}

// Calls f(std::integral_constant<int, K>{}, wide, tx) for the register forward, whose rows of Sk
// keys are held by tx threads with K vectors each: one warp (tx = 32) with the smallest K that
// covers the row; past kRegMaxK, K = kRegMaxK and the fewest whole warps that do, up to 128
// threads (wide = false_type: softmax_fwd_regs); beyond, K = kWideMaxK and up to 1024 threads
// (wide = true_type: softmax_fwd_regs_wide). False when even that does not cover the row: the
// row goes to the two-pass block path.
template <int VEC, int K = 1, typename F>
bool with_register_plan(int64_t sk, F&& f) {
  const int64_t chunks = ceil_div(sk, VEC);
  if (chunks <= int64_t{kWarpSize} * K) {
    f(std::integral_constant<int, K>{}, std::false_type{}, kWarpSize);
    return true;
  }
  if constexpr (K < kRegMaxK<VEC>) {
    return with_register_plan<VEC, 2 * K>(sk, f);
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

template <typename T, int VEC>
void forward_rows(const T* x, T* y, const Lengths& lens, const RowGeom& g, float scale,
                  cudaStream_t stream) {
  const bool in_registers = with_register_plan<VEC>(g.sk, [&](auto k, auto wide, int tx) {
    constexpr int K = decltype(k)::value;
    if constexpr (decltype(wide)::value) {
      softmax_fwd_regs_wide<T, VEC, K><<<grid_size(g.rows), tx, 0, stream>>>(x, y, lens, g, scale);
    } else {
      const int ty = kMinRowBlockThreads / tx;  // rows per 128-thread block
      softmax_fwd_regs<T, VEC, K><<<grid_size(ceil_div(g.rows, ty)), dim3(tx, ty), 0, stream>>>(
          x, y, lens, g, scale);
    }
  });
  if (!in_registers) {
    const int threads = threads_per_row(g.sk / VEC, kBlockChunksPerThread);
    softmax_fwd_block<T, VEC><<<grid_size(g.rows), threads, 0, stream>>>(x, y, lens, g, scale);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC>
void backward_rows(const T* dy, const T* y, T* dx, const Lengths& lens, const RowGeom& g,
                   float scale, cudaStream_t stream) {
  const bool warp = with_warp_k<VEC>(g.sk, [&](auto k) {
    softmax_bwd_warp<T, VEC, decltype(k)::value>
        <<<grid_size(ceil_div(g.rows, kRowsPerWarpBlock)), kWarpSize * kRowsPerWarpBlock, 0, stream>>>(
            dy, y, dx, lens, g, scale);
  });
  if (!warp) {
    const int threads = threads_per_row(g.sk / VEC, kBlockChunksPerThread);
    softmax_bwd_block<T, VEC><<<grid_size(g.rows), threads, 0, stream>>>(dy, y, dx, lens, g, scale);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

RowGeom row_geom(const at::Tensor& t, int64_t q_offset) {  // t (B, H, Sq, Sk)
  const int64_t rows_per_sample = t.size(1) * t.size(2);
  const auto inverse = [](int64_t d) { return d > 0 ? 1.0 / static_cast<double>(d) : 0.0; };
  return RowGeom{t.size(0) * rows_per_sample, rows_per_sample, t.size(2), t.size(3), q_offset, t.size(0),
                 inverse(rows_per_sample), inverse(t.size(2))};
}

// The caller's length tensors as the kernels read them (contiguous (B,): no copy when they are).
struct DeviceLengths {
  at::Tensor prefix, valid;

  DeviceLengths(const at::Tensor& prefix_len, const at::Tensor& valid_len)
      : prefix(prefix_len.contiguous()), valid(valid_len.contiguous()) {}

  Lengths view() const {
    return Lengths{prefix.const_data_ptr(), valid.const_data_ptr(), prefix.scalar_type() == at::kLong,
                   valid.scalar_type() == at::kLong};
  }
};

at::Tensor masked_softmax_cuda(const at::Tensor& scores, const at::Tensor& prefix_len,
                               const at::Tensor& valid_len, double scale, int64_t q_offset) {
  check_masked_softmax_args(scores, prefix_len, valid_len, q_offset, "scores");
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor x = scores.contiguous();            // (B, H, Sq, Sk)
  at::Tensor out = at::empty(x.sizes(), x.options());  // (B, H, Sq, Sk)
  if (x.size(0) == 0) return out;                      // no sample, no lengths
  const DeviceLengths lengths(prefix_len, valid_len);
  const Lengths lens = lengths.view();
  const RowGeom g = row_geom(x, q_offset);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Launched even when there are no rows (H, Sq or Sk of 0): block 0 still checks the lengths.
  M6_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "masked_softmax", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    const float s = static_cast<float>(scale * ForwardExp<scalar_t>::kLogitScale);
    if (can_vectorize<scalar_t>(g.sk, {xp, yp})) {
      forward_rows<scalar_t, kVec16<scalar_t>>(xp, yp, lens, g, s, stream);
    } else {
      forward_rows<scalar_t, 1>(xp, yp, lens, g, s, stream);
    }
  });
  return out;
}

at::Tensor masked_softmax_backward_cuda(const at::Tensor& grad_out, const at::Tensor& out,
                                        const at::Tensor& prefix_len, const at::Tensor& valid_len,
                                        double scale, int64_t q_offset) {
  check_masked_softmax_backward_args(grad_out, out);
  check_masked_softmax_args(out, prefix_len, valid_len, q_offset, "out");
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor dy = grad_out.contiguous();        // (B, H, Sq, Sk)
  const at::Tensor y = out.contiguous();              // (B, H, Sq, Sk)
  at::Tensor dx = at::empty(y.sizes(), y.options());  // (B, H, Sq, Sk)
  if (y.size(0) == 0) return dx;                      // no sample, no lengths
  const DeviceLengths lengths(prefix_len, valid_len);
  const Lengths lens = lengths.view();
  const RowGeom g = row_geom(y, q_offset);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  M6_DISPATCH_FLOAT_HALF_BF16(y.scalar_type(), "masked_softmax_backward", [&] {
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    const float s = static_cast<float>(scale);
    if (can_vectorize<scalar_t>(g.sk, {dyp, yp, dxp})) {
      backward_rows<scalar_t, kVec16<scalar_t>>(dyp, yp, dxp, lens, g, s, stream);
    } else {
      backward_rows<scalar_t, 1>(dyp, yp, dxp, lens, g, s, stream);
    }
  });
  return dx;
}

}  // namespace
}  // namespace m6

TORCH_LIBRARY_IMPL(m6, CUDA, m) {
  m.impl("masked_softmax", &m6::masked_softmax_cuda);
  m.impl("masked_softmax_backward", &m6::masked_softmax_backward_cuda);
}
