// Device helpers shared by the CUDA kernels of the m6:: ops: 16-byte vector access, warp and
// row-group all-reductions, the float / half / bfloat16 dispatch, launch sizes. Only .cu files
// include this.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>

// The three storage types of the kernels (math is always fp32). ATen's FLOATING_TYPES macros
// would also instantiate double, which the checks reject on CUDA (csrc/common/dtypes.h: float64
// is the CPU kernels' exact path): dead code that costs compile time.
#define M6_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)                          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                               \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)      \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)       \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace m6::cuda {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / kWarpSize;

// N elements of T moved as one aligned access: ld/st.global.v4 when sizeof(T) * N == 16.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// True when 16-byte accesses are legal on rows of `row_len` elements of T starting at each pointer:
// every pointer 16-byte aligned and the row length a whole number of 16-byte vectors.
template <typename T>
inline bool can_vectorize(int64_t row_len, std::initializer_list<const void*> ptrs) {
  if ((row_len * static_cast<int64_t>(sizeof(T))) % 16 != 0) return false;
  return std::all_of(ptrs.begin(), ptrs.end(),
                     [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; });
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Grid size for `blocks` blocks of work; kernels loop (grid-stride) over what does not fit.
inline unsigned int grid_size(int64_t blocks) {
  return static_cast<unsigned int>(std::clamp<int64_t>(blocks, 1, INT_MAX));
}

// Threads per row for a row of `chunks` vector accesses: about `per_thread` accesses each,
// a whole number of warps, at most one block.
inline int threads_per_row(int64_t chunks, int64_t per_thread) {
  return static_cast<int>(std::clamp<int64_t>(round_up(ceil_div(chunks, per_thread), kWarpSize),
                                              kWarpSize, kMaxThreads));
}

// ---- Math that --use_fast_math must not degrade.

// exp(x) to about 1 ulp, for x <= 88 (the softmax kernels pass x <= 0, up to rounding); NaN stays
// NaN. --use_fast_math turns expf into __expf (ex2.approx: 2 ulp near 0, worse further out), which
// would put the kernels' fp32 error above PyTorch's. Only FMA-pipe and integer instructions: the
// rounding to an integer is the add of 1.5 * 2^23 (not rintf / float-to-int conversions, which
// run at a quarter of the FMA rate and would make the 16-bit kernels compute-bound).
__device__ __forceinline__ float accurate_exp(float x) {
  if (x < -87.f) return 0.f;  // exp(x) < 1.7e-38 flushes to 0 anyway; -inf lands here
  constexpr float kShift = 12582912.f;  // 1.5 * 2^23: t below has a unit ulp, so it holds an integer
  // t = kShift + j with j = round(x / ln2); the explicit-rounding intrinsics keep the compiler from
  // contracting or folding the shift away.
  const float t = __fmaf_rn(x, 1.44269504f, kShift);
  const float j = __fsub_rn(t, kShift);  // exact
  float f = fmaf(j, -0.693147182f, x);   // x = j * ln2 + f, |f| <= ln2 / 2 (+ rounding)
  f = fmaf(j, 1.90465430e-9f, f);        // ln2 = 0.693147182f - 1.90465430e-9f: Cody-Waite, exact with FMA
  // exp(f) by Taylor to f^7 (Horner): truncation error < 6e-9 relative for |f| <= 0.347.
  float p = 1.98412698e-4f;
  p = fmaf(p, f, 1.38888889e-3f);
  p = fmaf(p, f, 8.33333333e-3f);
  p = fmaf(p, f, 4.16666667e-2f);
  p = fmaf(p, f, 1.66666667e-1f);
  p = fmaf(p, f, 0.5f);
  p = fmaf(p, f, 1.f);
  p = fmaf(p, f, 1.f);
  // t and kShift share their exponent, so their bit patterns differ by exactly j; 2^j is then
  // (j + 127) << 23, a normal float for j in [-126, 127].
  const int two_j = (__float_as_int(t) - __float_as_int(kShift) + 127) << 23;
  return p * __int_as_float(two_j);
}

// The two exps of the softmax kernels, as functors (the online-softmax merge takes one).
// AccurateExp: exp(x) to about 1 ulp (fp32 outputs). HardwareExp2: 2^x in one MUFU.EX2
// (ex2.approx.ftz: about 2 ulp of fp32, far below the rounding of a 16-bit output), for logits
// pre-scaled by log2(e); inline PTX so the choice does not depend on --use_fast_math.
struct AccurateExp {
  __device__ __forceinline__ float operator()(float x) const { return accurate_exp(x); }
};

struct HardwareExp2 {
  __device__ __forceinline__ float operator()(float x) const {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;  // -inf gives +0, NaN stays NaN
  }
};

// ---- Reductions. Values are small aggregates (no constructors, so they can live in __shared__).

// Online softmax state: the running max of the keys seen and sum of exp(key - max).
// Invariant: sum == 0 while max == -inf (nothing finite seen yet), barring NaN keys.
struct MaxSum {
  float max;
  float sum;
};

// Welford state of a set of values: count, mean, and sum of squared deviations from the mean.
struct Welford {
  float count;
  float mean;
  float m2;
};

__device__ __forceinline__ float shfl_down(float v, int delta) {
  return __shfl_down_sync(0xffffffffu, v, delta);
}
__device__ __forceinline__ float2 shfl_down(float2 v, int delta) {
  return make_float2(shfl_down(v.x, delta), shfl_down(v.y, delta));
}
__device__ __forceinline__ MaxSum shfl_down(MaxSum v, int delta) {
  return MaxSum{shfl_down(v.max, delta), shfl_down(v.sum, delta)};
}
__device__ __forceinline__ Welford shfl_down(Welford v, int delta) {
  return Welford{shfl_down(v.count, delta), shfl_down(v.mean, delta), shfl_down(v.m2, delta)};
}

__device__ __forceinline__ float shfl_lane0(float v) { return __shfl_sync(0xffffffffu, v, 0); }
__device__ __forceinline__ float2 shfl_lane0(float2 v) {
  return make_float2(shfl_lane0(v.x), shfl_lane0(v.y));
}
__device__ __forceinline__ MaxSum shfl_lane0(MaxSum v) {
  return MaxSum{shfl_lane0(v.max), shfl_lane0(v.sum)};
}
__device__ __forceinline__ Welford shfl_lane0(Welford v) {
  return Welford{shfl_lane0(v.count), shfl_lane0(v.mean), shfl_lane0(v.m2)};
}

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
  __device__ __forceinline__ float2 operator()(float2 a, float2 b) const {
    return make_float2(a.x + b.x, a.y + b.y);
  }
};

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Merges two online-softmax states whose sums are of Exp(key - max).
template <typename Exp>
struct MaxSumOp {
  __device__ __forceinline__ MaxSum operator()(MaxSum a, MaxSum b) const {
    const float m = fmaxf(a.max, b.max);
    // Neither side has a finite key: both sums are 0 (the invariant) unless a NaN key made them
    // NaN, which must survive to the output as it does on the other paths.
    if (m == -INFINITY) return MaxSum{m, a.sum + b.sum};
    return MaxSum{m, a.sum * Exp{}(a.max - m) + b.sum * Exp{}(b.max - m)};
  }
};

