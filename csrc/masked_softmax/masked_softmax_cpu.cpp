// CPU kernels of m6::masked_softmax and m6::masked_softmax_backward (schema: csrc/registration.cpp).
//
// Shapes: scores, out, grad (B, H, Sq, Sk) fp32 | fp16 | bf16 | fp64, contiguous inside the kernel;
// prefix_len, valid_len, q_offset (B,) int32 | int64, copied to int64 on the host.
// Row r = ((b * H) + h) * Sq + i sees keys [0, n) with
// n = visible_keys(q_offset[b], i, prefix_len[b], valid_len[b]) (the allowed set is always a prefix
// of the row). Per row, forward:
//   m = max_j<n scale*x_j;  e_j = exp(scale*x_j - m);  y_j = e_j / sum_j<n e_j;  y_j = 0 for j >= n
// backward (from the saved y only; y = 0 past n, so those dx are 0 without reading anything):
//   dx_j = scale * y_j * (dy_j - sum_k<n dy_k * y_k)
// Rows are spread over threads with at::parallel_for; each row is read from memory once (the max
// pass brings it into cache, the exp pass re-reads it from there) and written once, and no S x S
// temporary exists. While a row is computed the next row's visible keys are prefetched (the
// hardware prefetcher stalls at the gaps a causal mask leaves), and fp32 outputs of 16 MiB or more
// are written with non-temporal stores (cpu_vec.h). Measured on the 2-core dev machine at
// (8, 16, 528, 528), prefix 272, forward: 20.7 ms (AVX2) -> 17.1 (AVX-512) -> 12.3 (the prefetch)
// -> 9.6 ms (fast_exp, csrc/common/cpu_vec.h).
// fp16/bf16 rows are widened into a per-task fp32 buffer of Sk floats.
// fp64 rows take a plain scalar loop in double (exp to 1 ulp): the exact path for gradcheck and
// reference checks, not a speed path.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../common/cpu_output_cache.h"
#include "../common/cpu_vec.h"
#include "masked_softmax.h"

