// CPU kernel of m6::adamw_step_ (schema and math: csrc/registration.cpp): one AdamW update of fp32
// tensors in place, the host half of ZeRO-Offload (DeepSpeed's CPU-Adam is the model).
//
// One pass over memory: per element it reads p, m, v and g and writes p, m, v (28 bytes), plus the
// updated p cast to param_copy's dtype (2 bytes for fp16/bf16) when a copy is asked for, so the
// weights sent back to the GPU cost no second pass. Vectors of at::vec::Vectorized<float>, threads
// by at::parallel_for over units of kUnit elements (chunks start on a unit, a cache line multiple).
// The last partial vector of the tensor goes through the same vector code with masked loads and
// stores (cpu::load_n / store_n), so every element sees the same instructions wherever it sits:
// the result does not depend on the thread count, and the tail equals the body.
//
// The arithmetic is torch.optim.AdamW(foreach=True)'s on the CPU, op by op and rounding by rounding:
// the per-call scalars in double, rounded once to float (1 - lr wd, 1 - beta1, beta2, 1 - beta2,
// sqrt(1 - beta2^step), -lr / (1 - beta1^step), eps, grad_scale), then in fp32 lanes
//   g = g * grad_scale;  p = p * (1 - lr wd);  m = fma(1 - beta1, g - m, m) (at::lerp's form for
//   1 - beta1 < 0.5; fma(-beta1, g - m, g) otherwise);
//   v = fma((1 - beta2) g, g, beta2 v) (torch.addcmul_);  p = p + ((-lr / bc1) m) / (sqrt(v) / sqrt(bc2) + eps).
// m and v come out bitwise equal to foreach's; p differs only where torch.sqrt (not correctly
// rounded on the CPU, measured with torch 2.14) and our IEEE sqrt differ: an ulp or two in a few
// elements per thousand (tests/test_cpu_adamw.py).
// Products that feed an add pass through rounded(), so no build contracts them into an FMA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "../common/cpu_vec.h"

namespace m6 {
namespace {

using cpu::kVecWidth;
using cpu::load_n;
using cpu::store_n;
using cpu::Vec;

constexpr int64_t kUnit = 64;                // elements per scheduling unit: 4 cache lines of fp32
constexpr int64_t kElementsPerTask = 32768;  // the grain of the threads (128 KiB of each fp32 tensor)
constexpr int64_t kStep = 2 * kVecWidth;     // elements per iteration: one fp16/bf16 vector's worth

static_assert(at::vec::Vectorized<c10::BFloat16>::size() == kStep &&
                  at::vec::Vectorized<c10::Half>::size() == kStep,
              "a 16-bit vector must hold two fp32 vectors");

// The per-call scalars of the update, broadcast once (see the file comment for the rounding).
struct Coefficients {
  Vec grad_scale, decay, lerp_coeff, beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size;
  bool lerp_from_m;  // torch's lerp: m + w (g - m) for |w| < 0.5, else g + (w - 1) (g - m)
};

Coefficients coefficients(double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                          double grad_scale) {
  const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const auto f = [](double x) { return Vec(static_cast<float>(x)); };
  const float weight = static_cast<float>(1.0 - beta1);
  const bool small = std::abs(weight) < 0.5f;
  return {f(grad_scale),
          f(1.0 - lr * weight_decay),
          Vec(small ? weight : weight - 1.f),
          f(beta2),
          f(1.0 - beta2),
          f(std::sqrt(bias_correction2)),
          f(eps),
          f(-(lr / bias_correction1)),
          small};
}

// x, opaque to the optimiser: a product passed through it is rounded to fp32 before the next add.
// GCC's default -ffp-contract=fast fuses a * b + c into one FMA wherever it sees one (the AVX2 and
// AVX-512 intrinsics are plain vector arithmetic to it), choosing which product to fuse itself, so
// the roundings would be the compiler's rather than these lines' (torch's fused CPU AdamW has its
// compiler's). The empty asm costs no instruction.
inline Vec rounded(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 r = x;
  asm("" : "+v"(r));
  return Vec(r);
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 r = x;
  asm("" : "+x"(r));
  return Vec(r);
#else
  Vec r = x;
  asm("" : "+m"(r));
  return r;
#endif
}

// x.sqrt() (IEEE, correctly rounded). AVX-512: through the zero-masked intrinsic, the same
// instruction: GCC 12 reports the undefined vector inside _mm512_sqrt_ps as "used uninitialized"
// (a false positive of its intrinsics header) once rounded() sits before it.
inline Vec sqrt_ieee(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(_mm512_maskz_sqrt_ps(static_cast<__mmask16>(-1), x));
#else
  return x.sqrt();
#endif
}

// Updates elements [0, count) of p, m, v (count <= kVecWidth) from g; returns the new p.
// The roundings of torch.optim.AdamW(foreach=True) on the CPU, op by op: m by at::lerp's fma,
// v = fma((1 - beta2) g, g, beta2 v) as torch.addcmul_ computes it; p as torch.addcdiv_ does.
inline Vec update_vector(const Coefficients& c, float* p, float* m, float* v, const float* g, int64_t count) {
  const Vec grad = rounded(load_n(g, count) * c.grad_scale);
  const Vec param = rounded(load_n(p, count) * c.decay);
  const Vec exp_avg_old = load_n(m, count);
  const Vec exp_avg = at::vec::fmadd(c.lerp_coeff, grad - exp_avg_old, c.lerp_from_m ? exp_avg_old : grad);
  const Vec exp_avg_sq = at::vec::fmadd(rounded(c.one_minus_beta2 * grad), grad, rounded(load_n(v, count) * c.beta2));
  const Vec denom = sqrt_ieee(exp_avg_sq) / c.bias_correction2_sqrt + c.eps;
  const Vec updated = param + c.neg_step_size * exp_avg / denom;
  store_n(exp_avg, m, count);
  store_n(exp_avg_sq, v, count);
  store_n(updated, p, count);
  return updated;
}

// The CopyT of a call without param_copy: nothing is written.
struct NoCopy {};

// copy[0:count) = (lo, hi)[0:count) (count <= kStep), cast to the copy's dtype, rounding to
// nearest even. kStream (count == kStep, copy vector-aligned): non-temporal stores. The copy is
// only written, so a normal store would first read its lines into the cache (2 more bytes per
// element of a bf16 copy, 4 of an fp32 one); the caller fences (cpu::stream_fence).
template <bool kStream>
inline void store_copy(const Vec& lo, const Vec& hi, float* copy, int64_t count) {
  if constexpr (kStream) {
    cpu::store_stream(lo, copy);
    cpu::store_stream(hi, copy + kVecWidth);
  } else {
    store_n(lo, copy, std::min(count, kVecWidth));
    if (count > kVecWidth) store_n(hi, copy + kVecWidth, count - kVecWidth);
  }
}

template <bool kStream, typename T,
          std::enable_if_t<std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>, int> = 0>
inline void store_copy(const Vec& lo, const Vec& hi, T* copy, int64_t count) {
  const at::vec::Vectorized<T> half = at::vec::convert_from_float<T>(lo, hi);
  static_assert(sizeof(half) == sizeof(Vec), "a 16-bit vector has the fp32 vector's bytes");
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (kStream) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(copy), half);
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (kStream) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(copy), half);
    return;
  }
