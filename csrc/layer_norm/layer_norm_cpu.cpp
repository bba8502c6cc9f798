// CPU kernels of m6::layer_norm and m6::layer_norm_backward (schema: csrc/registration.cpp).
//
// Shapes: x, y, grad_y, grad_x (rows, N) viewed from (..., N), contiguous inside the kernel;
// weight, bias, grad_weight, grad_bias (N,); mean, rstd (rows,) fp32 (fp64 for fp64 x). N up to 65536.
// Forward, per row:  mean = sum(x) / N;  var = sum((x - mean)^2) / N;  rstd = 1 / sqrt(var + eps);
//                    y = (x - mean) * rstd * weight + bias.
// Backward, per row: xhat = (x - mean) * rstd;  g = dy * weight;
//                    dx = rstd * (g - sum(g) / N - xhat * sum(g * xhat) / N);
//                    dweight = sum_rows(dy * xhat);  dbias = sum_rows(dy).
//
// Statistics in fp32 lanes, not Welford: one pass of sums shifted by a pivot near the mean (the
// mean of the row's first elements) gives the variance without the cancellation of
// sum(x^2) - N mean^2 and without Welford's per-element division; a row whose pivot turns out
// far from its mean (checked from the sums themselves) gets an exact second pass around the mean,
// which is cheap because a CPU row (at most 256 KiB) is still in cache. Sums run in blocks of
// kBlock elements whose totals are added in double, which keeps the error flat up to N = 65536.
// The (N,) weight/bias gradients: rows are cut into a fixed number of chunks that depends only on
// the shape (not on the thread count), each chunk sums its rows into its own fp32 partial row, and
// the partials are then added in chunk order: parallel, and bitwise reproducible run to run.
// fp64 x takes plain double loops (two-pass statistics, fp64 weight, statistics and partials) with
// the same row and chunk plan: the exact path for gradcheck and reference checks, not a speed path.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/cpu_output_cache.h"
#include "../common/cpu_vec.h"
#include "layer_norm.h"

