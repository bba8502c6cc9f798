// Shared by the CPU and CUDA kernels of m6::normal_shard_ and m6::philox4x32_10_: input checks with
// one wording, and the shard's geometry. Schemas: csrc/registration.cpp; the values:
// csrc/init/philox_normal.h; Python: m6_engine/ops/normal_shard.py.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

namespace m6 {

// Flat indices of the full tensor stay below 2^62, so the counter i / 4 and every index sum fit
// in 64 bits with room.
constexpr int64_t kNormalShardMaxElements = int64_t{1} << 62;

// out (R, C) is the block [row0, row0 + R) x [col0, col0 + C) of a full (rows, full_cols) tensor;
// a 1-D out is one row (R = 1).
struct ShardGeometry {
  int64_t rows, cols, row_stride;
  uint64_t first;      // flat index of out[0][0] in the full tensor: row0 * full_cols + col0
  int64_t full_cols;
};

inline ShardGeometry normal_shard_geometry(const at::Tensor& out, int64_t full_cols, int64_t row0, int64_t col0,
                                           double std) {
  TORCH_CHECK(out.dim() == 1 || out.dim() == 2, "normal_shard_: out must be 1-D or 2-D (a block of a full "
              "tensor's rows), got ", out.dim(), "-D");
  const auto dtype = out.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "normal_shard_: out must be float32, float16 or bfloat16, got ", dtype);
  const int64_t rows = out.dim() == 2 ? out.size(0) : 1;
  const int64_t cols = out.size(-1);
  const int64_t row_stride = out.dim() == 2 ? out.stride(0) : cols;
  if (rows > 0 && cols > 1) {
    TORCH_CHECK(out.stride(-1) == 1, "normal_shard_: out's rows must be contiguous (stride 1 along its last "
                "dim), got stride ", out.stride(-1));
  }
  if (rows > 1 && cols > 0) {
    TORCH_CHECK(row_stride >= cols, "normal_shard_: out's rows must not overlap (stride ", row_stride,
                " along dim 0 < ", cols, " columns)");
  }
  TORCH_CHECK(full_cols >= 1, "normal_shard_: full_cols must be >= 1, got ", full_cols);
  TORCH_CHECK(row0 >= 0 && col0 >= 0, "normal_shard_: row0 and col0 must be >= 0, got ", row0, " and ", col0);
  TORCH_CHECK(col0 <= full_cols - cols, "normal_shard_: the block's columns [", col0, ", ", col0, " + ", cols,
              ") must lie within the full tensor's ", full_cols, " columns");
  TORCH_CHECK(row0 <= kNormalShardMaxElements / full_cols - rows, "normal_shard_: the full tensor must have "
              "fewer than 2^62 elements, got rows up to ", row0, " + ", rows, " of ", full_cols, " columns");
  TORCH_CHECK(std::isfinite(std) && std > 0, "normal_shard_: std must be a finite number > 0, got ", std);
  return {rows, cols, row_stride, static_cast<uint64_t>(row0 * full_cols + col0), full_cols};
}

// out (N, 4) int32, contiguous: the four words of counters counter .. counter + N - 1.
inline void check_philox_args(const at::Tensor& out, int64_t counter) {
  TORCH_CHECK(out.scalar_type() == at::kInt, "philox4x32_10_: out must be int32, got ", out.scalar_type());
  TORCH_CHECK(out.dim() == 2 && out.size(1) == 4, "philox4x32_10_: out must have shape (N, 4), got ", out.sizes());
  TORCH_CHECK(out.is_contiguous(), "philox4x32_10_: out must be contiguous");
  TORCH_CHECK(counter >= 0 && counter <= kNormalShardMaxElements / 4 - out.size(0),
              "philox4x32_10_: the counters [", counter, ", ", counter, " + ", out.size(0), ") must lie in [0, 2^60)");
}

// -2 std^2, the factor under the square root of the scaled radius.
inline double neg_two_variance(double std) { return -2.0 * std * std; }

}  // namespace m6
