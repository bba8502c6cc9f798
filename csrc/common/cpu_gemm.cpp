// See cpu_gemm.h.
#include "cpu_gemm.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>

extern "C" {
// The Fortran BLAS interface (column-major, 32-bit integers: the LP64 interface torch links).
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace m6::cpu {
namespace {

// M6_CPU_GEMM=reference (read once, at the first product) runs the reference loops even where a
// BLAS is linked: a test runs the attention op both ways in subprocesses and compares.
bool reference_requested() {
  static const bool requested = [] {
    const char* v = std::getenv("M6_CPU_GEMM");
    return v != nullptr && std::strcmp(v, "reference") == 0;
  }();
  return requested;
}

int as_blas_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), "m6 cpu gemm: ", what, " = ", v,
              " does not fit the BLAS's 32-bit integers");
  return static_cast<int>(v);
}

// op(X)[r][c] of a row-major matrix with leading dimension ld.
template <typename T>
inline T at_op(const T* x, int64_t ld, bool trans, int64_t r, int64_t c) {
  return trans ? x[c * ld + r] : x[r * ld + c];
}

template <typename T>
void gemm_reference(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                    const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t col = 0; col < n; ++col) {
      T acc = 0;
      for (int64_t p = 0; p < k; ++p) acc += at_op(a, lda, trans_a, r, p) * at_op(b, ldb, trans_b, p, col);
      // beta == 0 overwrites C without reading it (BLAS semantics: C may hold NaN garbage).
      c[r * ldc + col] = beta == T(0) ? alpha * acc : alpha * acc + beta * c[r * ldc + col];
    }
  }
}

// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands and sizes.
template <typename T, typename Blas>
void gemm_impl(Blas blas, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (blas == nullptr || reference_requested()) {
    gemm_reference(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int mi = as_blas_int(m, "m"), ni = as_blas_int(n, "n"), ki = as_blas_int(k, "k");
  // The BLAS requires leading dimensions >= 1 even for an empty operand.
  const int la = as_blas_int(std::max<int64_t>(lda, 1), "lda"), lb = as_blas_int(std::max<int64_t>(ldb, 1), "ldb");
  const int lc = as_blas_int(std::max<int64_t>(ldc, 1), "ldc");
  blas(&tb, &ta, &ni, &mi, &ki, &alpha, b, &lb, a, &la, &beta, c, &lc);
}

}  // namespace

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm_impl(sgemm_, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
          const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  gemm_impl(dgemm_, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

bool gemm_uses_blas() { return sgemm_ != nullptr && dgemm_ != nullptr && !reference_requested(); }

}  // namespace m6::cpu
