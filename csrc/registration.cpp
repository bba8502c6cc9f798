// The one registration file of m6_engine._C: schemas of every m6:: op, and the module init.
//
// Kernels register their implementations next to their code, with TORCH_LIBRARY_IMPL(m6, CPU, m)
// in csrc/<op>/<op>_cpu.cpp and TORCH_LIBRARY_IMPL(m6, CUDA, m) in csrc/<op>/<op>_cuda.cu.
// Python (m6_engine/ops/) adds the fake (meta) kernels and autograd.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "common/cpu_gemm.h"
#include "common/cpu_output_cache.h"

TORCH_LIBRARY(m6, m) {
  // scores (B, H, Sq, Sk) fp32|fp16|bf16, or fp64 on the CPU (csrc/common/dtypes.h);
  // prefix_len, valid_len, q_offset (B,) int32|int64 on scores' device, q_offset >= 0.
  // Query row i of sample b sits at absolute position q_offset[b] + i (per sample, so one decode
  // step places rows whose next tokens sit at different positions) and may attend key j iff
  //   j < valid_len[b] and (j < prefix_len[b] or j <= q_offset[b] + i).
  // out = softmax(scale * scores) over the allowed keys, zeros elsewhere; rows with
  // q_offset[b] + i >= valid_len[b] are all zeros. Math in fp32 (fp64 for fp64), out in scores' dtype.
  m.def("masked_softmax(Tensor scores, Tensor prefix_len, Tensor valid_len, float scale, "
        "Tensor q_offset) -> Tensor");
  // grad_scores = scale * out * (grad_out - sum(grad_out * out, -1)), from the saved output.
  // The lengths and offsets only let the kernel skip keys a row never sees (out is zero there).
  m.def("masked_softmax_backward(Tensor grad_out, Tensor out, Tensor prefix_len, "
        "Tensor valid_len, float scale, Tensor q_offset) -> Tensor");
  // Attention under the same mask: q (B, H, Sq, D), k, v (B, H, Sk, D), one dtype (as above);
  // prefix_len, valid_len, q_offset (B,) as above. out = softmax(scale q k^T) v over the allowed
  // keys (B, H, Sq, D; zeros for padded rows), lse (B, H, Sq) fp32 (fp64 for fp64) the per-row
  // log-sum-exp of the scaled scores (-inf for padded rows), all backward needs besides q, k, v, out.
  // dropout_p in [0, 1): probabilities kept with 1 - dropout_p and divided by it, the keep mask a
  // pure function of dropout_seed and (b, h, i, j) (csrc/attention/prefix_lm_attention.h).
  m.def("prefix_lm_attention(Tensor q, Tensor k, Tensor v, Tensor prefix_len, Tensor valid_len, "
        "Tensor q_offset, float scale, float dropout_p, int dropout_seed) -> (Tensor, Tensor)");
  // Returns grad_q, grad_k, grad_v (q's, k's, v's shapes, contiguous), from the saved out and lse.
  m.def("prefix_lm_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, Tensor prefix_len, Tensor valid_len, Tensor q_offset, float scale, float dropout_p, "
        "int dropout_seed) -> (Tensor, Tensor, Tensor)");
  // x (..., N) fp32|fp16|bf16, or fp64 on the CPU; weight, bias (N,) of x's dtype. Returns y (x's
  // shape and dtype) and the per-row mean and rstd = 1/sqrt(var + eps), each of shape
  // (rows,) = x.numel() / N, in fp32 (fp64 for fp64 x).
  m.def("layer_norm(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)");
  // Returns grad_x (x's shape and dtype), grad_weight and grad_bias (N,) in weight's dtype.
  m.def("layer_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor mean, Tensor rstd) "
        "-> (Tensor, Tensor, Tensor)");
  // One AdamW update in place, the host step of ZeRO-Offload (CPU only). Per element, in fp32:
  //   g = grad * grad_scale   (grad_scale folds the loss unscaling and the clip coefficient into
  //                            the step: no separate pass over the gradient)
  //   p <- p * (1 - lr * weight_decay)
  //   m <- beta1 m + (1 - beta1) g          v <- beta2 v + (1 - beta2) g^2
  //   p <- p - lr * (m / (1 - beta1^step)) / (sqrt(v / (1 - beta2^step)) + eps)
  // and, when param_copy is given, param_copy <- p cast to its dtype in the same pass (the fp16 or
  // bf16 weights sent back to the GPU, e.g. into pinned host memory). grad is only read.
  // param, exp_avg, exp_avg_sq, grad: fp32, contiguous, one numel, on the CPU; param_copy: fp32,
  // fp16 or bf16, contiguous, param's numel, on the CPU. step >= 1 (this update's number);
  // lr, eps, weight_decay, grad_scale finite and >= 0; beta1, beta2 in [0, 1).
  m.def("adamw_step_(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor grad, "
        "Tensor(d!)? param_copy, float lr, float beta1, float beta2, float eps, float weight_decay, "
        "int step, float grad_scale) -> ()");
  // Fills out (R, C), or a 1-D out as one row, with the block [row0, row0 + R) x [col0, col0 + C)
  // of a full (rows, full_cols) tensor of N(0, std) draws: element i of the full tensor (flat,
  // row-major) is std * z(key, i) of the counter-based stream csrc/init/philox_normal.h defines
  // (Philox4x32-10 of counter i / 4 under the 64-bit key, Box-Muller in float64), rounded to fp32,
  // then to out's dtype. So a shard drawn alone equals that shard of the drawn full tensor, on every
  // device. out: fp32 | fp16 | bf16, rows contiguous (stride 1 along the last dim), not overlapping;
  // full_cols >= 1, row0, col0 >= 0, col0 + C <= full_cols, (row0 + R) full_cols < 2^62; std
  // finite and > 0; key any int64 (its 64 bits are the key).
  m.def("normal_shard_(Tensor(a!) out, int key, int full_cols, int row0, int col0, float std) -> ()");
  // out (N, 4) int32, contiguous: the four Philox4x32-10 words (as int32 bit patterns) of the
  // counters counter .. counter + N - 1 under key, the integers normal_shard_ transforms.
  m.def("philox4x32_10_(Tensor(a!) out, int key, int counter) -> ()");
}