#endif
  half.store(copy, static_cast<int>(count));
}

// The update of elements [0, n) of the four tensors, and of the copy (CopyT: NoCopy, float, Half,
// BFloat16; kStream: the full vectors of the copy with non-temporal stores, the copy aligned).
template <typename CopyT, bool kStream>
void update_range(const Coefficients& c, float* p, float* m, float* v, const float* g, CopyT* copy, int64_t n) {
  constexpr bool kCopy = !std::is_same_v<CopyT, NoCopy>;
  int64_t j = 0;
  for (; j + kStep <= n; j += kStep) {
    const Vec lo = update_vector(c, p + j, m + j, v + j, g + j, kVecWidth);
    const int64_t k = j + kVecWidth;
    const Vec hi = update_vector(c, p + k, m + k, v + k, g + k, kVecWidth);
    if constexpr (kCopy) store_copy<kStream>(lo, hi, copy + j, kStep);
  }
  if (j < n) {  // the last n - j < kStep elements: one or two masked vectors
    const int64_t rest = n - j;
    const Vec lo = update_vector(c, p + j, m + j, v + j, g + j, std::min(rest, kVecWidth));
    const int64_t k = j + kVecWidth;
    const Vec hi = rest > kVecWidth ? update_vector(c, p + k, m + k, v + k, g + k, rest - kVecWidth) : Vec(0.f);
    if constexpr (kCopy) store_copy<false>(lo, hi, copy + j, rest);
  }
  if constexpr (kStream) cpu::stream_fence();
}

// Whether the copy's full vectors go out with non-temporal stores: a copy far larger than the
// caches (cpu::use_streaming_stores) at a vector-aligned address. Then every full vector of every
// chunk is aligned too: chunks start on a multiple of kUnit elements, vectors on kStep.
template <typename CopyT>
bool stream_copy(const CopyT* copy, int64_t n) {
  if constexpr (std::is_same_v<CopyT, NoCopy>) {
    return false;
  } else {
    return cpu::use_streaming_stores(n * static_cast<int64_t>(sizeof(CopyT))) &&
           reinterpret_cast<uintptr_t>(copy) % sizeof(Vec) == 0;
  }
}

