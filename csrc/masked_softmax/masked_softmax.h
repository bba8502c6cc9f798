// Shared by the CPU and CUDA kernels of m6::masked_softmax: input checks with one wording, and
// the mask rule. See csrc/registration.cpp for the schema and m6_engine/ops/masked_softmax.py
// for the math.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

#include "../common/dtypes.h"

namespace m6 {

// Number of keys query row `q_abs` (absolute position) may attend: keys [0, count) are visible,
// since the allowed set {j < valid and (j < prefix or j <= q_abs)} is always a prefix of the row.
// Zero for padded rows (q_abs >= valid).
C10_HOST_DEVICE inline int64_t visible_keys(int64_t q_abs, int64_t prefix, int64_t valid) {
  if (q_abs >= valid) return 0;
  const int64_t causal_end = q_abs + 1;
  return std::min(valid, std::max(prefix, causal_end));
}

// Shape, dtype and device checks common to forward and backward. `what` names the tensor whose
// (B, H, Sq, Sk) shape the lengths refer to.
inline void check_masked_softmax_args(const at::Tensor& scores, const at::Tensor& prefix_len,
                                      const at::Tensor& valid_len, int64_t q_offset,
                                      const char* what) {
  TORCH_CHECK(scores.dim() == 4, "masked_softmax: ", what, " must be 4-D (B, H, Sq, Sk), got ",
              scores.dim(), "-D");
  TORCH_CHECK(kernel_dtype_ok(scores.scalar_type(), scores.device()), "masked_softmax: ", what, " must be ",
              kernel_dtypes_text(scores.device()), ", got ", scores.scalar_type());
  TORCH_CHECK(q_offset >= 0, "masked_softmax: q_offset must be >= 0, got ", q_offset);
  const int64_t batch = scores.size(0);
  for (const auto* t : {&prefix_len, &valid_len}) {
    const char* name = (t == &prefix_len) ? "prefix_len" : "valid_len";
    TORCH_CHECK(t->scalar_type() == at::kInt || t->scalar_type() == at::kLong,
                "masked_softmax: ", name, " must be int32 or int64, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 1 && t->size(0) == batch, "masked_softmax: ", name,
                " must have shape (B,) = (", batch, ",), got ", t->sizes());
    TORCH_CHECK(t->device() == scores.device(), "masked_softmax: ", name, " must be on ",
                what, "'s device ", scores.device(), ", got ", t->device());
  }
}

// Backward only: grad_out must match the saved out in shape, dtype and device.
inline void check_masked_softmax_backward_args(const at::Tensor& grad_out, const at::Tensor& out) {
  TORCH_CHECK(grad_out.sizes() == out.sizes(), "masked_softmax_backward: grad_out must have out's shape ",
              out.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == out.scalar_type(), "masked_softmax_backward: grad_out must have "
              "out's dtype ", out.scalar_type(), ", got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == out.device(), "masked_softmax_backward: grad_out must be on out's device ",
              out.device(), ", got ", grad_out.device());
}

// Value checks on host copies of the lengths (int64, contiguous, CPU):
// 0 <= prefix_len <= valid_len <= Sk for every sample.
inline void check_length_values(const int64_t* prefix, const int64_t* valid, int64_t batch,
                                int64_t sk) {
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(prefix[b] >= 0 && valid[b] >= 0, "masked_softmax: lengths must be >= 0, got "
                "prefix_len[", b, "] = ", prefix[b], ", valid_len[", b, "] = ", valid[b]);
    TORCH_CHECK(prefix[b] <= valid[b], "masked_softmax: prefix_len must be <= valid_len, got "
                "prefix_len[", b, "] = ", prefix[b], " > valid_len[", b, "] = ", valid[b]);
    TORCH_CHECK(valid[b] <= sk, "masked_softmax: valid_len must be <= Sk = ", sk, ", got valid_len[",
                b, "] = ", valid[b]);
  }
}

}  // namespace m6
