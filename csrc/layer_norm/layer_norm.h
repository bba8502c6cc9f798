// Shared by the CPU and CUDA kernels of m6::layer_norm: input checks with one wording.
// See csrc/registration.cpp for the schema and m6_engine/ops/layer_norm.py for the math.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace m6 {

// The largest hidden size the kernels support.
constexpr int64_t kLayerNormMaxHidden = 65536;

inline void check_layer_norm_args(const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& bias) {
  TORCH_CHECK(x.dim() >= 1, "layer_norm: x must have at least one dim");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "layer_norm: x must be float32, float16 or bfloat16, got ", dtype);
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

}  // namespace m6
