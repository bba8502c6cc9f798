// CUDA kernels of m6::layer_norm and m6::layer_norm_backward (schema: csrc/registration.cpp).
//
// Shapes: x, y, grad_y, grad_x (rows, N) contiguous inside the kernels (x's leading dims flattened),
// fp32 | fp16 | bf16; weight, bias, grad_weight, grad_bias (N,) in x's dtype; mean, rstd (rows,) fp32.
//   forward:  mean, var over the row (Welford in fp32); rstd = 1 / sqrt(var + eps);
//             y = (x - mean) * rstd * weight + bias
//   backward: xhat = (x - mean) * rstd, g = grad_y * weight;
//             grad_x = rstd * (g - mean(g) - xhat * mean(g * xhat))
//             grad_weight = sum_rows(grad_y * xhat), grad_bias = sum_rows(grad_y)
// Row kernels (forward, grad_x): a block of (tx, ty) threads holds ty rows, tx threads per row
// (a whole number of warps, about 4 accesses of 16 bytes each, up to 1024), so short rows share a
// block and long ones get a whole block. Pass 1 reduces the row (per-thread Welford or sums, merged
// across the warp by shuffles and across warps through shared memory), pass 2 re-reads the row
// (from L1/L2) and writes it.
// grad_weight and grad_bias: a two-stage column reduction. Stage 1: blocks of 32 columns x a chunk
// of rows write fp32 partial sums (chunks, N); stage 2 sums the chunks per column and casts to
// weight's dtype. Both stages read memory coalesced along the hidden dim; the sums are deterministic.
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

constexpr int kChunksPerThread = 4;   // row kernels: 16-byte accesses per thread and pass
constexpr int kMinBlockThreads = 128; // row kernels: rows share a block up to this many threads
constexpr int kColTile = 32;          // grad_weight stage 1: columns per block (one per lane)
constexpr int kColRows = 8;           // grad_weight stage 1: rows in flight per block
constexpr int kFinalThreads = 256;    // grad_weight stage 2

