// Row-major matrix products for the CPU kernels: C = alpha * op(A) op(B) + beta * C.
//
// The tiled attention kernel multiplies small tiles (64 x 64 x head_dim) thousands of times per
// call; an ATen op per tile would cost more in dispatch than the product itself. These call the
// BLAS that libtorch_cpu links (MKL in the x86 wheels, OpenBLAS in others) directly through its
// Fortran symbols sgemm_ / dgemm_, declared weak: where libtorch exports no BLAS the symbols stay
// null and a plain loop (the reference; M6_CPU_GEMM=reference picks it on purpose, for tests) computes
// the product.
// Callers are already inside at::parallel_for: the BLAS then runs single-threaded in that thread.
#pragma once

#include <cstdint>

namespace m6::cpu {

// A is m x k (trans_a: stored k x m), B is k x n (trans_b: stored n x k), C is m x n; every
// matrix row-major with the given leading dimension (row stride, in elements). m, n, k < 2^31.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
          const double* b, int64_t ldb, double beta, double* c, int64_t ldc);

// True when the products above run in the BLAS (false: the reference loops).
bool gemm_uses_blas();

}  // namespace m6::cpu
