// Shared by the CPU and CUDA kernels of m6::masked_softmax: input checks with one wording, and
// the mask rule. See csrc/registration.cpp for the schema and m6_engine/ops/masked_softmax.py
// for the math.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "../common/dtypes.h"

namespace m6 {

// Number of keys query row i of a sample may attend: keys [0, count) are visible, since the
// allowed set {j < valid and (j < prefix or j <= q_offset + i)} is always a prefix of the row.
// Zero for padded rows (q_offset + i >= valid). q_offset is clamped to valid first: a row at or
// past valid is padded either way, and q_offset + i can then not overflow for any q_offset.
C10_HOST_DEVICE inline int64_t visible_keys(int64_t q_offset, int64_t i, int64_t prefix, int64_t valid) {
  const int64_t q_abs = std::min(q_offset, valid) + i;
  if (q_abs >= valid) return 0;
  const int64_t causal_end = q_abs + 1;
  return std::min(valid, std::max(prefix, causal_end));
}

// The (B,) per-sample tensors of op `op`: int32 | int64, shape (B,) with B = ref.size(0), on ref's
// device (`what` names ref in the message).
inline void check_per_sample_args(const at::Tensor& ref, const at::Tensor& prefix_len, const at::Tensor& valid_len,
                                  const at::Tensor& q_offset, const char* op, const char* what) {
  const int64_t batch = ref.size(0);
  const std::pair<const at::Tensor*, const char*> per_sample[] = {
      {&prefix_len, "prefix_len"}, {&valid_len, "valid_len"}, {&q_offset, "q_offset"}};
  for (const auto& [t, name] : per_sample) {
    TORCH_CHECK(t->scalar_type() == at::kInt || t->scalar_type() == at::kLong,
                op, ": ", name, " must be int32 or int64, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 1 && t->size(0) == batch, op, ": ", name,
                " must have shape (B,) = (", batch, ",), got ", t->sizes());
    TORCH_CHECK(t->device() == ref.device(), op, ": ", name, " must be on ",
                what, "'s device ", ref.device(), ", got ", t->device());
  }
}

// Shape, dtype and device checks common to forward and backward. `what` names the tensor whose
// (B, H, Sq, Sk) shape the per-sample tensors refer to.
inline void check_masked_softmax_args(const at::Tensor& scores, const at::Tensor& prefix_len,
                                      const at::Tensor& valid_len, const at::Tensor& q_offset,
                                      const char* what) {
  TORCH_CHECK(scores.dim() == 4, "masked_softmax: ", what, " must be 4-D (B, H, Sq, Sk), got ",
              scores.dim(), "-D");
  TORCH_CHECK(kernel_dtype_ok(scores.scalar_type(), scores.device()), "masked_softmax: ", what, " must be ",
              kernel_dtypes_text(scores.device()), ", got ", scores.scalar_type());
  check_per_sample_args(scores, prefix_len, valid_len, q_offset, "masked_softmax", what);
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

// Value checks on host copies of the per-sample tensors (int64, contiguous, CPU):
// 0 <= prefix_len <= valid_len <= Sk and q_offset >= 0 for every sample (q_offset may lie past
// valid_len: those rows are padding).
inline void check_length_values(const int64_t* prefix, const int64_t* valid, const int64_t* q_offset,
                                int64_t batch, int64_t sk, const char* op = "masked_softmax") {
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(prefix[b] >= 0 && valid[b] >= 0, op, ": lengths must be >= 0, got "
                "prefix_len[", b, "] = ", prefix[b], ", valid_len[", b, "] = ", valid[b]);
    TORCH_CHECK(prefix[b] <= valid[b], op, ": prefix_len must be <= valid_len, got "
                "prefix_len[", b, "] = ", prefix[b], " > valid_len[", b, "] = ", valid[b]);
    TORCH_CHECK(valid[b] <= sk, op, ": valid_len must be <= Sk = ", sk, ", got valid_len[",
                b, "] = ", valid[b]);
    TORCH_CHECK(q_offset[b] >= 0, op, ": q_offset must be >= 0, got q_offset[", b, "] = ",
                q_offset[b]);
  }
}

}  // namespace m6
