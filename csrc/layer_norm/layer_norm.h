// Shared by the CPU and CUDA kernels of m6::layer_norm: input checks with one wording.
// See csrc/registration.cpp for the schema and m6_engine/ops/layer_norm.py for the math.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

#include "../common/dtypes.h"

namespace m6 {

// The largest hidden size the kernels support.
constexpr int64_t kLayerNormMaxHidden = 65536;

inline void check_layer_norm_args(const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& bias) {
  TORCH_CHECK(x.dim() >= 1, "layer_norm: x must have at least one dim");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(kernel_dtype_ok(dtype, x.device()), "layer_norm: x must be ", kernel_dtypes_text(x.device()),
              ", got ", dtype);
  const int64_t n = x.size(-1);
  TORCH_CHECK(n >= 1 && n <= kLayerNormMaxHidden, "layer_norm: hidden size (x's last dim) must be in [1, ",
              kLayerNormMaxHidden, "], got ", n);
  for (const auto* t : {&weight, &bias}) {
    const char* name = (t == &weight) ? "weight" : "bias";
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "layer_norm: ", name, " must have shape (", n,
                ",), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == dtype, "layer_norm: ", name, " must have x's dtype ", dtype,
                ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), "layer_norm: ", name, " must be on x's device ",
                x.device(), ", got ", t->device());
  }
}

// Forward only: eps is added to the variance under the square root. Negative or non-finite values
// would give NaN or silently wrong statistics (torch's F.layer_norm takes them without a word).
inline void check_layer_norm_eps(double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "layer_norm: eps must be a finite number >= 0, got ", eps);
}

// dtype of the per-row mean and rstd: float64 for float64 x (the exact path), else float32.
inline at::ScalarType layer_norm_stats_dtype(at::ScalarType x_dtype) {
  return x_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Backward only: grad_y matches x; mean and rstd are the forward's (rows,) statistics.
inline void check_layer_norm_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                           const at::Tensor& mean, const at::Tensor& rstd) {
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "layer_norm_backward: grad_y must have x's shape ", x.sizes(),
              ", got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "layer_norm_backward: grad_y must have x's dtype ",
              x.scalar_type(), ", got ", grad_y.scalar_type());
  TORCH_CHECK(grad_y.device() == x.device(), "layer_norm_backward: grad_y must be on x's device ", x.device(),
              ", got ", grad_y.device());
  const int64_t rows = x.numel() / x.size(-1);
  const at::ScalarType stats = layer_norm_stats_dtype(x.scalar_type());
  for (const auto* t : {&mean, &rstd}) {
    const char* name = (t == &mean) ? "mean" : "rstd";
    TORCH_CHECK(t->scalar_type() == stats, "layer_norm_backward: ", name, " must be ",
                stats == at::kDouble ? "float64" : "float32", " for x of dtype ", x.scalar_type(), ", got ",
                t->scalar_type());
    TORCH_CHECK(t->dim() == 1 && t->size(0) == rows, "layer_norm_backward: ", name, " must have shape (",
                rows, ",), got ", t->sizes());
    TORCH_CHECK(t->device() == x.device(), "layer_norm_backward: ", name, " must be on x's device ",
                x.device(), ", got ", t->device());
  }
}

}  // namespace m6