namespace m6 {
namespace {

using cpu::Vec;
using cpu::kVecWidth;
using cpu::load_n;

constexpr int64_t kBlock = 4096;            // elements summed in fp32 lanes before a double fold
constexpr int64_t kPivot = 64;              // elements whose mean is the variance pass's pivot
constexpr double kMaxShiftRatio = 2.0;      // largest s2 / n / var accepted from the shifted pass
constexpr int64_t kElementsPerTask = 32768;  // forward work per parallel task
constexpr int64_t kMaxChunks = 64;          // row chunks of the weight/bias gradient reduction
constexpr int64_t kMaxPartialFloats = int64_t{1} << 21;  // cap of chunks * N (8 MiB per partial)

// Type of the weight, bias, statistics and partial sums for storage type T: fp32, fp64 for fp64.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Two sums over a row: f(j, count, acc0, acc1) adds the terms of vector [j, j + count) into the
// fp32 accumulators (count < width only at the row's end, where f must add 0 for lanes >= count).
// Four accumulator pairs in flight hide the add latency; blocks of kBlock elements are folded
// into double totals.
template <typename F>
std::pair<double, double> reduce_row(int64_t n, const F& f) {
  constexpr int64_t kStep = 4 * kVecWidth;
  double total0 = 0.0, total1 = 0.0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    Vec a[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
    Vec b[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
    int64_t j = start;
    for (; j + kStep <= end; j += kStep) {
      for (int k = 0; k < 4; ++k) f(j + k * kVecWidth, kVecWidth, a[k], b[k]);
    }
    for (; j < end; j += kVecWidth) f(j, std::min<int64_t>(kVecWidth, end - j), a[0], b[0]);
    total0 += cpu::reduce_add((a[0] + a[1]) + (a[2] + a[3]));
    total1 += cpu::reduce_add((b[0] + b[1]) + (b[2] + b[3]));
  }
  return {total0, total1};
}

// Mean and variance of x[0:n), accumulated in fp32 lanes (see reduce_row).
// One pass of shifted sums s1 = sum(x - k), s2 = sum((x - k)^2), with the pivot k the mean of the
// row's first kPivot elements: var = s2 / n - (s1 / n)^2. Its rounding error is about
// eps * s2 / n, i.e. eps * var * (1 + (mean - k)^2 / var), as small as a two-pass variance's while
// k is within a standard deviation of the mean. Where it is not (s2 / n > kMaxShiftRatio * var:
// a row that drifts along its length), the variance is summed again around the exact mean.
std::pair<float, float> row_moments(const float* x, int64_t n) {
  const int64_t head = std::min(n, kPivot);
  const float pivot = static_cast<float>(
      reduce_row(head, [&](int64_t j, int64_t c, Vec& sum, Vec&) { sum += load_n(x + j, c); }).first / head);
  const Vec vk(pivot);
  const auto [s1, s2] = reduce_row(n, [&](int64_t j, int64_t c, Vec& sum, Vec& sq) {
    const Vec d = cpu::head_lanes(load_n(x + j, c) - vk, c, 0.f);
    sum += d;
    sq = at::vec::fmadd(d, d, sq);
  });
  const double shift = s1 / n;
  const double mean = pivot + shift;
  double var = std::max(0.0, s2 / n - shift * shift);
  if (s2 / n > kMaxShiftRatio * var) {
    const Vec vmean(static_cast<float>(mean));
    var = reduce_row(n, [&](int64_t j, int64_t c, Vec& sq, Vec&) {
      const Vec d = cpu::head_lanes(load_n(x + j, c) - vmean, c, 0.f);
      sq = at::vec::fmadd(d, d, sq);
    }).first / n;
  }
  return {static_cast<float>(mean), static_cast<float>(var)};
}

// y[0:n) = layer norm of x[0:n); y may alias x. Writes the row's mean and rstd.
void forward_row(const float* x, float* y, const float* w, const float* b, int64_t n, float eps,
                 float* mean_out, float* rstd_out) {
  const auto [mean, var] = row_moments(x, n);
  const float rstd = 1.f / std::sqrt(var + eps);
  const Vec vmean(mean), vrstd(rstd);
  cpu::for_each_vector(n, [&](int64_t j, int64_t c) {
    const Vec xhat = (load_n(x + j, c) - vmean) * vrstd;
    cpu::store_n(at::vec::fmadd(xhat, load_n(w + j, c), load_n(b + j, c)), y + j, c);
  });
  *mean_out = mean;
  *rstd_out = rstd;
}

// The fp64 rows: y[0:n) = layer norm of x[0:n), statistics by two passes in double.
void forward_row_fp64(const double* x, double* y, const double* w, const double* b, int64_t n, double eps,
                      double* mean_out, double* rstd_out) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) sum += x[j];
  const double mean = sum / n;
  double sq = 0.0;
  for (int64_t j = 0; j < n; ++j) sq += (x[j] - mean) * (x[j] - mean);
  const double rstd = 1.0 / std::sqrt(sq / n + eps);
  for (int64_t j = 0; j < n; ++j) y[j] = (x[j] - mean) * rstd * w[j] + b[j];
  *mean_out = mean;
  *rstd_out = rstd;
}

// The fp64 rows: dx[0:n) of one row, and dw_acc += dy * xhat, db_acc += dy (set instead of added
// for the first row of a chunk).
void backward_row_fp64(const double* dy, const double* x, const double* w, double mean, double rstd,
                       double* dx, double* dw_acc, double* db_acc, int64_t n, bool first) {
  double sum_g = 0.0, sum_gx = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double g = dy[j] * w[j];
    sum_g += g;
    sum_gx += g * (x[j] - mean) * rstd;
  }
  const double mean_g = sum_g / n, mean_gx = sum_gx / n;
  for (int64_t j = 0; j < n; ++j) {
    const double xhat = (x[j] - mean) * rstd;
    dx[j] = rstd * (dy[j] * w[j] - mean_g - xhat * mean_gx);
    dw_acc[j] = (first ? 0.0 : dw_acc[j]) + dy[j] * xhat;
    db_acc[j] = (first ? 0.0 : db_acc[j]) + dy[j];
  }
}

