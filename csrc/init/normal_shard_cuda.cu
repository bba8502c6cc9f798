// CUDA kernels of m6::normal_shard_ and m6::philox4x32_10_ (schemas: csrc/registration.cpp; the
// values: csrc/init/philox_normal.h, the same functions the CPU kernel's scalar path runs).
//
// One thread per counter: it draws the counter's four elements and stores those that fall in its
// row of the block. Row r of the block is the run [first + r full_cols, ... + C) of flat indices,
// which spans at most C / 4 + 2 counters (a run may start and end inside one); grid.y walks the
// rows, grid.x the counters of a row (both grid-stride), so no thread divides 64-bit indices.
// The math is float64 FMAs, multiplies and __dsqrt_rn, immune to --use_fast_math (which only
// rewrites float32 math): tests/test_sass.py checks the kernel has no MUFU.LG2 / SIN / COS
// (float32 fast-math intrinsics) and no local memory.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../common/cuda_utils.cuh"
#include "normal_shard.h"
#include "philox_normal.h"

namespace m6 {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridRows = 65535;  // grid.y's limit

template <typename T>
__global__ void __launch_bounds__(kThreads) normal_shard_kernel(T* out, int64_t rows, int64_t cols, int64_t row_stride,
                                                                uint64_t first, int64_t full_cols,
                                                                int64_t counters_per_row, uint64_t key,
                                                                double neg_two_var) {
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const uint64_t begin = first + static_cast<uint64_t>(row * full_cols);  // the row's first flat index
    const uint64_t end = begin + static_cast<uint64_t>(cols);
    T* row_out = out + row * row_stride;
    for (int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; k < counters_per_row;
         k += static_cast<int64_t>(gridDim.x) * kThreads) {
      const uint64_t counter = begin / philox::kWordsPerCounter + static_cast<uint64_t>(k);
      const uint64_t element = counter * philox::kWordsPerCounter;
      if (element >= end) continue;
      float v[philox::kWordsPerCounter];
      philox::normal4(counter, key, neg_two_var, v);
#pragma unroll
      for (int j = 0; j < philox::kWordsPerCounter; ++j) {
        const uint64_t i = element + j;
        if (i >= begin && i < end) row_out[i - begin] = static_cast<T>(v[j]);
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads) philox_kernel(int32_t* out, int64_t n, uint64_t counter, uint64_t key) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * kThreads) {
    const philox::Words w = philox::philox4x32_10(counter + static_cast<uint64_t>(k), key);
    int32_t* o = out + k * philox::kWordsPerCounter;
    o[0] = static_cast<int32_t>(w.x0);
    o[1] = static_cast<int32_t>(w.x1);
    o[2] = static_cast<int32_t>(w.x2);
    o[3] = static_cast<int32_t>(w.x3);
  }
}

void normal_shard_cuda(const at::Tensor& out, int64_t key, int64_t full_cols, int64_t row0, int64_t col0,
                       double std) {
  const ShardGeometry g = normal_shard_geometry(out, full_cols, row0, col0, std);
  TORCH_CHECK(out.device().is_cuda(), "normal_shard_: out must be a CUDA tensor here, got ", out.device());
  if (g.rows == 0 || g.cols == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t counters_per_row = g.cols / philox::kWordsPerCounter + 2;
  const dim3 grid(cuda::grid_size(cuda::ceil_div(counters_per_row, kThreads)),
                  static_cast<unsigned int>(std::min(g.rows, kMaxGridRows)));
  M6_DISPATCH_FLOAT_HALF_BF16(out.scalar_type(), "normal_shard_", [&] {
    normal_shard_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        out.mutable_data_ptr<scalar_t>(), g.rows, g.cols, g.row_stride, g.first, g.full_cols, counters_per_row,
        static_cast<uint64_t>(key), neg_two_variance(std));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void philox4x32_10_cuda(const at::Tensor& out, int64_t key, int64_t counter) {
  check_philox_args(out, counter);
  TORCH_CHECK(out.device().is_cuda(), "philox4x32_10_: out must be a CUDA tensor here, got ", out.device());
  const int64_t n = out.size(0);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  philox_kernel<<<cuda::grid_size(cuda::ceil_div(n, kThreads)), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out.mutable_data_ptr<int32_t>(), n, static_cast<uint64_t>(counter), static_cast<uint64_t>(key));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace m6

TORCH_LIBRARY_IMPL(m6, CUDA, m) {
  m.impl("normal_shard_", &m6::normal_shard_cuda);
  m.impl("philox4x32_10_", &m6::philox4x32_10_cuda);
}