namespace {

// Which SIMD the CPU kernels were compiled for: the benchmark prints it, because without the
// capability flags at::vec::Vectorized silently compiles to scalar loops.
PyObject* cpu_capability(PyObject*, PyObject*) {
#if defined(CPU_CAPABILITY_AVX512)
  return PyUnicode_FromString("avx512");
#elif defined(CPU_CAPABILITY_AVX2)
  return PyUnicode_FromString("avx2");
#else
  return PyUnicode_FromString("default");
#endif
}

PyObject* with_cuda(PyObject*, PyObject*) {
#if defined(M6_WITH_CUDA)
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

// The CPU output cache (csrc/common/cpu_output_cache.h), as torch.cuda's memory_stats/empty_cache.
PyObject* cpu_output_cache_stats(PyObject*, PyObject*) {
  const m6::cpu::OutputCacheStats s = m6::cpu::output_cache_stats();
  return Py_BuildValue("{s:L,s:L,s:L,s:L,s:L,s:L}", "limit_bytes", static_cast<long long>(s.limit_bytes),
                       "cached_bytes", static_cast<long long>(s.cached_bytes), "cached_blocks",
                       static_cast<long long>(s.cached_blocks), "live_bytes", static_cast<long long>(s.live_bytes),
                       "hits", static_cast<long long>(s.hits), "misses", static_cast<long long>(s.misses));
}

PyObject* empty_cpu_output_cache(PyObject*, PyObject*) {
  m6::cpu::empty_output_cache();
  Py_RETURN_NONE;
}

PyObject* set_cpu_output_cache_limit(PyObject*, PyObject* arg) {
  const long long bytes = PyLong_AsLongLong(arg);
  if (bytes == -1 && PyErr_Occurred()) return nullptr;
  if (bytes < 0) {
    PyErr_Format(PyExc_ValueError, "the CPU output cache limit must be >= 0 bytes, got %lld", bytes);
    return nullptr;
  }
  return PyLong_FromLongLong(m6::cpu::set_output_cache_limit(bytes));
}

// Whether the CPU attention's tile products run in the BLAS libtorch links (csrc/common/cpu_gemm.h).
PyObject* cpu_gemm_uses_blas(PyObject*, PyObject*) {
  if (m6::cpu::gemm_uses_blas()) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS, "SIMD capability of the CPU kernels."},
    {"with_cuda", with_cuda, METH_NOARGS, "True when the CUDA kernels were built."},
    {"cpu_gemm_uses_blas", cpu_gemm_uses_blas, METH_NOARGS, "True when CPU tile products run in the BLAS."},
    {"cpu_output_cache_stats", cpu_output_cache_stats, METH_NOARGS, "Counters of the CPU output cache."},
    {"empty_cpu_output_cache", empty_cpu_output_cache, METH_NOARGS, "Frees the cached CPU output blocks."},
    {"set_cpu_output_cache_limit", set_cpu_output_cache_limit, METH_O,
     "Sets the most free bytes the CPU output cache keeps; returns the old limit."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "m6-engine kernels (m6:: ops).", -1, methods};

}  // namespace

// Importing m6_engine._C runs the static TORCH_LIBRARY registrations above and in the kernels.
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