// One row of the backward: its gradient rows and statistics (dx may alias dy).
struct BackwardRow {
  const float* dy;
  const float* x;
  float* dx;
  float mean, rstd;
};

// dx of R rows (1 or 2), and dw_acc += sum_rows dy * xhat, db_acc += sum_rows dy (starting from 0
// instead for the first rows of a chunk: no zero-fill pass over the partial rows). Two rows at a
// time share the loads of weight and the load and store of the partial rows.
// Per row, with A = sum(g) / N and C = sum(g * xhat) / N:  dx = rstd * g - rstd * A - rstd * C * xhat.
template <int R, bool kFirstRows>
void backward_block(const BackwardRow* rows, const float* w, int64_t n, float* dw_acc, float* db_acc) {
  Vec vmean[R], vrstd[R], v_ra[R], v_rc[R];
  for (int k = 0; k < R; ++k) {
    const BackwardRow& row = rows[k];
    vmean[k] = Vec(row.mean);
    vrstd[k] = Vec(row.rstd);
    const auto [sum_g, sum_gd] = reduce_row(n, [&](int64_t j, int64_t c, Vec& acc_g, Vec& acc_gd) {
      const Vec g = load_n(row.dy + j, c) * load_n(w + j, c);  // zero past the row (zero-filled dy)
      acc_g += g;
      acc_gd = at::vec::fmadd(g, load_n(row.x + j, c) - vmean[k], acc_gd);  // sum of g * xhat / rstd
    });
    v_ra[k] = Vec(static_cast<float>(-row.rstd * sum_g / n));              // -rstd * A
    v_rc[k] = Vec(static_cast<float>(-row.rstd * row.rstd * sum_gd / n));  // -rstd * C
  }
  cpu::for_each_vector(n, [&](int64_t j, int64_t c) {
    const Vec vw = load_n(w + j, c);
    Vec dw = kFirstRows ? Vec(0.f) : load_n(dw_acc + j, c);
    Vec db = kFirstRows ? Vec(0.f) : load_n(db_acc + j, c);
    for (int k = 0; k < R; ++k) {
      const Vec vdy = load_n(rows[k].dy + j, c);
      const Vec xhat = (load_n(rows[k].x + j, c) - vmean[k]) * vrstd[k];
      cpu::store_n(at::vec::fmadd(vdy * vw, vrstd[k], at::vec::fmadd(xhat, v_rc[k], v_ra[k])), rows[k].dx + j, c);
      dw = at::vec::fmadd(vdy, xhat, dw);
      db += vdy;
    }
    cpu::store_n(dw, dw_acc + j, c);
    cpu::store_n(db, db_acc + j, c);
  });
}

// backward_block for `count` (1 or 2) rows.
void backward_rows_of_chunk(const BackwardRow* rows, int count, bool first, const float* w, int64_t n,
                            float* dw_acc, float* db_acc) {
  if (count == 2) {
    first ? backward_block<2, true>(rows, w, n, dw_acc, db_acc) : backward_block<2, false>(rows, w, n, dw_acc, db_acc);
  } else {
    first ? backward_block<1, true>(rows, w, n, dw_acc, db_acc) : backward_block<1, false>(rows, w, n, dw_acc, db_acc);
  }
}

template <typename T>
void forward_rows(const T* x, T* y, const acc_t<T>* w, const acc_t<T>* b, acc_t<T>* mean, acc_t<T>* rstd,
                  int64_t rows, int64_t n, acc_t<T> eps) {
  constexpr bool kWide = std::is_same_v<T, float> || std::is_same_v<T, double>;
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / n);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(kWide ? 0 : n);  // fp32 copy of a 16-bit row
    for (int64_t r = begin; r < end; ++r) {
      if constexpr (std::is_same_v<T, double>) {
        forward_row_fp64(x + r * n, y + r * n, w, b, n, eps, mean + r, rstd + r);
      } else if constexpr (std::is_same_v<T, float>) {
        forward_row(x + r * n, y + r * n, w, b, n, eps, mean + r, rstd + r);
      } else {
        cpu::load_row_as_float(x + r * n, buf.data(), n);
        forward_row(buf.data(), buf.data(), w, b, n, eps, mean + r, rstd + r);
        cpu::store_row_from_float(buf.data(), y + r * n, n);
      }
    }
  });
}