// ---- Row kernels. The loop runs over groups of blockDim.y rows with a block-uniform bound, so
// every thread reaches group_allreduce's barriers; threads past the last row only contribute
// identities to it.

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
layer_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                      const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ mean,
                      float* __restrict__ rstd, int64_t rows, int64_t n, float eps) {
  __shared__ Welford smem[kMaxWarps];
  const int64_t chunks = n / VEC;  // exact: VEC > 1 only when n % VEC == 0
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows;
       base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = base + threadIdx.y;
    const bool active = row < rows;
    const T* xr = x + (active ? row : 0) * n;
    Welford acc{0.f, 0.f, 0.f};
    if (active) {
      for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
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
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
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
__global__ void __launch_bounds__(kMaxThreads)
layer_norm_bwd_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                         const T* __restrict__ weight, const float* __restrict__ mean,
                         const float* __restrict__ rstd, T* __restrict__ dx, int64_t rows,
                         int64_t n) {
  __shared__ float2 smem[kMaxWarps];
  const int64_t chunks = n / VEC;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows;
       base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = base + threadIdx.y;
    const bool active = row < rows;
    const int64_t offset = (active ? row : 0) * n;
    const float mu = active ? mean[row] : 0.f;
    const float rs = active ? rstd[row] : 0.f;
    float2 sums = make_float2(0.f, 0.f);  // (sum g, sum g * xhat)
    if (active) {
      for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
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
    const float mean_g = sums.x / static_cast<float>(n);
    const float mean_gx = sums.y / static_cast<float>(n);
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
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

// Stage 1. Block (kColTile, kColRows), grid (column tiles, row chunks). Writes
// part_w[chunk, col] = sum_{rows r of chunk} dy[r, col] * xhat[r, col] and part_b likewise.
template <typename T>
__global__ void __launch_bounds__(kColTile * kColRows)
layer_norm_bwd_wb_partial_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                 const float* __restrict__ mean, const float* __restrict__ rstd,
                                 float* __restrict__ part_w, float* __restrict__ part_b,
                                 int64_t rows, int64_t n, int64_t rows_per_chunk) {
  __shared__ float sw[kColRows][kColTile + 1];
  __shared__ float sb[kColRows][kColTile + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
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
    part_w[blockIdx.y * n + col] = total_w;
    part_b[blockIdx.y * n + col] = total_b;
  }
}

// Stage 2. One thread per column: grad_weight[col] = sum_chunks part_w[chunk, col], likewise bias.
template <typename T>
__global__ void __launch_bounds__(kFinalThreads)
layer_norm_bwd_wb_final_kernel(const float* __restrict__ part_w, const float* __restrict__ part_b,
                               T* __restrict__ grad_w, T* __restrict__ grad_b, int64_t chunks,
                               int64_t n) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kFinalThreads + threadIdx.x;
  if (col >= n) return;
  float total_w = 0.f;
  float total_b = 0.f;
  for (int64_t c = 0; c < chunks; ++c) {
    total_w += part_w[c * n + col];
    total_b += part_b[c * n + col];
  }
  grad_w[col] = static_cast<T>(total_w);
  grad_b[col] = static_cast<T>(total_b);
}

// ---- Launch.

struct RowLaunch {
  dim3 grid;
  dim3 block;
};

// (tx, ty) for rows of `chunks` accesses: tx threads per row, ty rows per block.
RowLaunch row_launch(int64_t rows, int64_t chunks) {
  const int tx = threads_per_row(chunks, kChunksPerThread);
  const int ty = std::max(1, kMinBlockThreads / tx);
  return {dim3(grid_size(ceil_div(rows, ty))), dim3(tx, ty)};
}

template <typename T>
void layer_norm_forward_launch(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                               at::Tensor& y, at::Tensor& mean, at::Tensor& rstd, float eps,
                               cudaStream_t stream) {
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  const T* bp = b.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  float* mp = mean.mutable_data_ptr<float>();
  float* rp = rstd.mutable_data_ptr<float>();
  if (can_vectorize<T>(n, {xp, wp, bp, yp})) {
    constexpr int kV = kVec16<T>;
    const RowLaunch l = row_launch(rows, n / kV);
    layer_norm_fwd_kernel<T, kV><<<l.grid, l.block, 0, stream>>>(xp, wp, bp, yp, mp, rp, rows, n, eps);
  } else {
    const RowLaunch l = row_launch(rows, n);
    layer_norm_fwd_kernel<T, 1><<<l.grid, l.block, 0, stream>>>(xp, wp, bp, yp, mp, rp, rows, n, eps);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void layer_norm_grad_x_launch(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                              const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx,
                              cudaStream_t stream) {
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  const T* dyp = dy.const_data_ptr<T>();
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  const float* mp = mean.const_data_ptr<float>();
  const float* rp = rstd.const_data_ptr<float>();
  T* dxp = dx.mutable_data_ptr<T>();
  if (can_vectorize<T>(n, {dyp, xp, wp, dxp})) {
    constexpr int kV = kVec16<T>;
    const RowLaunch l = row_launch(rows, n / kV);
    layer_norm_bwd_dx_kernel<T, kV><<<l.grid, l.block, 0, stream>>>(dyp, xp, wp, mp, rp, dxp, rows, n);
  } else {
    const RowLaunch l = row_launch(rows, n);
    layer_norm_bwd_dx_kernel<T, 1><<<l.grid, l.block, 0, stream>>>(dyp, xp, wp, mp, rp, dxp, rows, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Rows per chunk of stage 1: a function of (rows, n) alone, never of the device (its SM count), so
// that grad_weight / grad_bias are summed in one order on every GPU. At least 16 rows per chunk
// (partials stay small next to the input), at most 512 chunks (and 2^23 partials per quantity).
int64_t rows_per_chunk(int64_t rows, int64_t n) {
  const int64_t max_chunks = std::clamp<int64_t>((int64_t{1} << 23) / n, 1, 512);
  return std::max<int64_t>(16, ceil_div(rows, max_chunks));
}

template <typename T>
void layer_norm_grad_wb_launch(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                               const at::Tensor& rstd, at::Tensor& grad_w, at::Tensor& grad_b,
                               cudaStream_t stream) {
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  const int64_t per_chunk = rows_per_chunk(rows, n);
  const int64_t chunks = ceil_div(rows, per_chunk);  // every chunk has at least one row
  at::Tensor part = at::empty({2, chunks, n}, x.options().dtype(at::kFloat));  // (w | b, chunks, N)
  float* part_w = part.mutable_data_ptr<float>();
  float* part_b = part_w + chunks * n;
  const dim3 grid(static_cast<unsigned int>(ceil_div(n, kColTile)), static_cast<unsigned int>(chunks));
  layer_norm_bwd_wb_partial_kernel<T><<<grid, dim3(kColTile, kColRows), 0, stream>>>(
      dy.const_data_ptr<T>(), x.const_data_ptr<T>(), mean.const_data_ptr<float>(),
      rstd.const_data_ptr<float>(), part_w, part_b, rows, n, per_chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  layer_norm_bwd_wb_final_kernel<T><<<grid_size(ceil_div(n, kFinalThreads)), kFinalThreads, 0, stream>>>(
      part_w, part_b, grad_w.mutable_data_ptr<T>(), grad_b.mutable_data_ptr<T>(), chunks, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cuda(const at::Tensor& x,
                                                               const at::Tensor& weight,
                                                               const at::Tensor& bias, double eps) {
  check_layer_norm_args(x, weight, bias);
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
    layer_norm_grad_x_launch<scalar_t>(dy, xc, w, mc, rc, dx, stream);
    layer_norm_grad_wb_launch<scalar_t>(dy, xc, mc, rc, grad_w, grad_b, stream);
  });
  return {dx, grad_w, grad_b};
}

}  // namespace
}  // namespace m6

TORCH_LIBRARY_IMPL(m6, CUDA, m) {
  m.impl("layer_norm", &m6::layer_norm_cuda);
  m.impl("layer_norm_backward", &m6::layer_norm_backward_cuda);
}