namespace m6 {
namespace {

using cpu::Vec;
using cpu::kVecWidth;
using cpu::fast_exp;
using cpu::load_n;

// Elements of work per parallel task: big enough to amortise the task start, small enough that
// short rows still spread over all threads.
constexpr int64_t kElementsPerTask = 16384;

struct Dims {
  int64_t heads, sq, sk;
};

// max_{j<n} scale * x_j, n >= 1, as scale * max_j x_j (scale * min_j x_j for a negative scale):
// the same float, since multiplying by a constant is monotonic and rounds each product alike, with
// one instruction per vector instead of two.
float scaled_row_max(const float* x, int64_t n, float scale) {
  const bool flip = scale < 0.f;
  const auto pick = [flip](const Vec& a, const Vec& b) { return flip ? cpu::min_fast(a, b) : cpu::max_fast(a, b); };
  const Vec first(x[0]);  // a lane value that cannot change the result
  Vec m0(first), m1(first), m2(first), m3(first);
  int64_t j = 0;
  for (; j + 4 * kVecWidth <= n; j += 4 * kVecWidth) {
    m0 = pick(m0, Vec::loadu(x + j));
    m1 = pick(m1, Vec::loadu(x + j + kVecWidth));
    m2 = pick(m2, Vec::loadu(x + j + 2 * kVecWidth));
    m3 = pick(m3, Vec::loadu(x + j + 3 * kVecWidth));
  }
  for (; j + kVecWidth <= n; j += kVecWidth) m0 = pick(m0, Vec::loadu(x + j));
  if (j < n) m1 = pick(m1, cpu::head_lanes(Vec::loadu(x + j, n - j), n - j, x[0]));
  const Vec m = pick(pick(m0, m1), pick(m2, m3));
  float lanes[kVecWidth];
  m.store(lanes);
  float best = lanes[0];
  for (int64_t k = 1; k < kVecWidth; ++k) best = flip ? std::min(best, lanes[k]) : std::max(best, lanes[k]);
  return scale * best;
}

// y_j = exp(scale * x_j - m) for j < n; returns their sum. y may alias x.
float exp_row_and_sum(const float* x, float* y, int64_t n, float scale, float m) {
  const Vec vs(scale), vneg(-m);
  Vec s0(0.f), s1(0.f);
  int64_t j = 0;
  for (; j + 2 * kVecWidth <= n; j += 2 * kVecWidth) {
    const Vec e0 = fast_exp(at::vec::fmadd(Vec::loadu(x + j), vs, vneg));
    const Vec e1 = fast_exp(at::vec::fmadd(Vec::loadu(x + j + kVecWidth), vs, vneg));
    e0.store(y + j);
    e1.store(y + j + kVecWidth);
    s0 += e0;
    s1 += e1;
  }
  for (; j + kVecWidth <= n; j += kVecWidth) {
    const Vec e = fast_exp(at::vec::fmadd(Vec::loadu(x + j), vs, vneg));
    e.store(y + j);
    s0 += e;
  }
  if (j < n) {
    const int64_t rest = n - j;
    const Vec e = fast_exp(at::vec::fmadd(Vec::loadu(x + j, rest), vs, vneg));
    e.store(y + j, rest);
    s1 += cpu::head_lanes(e, rest, 0.f);  // lanes past n hold exp of a zero-filled load
  }
  return cpu::reduce_add(s0 + s1);
}

// y[0:len) = softmax(scale * x[0:n)) followed by zeros, 0 <= n <= len. `scratch` (>= n floats,
// cache-resident) holds the exponentials, so y is written exactly once. x, y and scratch may all
// be the same buffer. kStream: y is written with non-temporal stores (cpu::write_row).
template <bool kStream>
void softmax_row(const float* x, float* y, float* scratch, int64_t n, int64_t len, float scale) {
  float inv_sum = 0.f;
  if (n > 0) {
    const float m = scaled_row_max(x, n, scale);
    inv_sum = 1.f / exp_row_and_sum(x, scratch, n, scale, m);
  }
  const Vec vinv(inv_sum);
  cpu::write_row<kStream>(y, n, len, [&](int64_t j, int64_t c) { return load_n(scratch + j, c) * vinv; });
}

// sum_{j<n} dy_j * y_j.
float row_dot(const float* dy, const float* y, int64_t n) {
  Vec d0(0.f), d1(0.f);
  int64_t j = 0;
  for (; j + 2 * kVecWidth <= n; j += 2 * kVecWidth) {
    d0 = at::vec::fmadd(Vec::loadu(dy + j), Vec::loadu(y + j), d0);
    d1 = at::vec::fmadd(Vec::loadu(dy + j + kVecWidth), Vec::loadu(y + j + kVecWidth), d1);
  }
  for (; j < n; j += kVecWidth) {
    const int64_t c = std::min<int64_t>(kVecWidth, n - j);
    d0 = at::vec::fmadd(load_n(dy + j, c), load_n(y + j, c), d0);  // zero-filled past n
  }
  return cpu::reduce_add(d0 + d1);
}

// dx[0:len) = scale * y * (dy - sum(dy * y)) over [0, n), zeros past n. dx may alias dy or y.
// kStream: dx is written with non-temporal stores (cpu::write_row).
template <bool kStream>
void softmax_backward_row(const float* dy, const float* y, float* dx, int64_t n, int64_t len, float scale) {
  const Vec vs(scale), vsdot(n > 0 ? scale * row_dot(dy, y, n) : 0.f);
  cpu::write_row<kStream>(dx, n, len, [&](int64_t j, int64_t c) {
    return load_n(y + j, c) * at::vec::fmsub(load_n(dy + j, c), vs, vsdot);
  });
}

// The fp64 rows: y[0:len) = softmax(scale * x[0:n)) followed by zeros, in double throughout.
void softmax_row_fp64(const double* x, double* y, int64_t n, int64_t len, double scale) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, scale * x[j]);
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    y[j] = std::exp(scale * x[j] - m);
    sum += y[j];
  }
  for (int64_t j = 0; j < n; ++j) y[j] /= sum;
  cpu::zero_row(y + n, len - n);
}