// Rows are cut into `chunks` consecutive runs of `rows_per_chunk` (the last may be shorter).
struct ChunkPlan {
  int64_t chunks, rows_per_chunk;
};

ChunkPlan plan_chunks(int64_t rows, int64_t n) {
  const int64_t max_chunks = std::clamp<int64_t>(kMaxPartialFloats / n, 1, kMaxChunks);
  if (rows == 0) return {0, 1};
  const int64_t chunks = std::min(max_chunks, rows);
  const int64_t per = std::max<int64_t>(2, (rows + chunks - 1) / chunks);  // >= 2: rows pair up
  return {(rows + per - 1) / per, per};
}

// grad_x rows, and per-chunk partial sums dw_part, db_part (chunks, n) in fp32. Rows go two by
// two through backward_block, in order, so the partial sums do not depend on the pairing.
template <typename T>
void backward_rows(const T* dy, const T* x, const acc_t<T>* w, const acc_t<T>* mean, const acc_t<T>* rstd,
                   T* dx, acc_t<T>* dw_part, acc_t<T>* db_part, int64_t rows, int64_t n, ChunkPlan plan) {
  constexpr bool kFloat = std::is_same_v<T, float>;
  at::parallel_for(0, plan.chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<float> buf(kFloat ? 0 : 4 * n);  // fp32 (dy, x) of two 16-bit rows
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {  // every chunk has >= 1 row (plan_chunks)
      const int64_t row_begin = c * plan.rows_per_chunk;
      const int64_t row_end = std::min(rows, row_begin + plan.rows_per_chunk);
      for (int64_t r = row_begin; r < row_end; r += 2) {
        const int count = r + 1 < row_end ? 2 : 1;
        BackwardRow block[2];
        for (int k = 0; k < count; ++k) {
          const int64_t offset = (r + k) * n;
          if constexpr (kFloat) {
            block[k] = {dy + offset, x + offset, dx + offset, mean[r + k], rstd[r + k]};
          } else {
            float* dyf = buf.data() + 2 * k * n;
            cpu::load_row_as_float(dy + offset, dyf, n);
            cpu::load_row_as_float(x + offset, dyf + n, n);
            block[k] = {dyf, dyf + n, dyf, mean[r + k], rstd[r + k]};
          }
        }
        backward_rows_of_chunk(block, count, r == row_begin, w, n, dw_part + c * n, db_part + c * n);
        if constexpr (!kFloat) {
          for (int k = 0; k < count; ++k) cpu::store_row_from_float(block[k].dx, dx + (r + k) * n, n);
        }
      }
    }
  });
}

// The fp64 rows: the same chunks, with fp64 partial sums; rows one by one through backward_row_fp64.
template <>
void backward_rows<double>(const double* dy, const double* x, const double* w, const double* mean,
                           const double* rstd, double* dx, double* dw_part, double* db_part, int64_t rows,
                           int64_t n, ChunkPlan plan) {
  at::parallel_for(0, plan.chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      const int64_t row_begin = c * plan.rows_per_chunk;
      const int64_t row_end = std::min(rows, row_begin + plan.rows_per_chunk);
      for (int64_t r = row_begin; r < row_end; ++r) {
        backward_row_fp64(dy + r * n, x + r * n, w, mean[r], rstd[r], dx + r * n, dw_part + c * n,
                          db_part + c * n, n, r == row_begin);
      }
    }
  });
}

// out[j] = sum_c part[c, j] in chunk order, for j < n (parallel over columns).
void sum_partials(const double* part, double* out, int64_t chunks, int64_t n) {
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      double acc = 0.0;
      for (int64_t k = 0; k < chunks; ++k) acc += part[k * n + j];
      out[j] = acc;
    }
  });
}