struct WelfordOp {
  // Chan et al.'s parallel merge; counts are exact in fp32 up to 2^24 (hidden <= 65536).
  __device__ __forceinline__ Welford operator()(Welford a, Welford b) const {
    const float count = a.count + b.count;
    if (count == 0.f) return Welford{0.f, 0.f, 0.f};
    const float wb = b.count / count;
    const float delta = b.mean - a.mean;
    return Welford{count, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.count * wb};
  }
};

// Adds the N values of one vector to a thread's Welford state: their own mean and m2 first (two
// passes over registers), then Chan's merge, so one division per vector instead of one per value.
template <int N>
__device__ __forceinline__ void welford_add(Welford& w, const float (&v)[N]) {
  float sum = 0.f;
#pragma unroll
  for (int e = 0; e < N; ++e) sum += v[e];
  const float mean = sum * (1.f / N);  // exact scaling for N a power of two
  float m2 = 0.f;
#pragma unroll
  for (int e = 0; e < N; ++e) m2 = fmaf(v[e] - mean, v[e] - mean, m2);
  w = WelfordOp{}(w, Welford{static_cast<float>(N), mean, m2});
}

// All-reduce over a warp; every lane gets lane 0's result. A tree to lane 0 and a broadcast (not
// an xor butterfly) so that every lane holds bit-identical values even for merges that are not
// exactly commutative in floating point (MaxSum, Welford). All 32 lanes must call it.
template <typename T, typename Op>
__device__ __forceinline__ T warp_allreduce(T v, Op op) {
#pragma unroll
  for (int delta = kWarpSize / 2; delta > 0; delta /= 2) v = op(v, shfl_down(v, delta));
  return shfl_lane0(v);
}

// All-reduce over each row group of a (blockDim.x, blockDim.y) block: the blockDim.x threads with
// the same threadIdx.y form a group (blockDim.x a multiple of 32). Every thread gets its group's
// result, merged in the same order by all of them. `smem` holds kMaxWarps values.
// Contains __syncthreads when a group spans several warps: every thread of the block must call it.
template <typename T, typename Op>
__device__ __forceinline__ T group_allreduce(T v, Op op, T* smem) {
  v = warp_allreduce(v, op);
  const int warps = blockDim.x / kWarpSize;  // block-uniform
  if (warps == 1) return v;
  const int first = threadIdx.y * warps;
  if (threadIdx.x % kWarpSize == 0) smem[first + threadIdx.x / kWarpSize] = v;
  __syncthreads();
  T r = smem[first];
  for (int w = 1; w < warps; ++w) r = op(r, smem[first + w]);
  __syncthreads();  // the next call overwrites smem
  return r;
}

}  // namespace m6::cuda