// The fp64 rows: dx[0:len) = scale * y * (dy - sum(dy * y)) over [0, n), zeros past n.
void softmax_backward_row_fp64(const double* dy, const double* y, double* dx, int64_t n, int64_t len,
                               double scale) {
  double dot = 0.0;
  for (int64_t j = 0; j < n; ++j) dot += dy[j] * y[j];
  for (int64_t j = 0; j < n; ++j) dx[j] = scale * y[j] * (dy[j] - dot);
  cpu::zero_row(dx + n, len - n);
}

// The per-sample tensors as host int64 arrays of B values.
struct HostLengths {
  const int64_t* prefix;
  const int64_t* valid;
  const int64_t* q_offset;
};

// Number of visible keys of row r (see the file comment).
inline int64_t row_keys(int64_t r, const Dims& d, const HostLengths& lens) {
  const int64_t b = r / (d.heads * d.sq);
  const int64_t i = r % d.sq;
  return visible_keys(lens.q_offset[b], i, lens.prefix[b], lens.valid[b]);
}

inline int64_t rows_per_task(int64_t sk) { return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(sk, 1)); }

template <typename T>
void forward_rows(const T* x, T* y, int64_t rows, const Dims& d, const HostLengths& lens,
                  double scale_fp64, bool stream) {
  constexpr bool kFp64 = std::is_same_v<T, double>;
  const float scale = static_cast<float>(scale_fp64);
  at::parallel_for(0, rows, rows_per_task(d.sk), [&](int64_t begin, int64_t end) {
    // The exponentials (fp32), or the fp32 copy of a 16-bit row; fp64 rows need none.
    std::vector<float> buf(kFp64 ? 0 : d.sk);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * d.sk;
      T* yr = y + r * d.sk;
      const int64_t n = row_keys(r, d, lens);
      if (r + 1 < end) cpu::prefetch_row(xr + d.sk, sizeof(T) * row_keys(r + 1, d, lens));
      if constexpr (kFp64) {
        softmax_row_fp64(xr, yr, n, d.sk, scale_fp64);
      } else if constexpr (std::is_same_v<T, float>) {
        if (stream) {
          softmax_row<true>(xr, yr, buf.data(), n, d.sk, scale);
        } else {
          softmax_row<false>(xr, yr, buf.data(), n, d.sk, scale);
        }
      } else {
        cpu::load_row_as_float(xr, buf.data(), n);
        softmax_row<false>(buf.data(), buf.data(), buf.data(), n, n, scale);
        cpu::store_row_from_float(buf.data(), yr, n);
        cpu::zero_row(yr + n, d.sk - n);
      }
    }
    if (stream) cpu::stream_fence();
  });
}

template <typename T>
void backward_rows(const T* dy, const T* y, T* dx, int64_t rows, const Dims& d, const HostLengths& lens,
                   double scale_fp64, bool stream) {
  constexpr bool kWide = std::is_same_v<T, float> || std::is_same_v<T, double>;  // no fp32 copies
  const float scale = static_cast<float>(scale_fp64);
  at::parallel_for(0, rows, rows_per_task(d.sk), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(kWide ? 0 : 2 * d.sk);  // fp32 dy and y rows
    for (int64_t r = begin; r < end; ++r) {
      const int64_t offset = r * d.sk;
      const int64_t n = row_keys(r, d, lens);
      if (r + 1 < end) {
        const int64_t next_bytes = sizeof(T) * row_keys(r + 1, d, lens);
        cpu::prefetch_row(dy + offset + d.sk, next_bytes);
        cpu::prefetch_row(y + offset + d.sk, next_bytes);
      }
      if constexpr (std::is_same_v<T, double>) {
        softmax_backward_row_fp64(dy + offset, y + offset, dx + offset, n, d.sk, scale_fp64);
      } else if constexpr (std::is_same_v<T, float>) {
        if (stream) {
          softmax_backward_row<true>(dy + offset, y + offset, dx + offset, n, d.sk, scale);
        } else {
          softmax_backward_row<false>(dy + offset, y + offset, dx + offset, n, d.sk, scale);
        }
      } else {
        float* dyf = buf.data();
        float* yf = buf.data() + d.sk;
        cpu::load_row_as_float(dy + offset, dyf, n);
        cpu::load_row_as_float(y + offset, yf, n);
        softmax_backward_row<false>(dyf, yf, dyf, n, n, scale);
        cpu::store_row_from_float(dyf, dx + offset, n);
        cpu::zero_row(dx + offset + n, d.sk - n);
      }
    }
    if (stream) cpu::stream_fence();
  });
}