void sum_partials(const float* part, float* out, int64_t chunks, int64_t n) {
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; j += kVecWidth) {
      const int64_t c = std::min<int64_t>(kVecWidth, end - j);
      Vec acc(0.f);
      for (int64_t k = 0; k < chunks; ++k) acc += load_n(part + k * n + j, c);
      cpu::store_n(acc, out + j, c);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                                              const at::Tensor& bias, double eps) {
  check_layer_norm_args(x_in, weight, bias);
  check_layer_norm_eps(eps);
  const at::Tensor x = x_in.contiguous();                  // (..., N)
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  const auto acc = x.options().dtype(layer_norm_stats_dtype(x.scalar_type()));  // fp32, fp64 for fp64
  const at::Tensor w = weight.to(acc.dtype()).contiguous();  // (N,)
  const at::Tensor b = bias.to(acc.dtype()).contiguous();    // (N,)
  at::Tensor y = cpu::empty_output(x.sizes(), x.options());       // (..., N)
  at::Tensor mean = at::empty({rows}, acc);
  at::Tensor rstd = at::empty({rows}, acc);
  cpu::dispatch_storage_type(x.scalar_type(), "layer_norm", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_type = acc_t<scalar_t>;
    forward_rows<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                           w.const_data_ptr<acc_type>(), b.const_data_ptr<acc_type>(),
                           mean.mutable_data_ptr<acc_type>(), rstd.mutable_data_ptr<acc_type>(), rows, n,
                           static_cast<acc_type>(eps));
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& mean_in,
    const at::Tensor& rstd_in) {
  check_layer_norm_args(x_in, weight, weight);  // backward has no bias: weight stands in for it
  check_layer_norm_backward_args(grad_y, x_in, mean_in, rstd_in);
  const at::Tensor x = x_in.contiguous();                  // (..., N)
  const at::Tensor dy = grad_y.contiguous();               // (..., N)
  const at::Tensor mean = mean_in.contiguous();            // (rows,)
  const at::Tensor rstd = rstd_in.contiguous();            // (rows,)
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  const auto acc = x.options().dtype(layer_norm_stats_dtype(x.scalar_type()));  // fp32, fp64 for fp64
  const at::Tensor w = weight.to(acc.dtype()).contiguous();  // (N,)
  const ChunkPlan plan = plan_chunks(rows, n);
  at::Tensor dw_part = at::empty({plan.chunks, n}, acc);   // (chunks, N)
  at::Tensor db_part = at::empty({plan.chunks, n}, acc);   // (chunks, N)
  at::Tensor dx = cpu::empty_output(x.sizes(), x.options());      // (..., N)
  at::Tensor dw = at::empty({n}, acc);
  at::Tensor db = at::empty({n}, acc);
  cpu::dispatch_storage_type(x.scalar_type(), "layer_norm_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_type = acc_t<scalar_t>;
    backward_rows<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                            w.const_data_ptr<acc_type>(), mean.const_data_ptr<acc_type>(),
                            rstd.const_data_ptr<acc_type>(), dx.mutable_data_ptr<scalar_t>(),
                            dw_part.mutable_data_ptr<acc_type>(), db_part.mutable_data_ptr<acc_type>(), rows, n,
                            plan);
    sum_partials(dw_part.const_data_ptr<acc_type>(), dw.mutable_data_ptr<acc_type>(), plan.chunks, n);
    sum_partials(db_part.const_data_ptr<acc_type>(), db.mutable_data_ptr<acc_type>(), plan.chunks, n);
  });
  return {dx, dw.to(weight.scalar_type()), db.to(weight.scalar_type())};
}

}  // namespace
}  // namespace m6

TORCH_LIBRARY_IMPL(m6, CPU, m) {
  m.impl("layer_norm", &m6::layer_norm_cpu);
  m.impl("layer_norm_backward", &m6::layer_norm_backward_cpu);
}