template <typename CopyT>
void update_all(const Coefficients& c, float* p, float* m, float* v, const float* g, CopyT* copy, int64_t n) {
  const int64_t units = (n + kUnit - 1) / kUnit;
  const bool stream = stream_copy(copy, n);
  at::parallel_for(0, units, kElementsPerTask / kUnit, [&](int64_t unit_begin, int64_t unit_end) {
    const int64_t begin = unit_begin * kUnit;
    const int64_t end = std::min(n, unit_end * kUnit);
    CopyT* chunk_copy = nullptr;
    if constexpr (!std::is_same_v<CopyT, NoCopy>) chunk_copy = copy + begin;
    const auto range = stream ? update_range<CopyT, true> : update_range<CopyT, false>;
    range(c, p + begin, m + begin, v + begin, g + begin, chunk_copy, end - begin);
  });
}

void check_state_tensor(const at::Tensor& t, const char* name, const at::Tensor& param) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "adamw_step_: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == param.device(), "adamw_step_: ", name, " must be on param's device ", param.device(),
              ", got ", t.device());
  TORCH_CHECK(t.numel() == param.numel(), "adamw_step_: ", name, " must have param's numel ", param.numel(),
              ", got ", t.numel());
  TORCH_CHECK(t.is_contiguous(), "adamw_step_: ", name, " must be contiguous");
}

void check_number(double x, const char* name) {
  TORCH_CHECK(std::isfinite(x) && x >= 0, "adamw_step_: ", name, " must be a finite number >= 0, got ", x);
}

void check_beta(double beta, const char* name) {
  TORCH_CHECK(beta >= 0 && beta < 1, "adamw_step_: ", name, " must be in [0, 1), got ", beta);
}

void check_adamw_args(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                      const at::Tensor& grad, const std::optional<at::Tensor>& param_copy, double lr, double beta1,
                      double beta2, double eps, double weight_decay, int64_t step, double grad_scale) {
  TORCH_CHECK(param.device().is_cpu(), "adamw_step_: param must be a CPU tensor, got ", param.device());
  check_state_tensor(param, "param", param);
  check_state_tensor(exp_avg, "exp_avg", param);
  check_state_tensor(exp_avg_sq, "exp_avg_sq", param);
  check_state_tensor(grad, "grad", param);
  if (param_copy.has_value()) {
    const at::Tensor& copy = *param_copy;
    const auto dtype = copy.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                "adamw_step_: param_copy must be float32, float16 or bfloat16, got ", dtype);
    TORCH_CHECK(copy.device() == param.device(), "adamw_step_: param_copy must be on param's device ",
                param.device(), ", got ", copy.device());
    TORCH_CHECK(copy.numel() == param.numel(), "adamw_step_: param_copy must have param's numel ", param.numel(),
                ", got ", copy.numel());
    TORCH_CHECK(copy.is_contiguous(), "adamw_step_: param_copy must be contiguous");
  }
  check_number(lr, "lr");
  check_beta(beta1, "beta1");
  check_beta(beta2, "beta2");
  check_number(eps, "eps");
  check_number(weight_decay, "weight_decay");
  check_number(grad_scale, "grad_scale");
  TORCH_CHECK(step >= 1, "adamw_step_: step must be >= 1 (the number of this update), got ", step);
}

void adamw_step_cpu(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                    const at::Tensor& grad, const std::optional<at::Tensor>& param_copy, double lr, double beta1,
                    double beta2, double eps, double weight_decay, int64_t step, double grad_scale) {
  check_adamw_args(param, exp_avg, exp_avg_sq, grad, param_copy, lr, beta1, beta2, eps, weight_decay, step,
                   grad_scale);
  const Coefficients c = coefficients(lr, beta1, beta2, eps, weight_decay, step, grad_scale);
  const int64_t n = param.numel();
  float* p = param.mutable_data_ptr<float>();
  float* m = exp_avg.mutable_data_ptr<float>();
  float* v = exp_avg_sq.mutable_data_ptr<float>();
  const float* g = grad.const_data_ptr<float>();
  if (!param_copy.has_value()) {
    update_all<NoCopy>(c, p, m, v, g, nullptr, n);
    return;
  }
  switch (param_copy->scalar_type()) {
    case at::kFloat: update_all(c, p, m, v, g, param_copy->mutable_data_ptr<float>(), n); break;
    case at::kHalf: update_all(c, p, m, v, g, param_copy->mutable_data_ptr<c10::Half>(), n); break;
    default: update_all(c, p, m, v, g, param_copy->mutable_data_ptr<c10::BFloat16>(), n); break;
  }
}

}  // namespace
}  // namespace m6

TORCH_LIBRARY_IMPL(m6, CPU, m) { m.impl("adamw_step_", &m6::adamw_step_cpu); }