// Host int64 copy of a per-sample tensor (no copy for contiguous int64 CPU tensors).
at::Tensor host_lengths(const at::Tensor& lengths) {
  return lengths.to(at::kCPU, at::kLong).contiguous();
}

// The validated host int64 copies of prefix_len, valid_len and q_offset; `lens` points into them.
struct CheckedLengths {
  at::Tensor prefix, valid, q_offset;
  HostLengths lens;

  CheckedLengths(const at::Tensor& scores, const at::Tensor& prefix_len, const at::Tensor& valid_len,
                 const at::Tensor& q_offset_in, const char* what) {
    check_masked_softmax_args(scores, prefix_len, valid_len, q_offset_in, what);
    prefix = host_lengths(prefix_len);
    valid = host_lengths(valid_len);
    q_offset = host_lengths(q_offset_in);
    lens = HostLengths{prefix.const_data_ptr<int64_t>(), valid.const_data_ptr<int64_t>(),
                       q_offset.const_data_ptr<int64_t>()};
    check_length_values(lens.prefix, lens.valid, lens.q_offset, scores.size(0), scores.size(3));
  }
};

at::Tensor masked_softmax_cpu(const at::Tensor& scores, const at::Tensor& prefix_len,
                              const at::Tensor& valid_len, double scale, const at::Tensor& q_offset) {
  const CheckedLengths lengths(scores, prefix_len, valid_len, q_offset, "scores");
  const at::Tensor x = scores.contiguous();                       // (B, H, Sq, Sk)
  at::Tensor out = cpu::empty_output(x.sizes(), x.options());     // (B, H, Sq, Sk)
  const Dims d{x.size(1), x.size(2), x.size(3)};
  const int64_t rows = x.size(0) * d.heads * d.sq;
  cpu::dispatch_storage_type(x.scalar_type(), "masked_softmax", [&](auto tag) {
    using scalar_t = decltype(tag);
    forward_rows<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rows, d,
                           lengths.lens, scale, cpu::use_streaming_stores(out.nbytes()));
  });
  return out;
}

at::Tensor masked_softmax_backward_cpu(const at::Tensor& grad_out, const at::Tensor& out,
                                       const at::Tensor& prefix_len, const at::Tensor& valid_len,
                                       double scale, const at::Tensor& q_offset) {
  check_masked_softmax_backward_args(grad_out, out);
  const CheckedLengths lengths(out, prefix_len, valid_len, q_offset, "out");
  const at::Tensor dy = grad_out.contiguous();                    // (B, H, Sq, Sk)
  const at::Tensor y = out.contiguous();                          // (B, H, Sq, Sk)
  at::Tensor dx = cpu::empty_output(y.sizes(), y.options());      // (B, H, Sq, Sk)
  const Dims d{y.size(1), y.size(2), y.size(3)};
  const int64_t rows = y.size(0) * d.heads * d.sq;
  cpu::dispatch_storage_type(y.scalar_type(), "masked_softmax_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    backward_rows<scalar_t>(dy.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                            dx.mutable_data_ptr<scalar_t>(), rows, d, lengths.lens, scale,
                            cpu::use_streaming_stores(dx.nbytes()));
  });
  return dx;
}

}  // namespace
}  // namespace m6

TORCH_LIBRARY_IMPL(m6, CPU, m) {
  m.impl("masked_softmax", &m6::masked_softmax_cpu);
  m.impl("masked_softmax_backward", &m6::masked_softmax_backward_cpu);
}
