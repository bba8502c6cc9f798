// The storage dtypes the m6:: kernels accept, per device, with one wording for the error.
//
// float32, float16 and bfloat16 everywhere (the speed paths, math in fp32); float64 on the CPU
// only, where a plain double loop is the exact path that torch.autograd.gradcheck needs. The CUDA
// kernels do their math in fp32, so a float64 instantiation there would not be exact: they reject it.
// m6_engine/ops/_dtypes.py mirrors this for the fake kernels.
#pragma once

#include <ATen/ATen.h>

namespace m6 {

inline bool kernel_dtype_ok(at::ScalarType dtype, const at::Device& device) {
  if (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16) return true;
  return dtype == at::kDouble && !device.is_cuda();
}

// The accepted dtypes as the error names them.
inline const char* kernel_dtypes_text(const at::Device& device) {
  return device.is_cuda() ? "float32, float16 or bfloat16 (float64 is CPU-only)"
                          : "float32, float64, float16 or bfloat16";
}

}  // namespace m6
