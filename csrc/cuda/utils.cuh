// Small device helpers shared by the CUDA kernels of dnnrl_ext: element types,
// conversions to the accumulation type, cp.async, warp reductions with the
// mining / k-NN tie rules, and a launcher that raises the shared-memory limit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <algorithm>
#include <cfloat>
#include <cstdint>

#include "../common.h"

namespace dnnrl {
namespace cuda {

// c10 element types -> the CUDA-native type with the same bits (for wmma / intrinsics).
template <typename T> struct Native { using type = T; };
template <> struct Native<c10::Half> { using type = __half; };
template <> struct Native<c10::BFloat16> { using type = __nv_bfloat16; };

// Accumulation type: float64 for float64, float32 for everything else.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename acc_t> __device__ __forceinline__ acc_t to_acc(float v) { return v; }
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Load one element as the accumulation type.
template <typename acc_t, typename T>
__device__ __forceinline__ acc_t load_acc(const T* p) { return static_cast<acc_t>(to_float(*p)); }
template <>
__device__ __forceinline__ double load_acc<double, double>(const double* p) { return *p; }

// Store an accumulation-type value as element type T (round to nearest even).
__device__ __forceinline__ void store_as(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_as(double* p, double v) { *p = v; }
__device__ __forceinline__ void store_as(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_as(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <typename T> __device__ __forceinline__ T zero_elem();
template <> __device__ __forceinline__ float zero_elem<float>() { return 0.f; }
template <> __device__ __forceinline__ double zero_elem<double>() { return 0.0; }
template <> __device__ __forceinline__ __half zero_elem<__half>() { return __float2half_rn(0.f); }
template <> __device__ __forceinline__ __nv_bfloat16 zero_elem<__nv_bfloat16>() {
  return __float2bfloat16_rn(0.f);
}

// --------------------------------------------------------------------- cp.async
// 16-byte async copy global -> shared; when !valid the 16 bytes are zero-filled
// (src-size 0: nothing is read, but `gmem` must still be a valid address).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
#elif defined(DNNRL_CUDA_EMU)  // tools/cuda_emu: the copy lands when its group is waited for
  ::dnnrl_emu::cp_async16(smem, gmem, valid);
#else
  if (valid) {
    *reinterpret_cast<int4*>(smem) = *reinterpret_cast<const int4*>(gmem);
  } else {
    *reinterpret_cast<int4*>(smem) = make_int4(0, 0, 0, 0);
  }
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#elif defined(DNNRL_CUDA_EMU)
  ::dnnrl_emu::cp_async_commit();
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#elif defined(DNNRL_CUDA_EMU)
  ::dnnrl_emu::cp_async_wait(N);
#endif
}

// --------------------------------------------------------------------- orderings
// k-NN order: ascending distance, NaN after every number, ties to the smaller
// index; an empty slot (j < 0) after everything. A strict total order on (d, j)
// pairs with distinct j, so any merge order gives the same result.
template <typename acc_t>
__device__ __forceinline__ bool knn_less(acc_t d1, int j1, acc_t d2, int j2) {
  if (j2 < 0) return j1 >= 0;
  if (j1 < 0) return false;
  bool n1 = d1 != d1, n2 = d2 != d2;
  if (n1 || n2) return n2 && (!n1 || j1 < j2);
  return d1 < d2 || (d1 == d2 && j1 < j2);
}

// Warp-wide minimum of (d, j) in the k-NN order; every lane ends with it.
template <typename acc_t>
__device__ __forceinline__ void warp_min_pair(acc_t& d, int& j) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const acc_t od = __shfl_xor_sync(0xffffffffu, d, off);
    const int oj = __shfl_xor_sync(0xffffffffu, j, off);
    if (knn_less(od, oj, d, j)) {
      d = od;
      j = oj;
    }
  }
}

// Mining candidates: an empty candidate (j < 0) never wins; otherwise common.h's rules.
template <typename acc_t>
__device__ __forceinline__ bool take_max(acc_t d, int j, acc_t best, int best_j) {
  return j >= 0 && better_max<acc_t>(d, j, best, best_j);
}
template <typename acc_t>
__device__ __forceinline__ bool take_min(acc_t d, int j, acc_t best, int best_j) {
  return j >= 0 && better_min<acc_t>(d, j, best, best_j);
}

// Butterfly sum: every lane ends with the bitwise-same value (a+b == b+a), so the
// result is deterministic and needs no broadcast.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Squared distance clamped at 0 without turning NaN into 0 (fmax would).
template <typename acc_t>
__device__ __forceinline__ acc_t clamp0(acc_t d) { return d < acc_t(0) ? acc_t(0) : d; }

// The largest squared row norm the expansion ||a||^2 + ||b||^2 - 2 a.b is trusted with
// (the CPU kernel's limit, max / 16): beyond it, or for a non-finite norm (NaN fails the
// comparison), the sum can overflow or meet inf - inf = NaN where the explicit
// differences of the reference give inf, so the mining takes those pairs by explicit
// differences (sq_dist_explicit).
template <typename acc_t> __device__ __forceinline__ acc_t expansion_norm_limit();
template <> __device__ __forceinline__ float expansion_norm_limit<float>() { return FLT_MAX / 16.f; }
template <> __device__ __forceinline__ double expansion_norm_limit<double>() { return DBL_MAX / 16.0; }

// sum((a_e - b_e)^2) over D elements by one thread: the rare pairs with a row beyond
// expansion_norm_limit. Not inlined, so that the tile kernels keep their registers for
// the common path.
template <typename T, typename acc_t>
__device__ __noinline__ acc_t sq_dist_explicit(const T* a, const T* b, int D) {
  acc_t s = 0;
  for (int e = 0; e < D; ++e) {
    const acc_t u = load_acc<acc_t>(a + e) - load_acc<acc_t>(b + e);
    s += u * u;
  }
  return s;
}

// --------------------------------------------------------------------- host helpers
// A switch from the environment, read on every call (tests and benchmarks flip it):
// unset or empty -> fallback, "0" -> false, anything else -> true.
inline bool env_flag(const char* name, bool fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || v[0] == '\0') return fallback;
  return !(v[0] == '0' && v[1] == '\0');
}

// DNNRL_LOSS_FEWER_LAUNCHES=0: the triplet loss runs its earlier launch sequence (norms,
// reduction and backward coefficients each in a launch of their own), for A/B timing
// and as a way back should the fused forms misbehave on some device.
inline bool loss_fewer_launches() { return env_flag("DNNRL_LOSS_FEWER_LAUNCHES", true); }

inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
inline int max_smem_optin() {
  return static_cast<int>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
}

// Raise a kernel's dynamic shared-memory limit (needed above 48 KB) to the device's
// opt-in maximum, once per (kernel, device). Always the maximum: a limit set for one
// size must never be lowered by a later, smaller request, or a launch that needs the
// larger size would fail with "invalid argument".
template <typename Kernel>
inline void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  auto key = std::make_pair(reinterpret_cast<const void*>(kernel), dev);
  std::lock_guard<std::mutex> lock(mu);
  if (done.count(key)) return;
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const int limit = max_smem_optin() - static_cast<int>(attr.sharedSizeBytes);
  TORCH_CHECK(bytes <= static_cast<size_t>(limit), "dnnrl_ext: kernel needs ", bytes,
              " bytes of shared memory, the device allows ", limit);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit));
  done.insert(key);
}

// Resident blocks of `kernel` on the whole device. Cached per (kernel, threads, smem,
// device): the occupancy query is host work on every call of a small-batch op otherwise.
template <typename Kernel>
inline int64_t resident_slots(Kernel kernel, int threads, size_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, size_t, int>, int64_t> cache;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), threads, smem, dev);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  const int64_t slots = static_cast<int64_t>(std::max(per_sm, 1)) * num_sms();
  cache.emplace(key, slots);
  return slots;
}

// Column splits per row tile. A block does ceil(col_tiles / s) tiles and the grid of
// row_tiles x s blocks runs in ceil(row_tiles s / slots) waves of resident blocks, so
// the time goes as waves x ceil(col_tiles / s): take the s in [1, min(col_tiles,
// max_splits)] that minimises it, with 0.2 % per split against the merge work and the
// partial-result memory that grow with s. (The earlier rule, as many splits as fit one
// wave, left 16 of 132 SMs idle at FER-2013 scale: 29 row tiles x 4 splits; this picks
// 9 splits, two full waves, about 12 % less time by the model.)
inline int64_t pick_splits(int64_t slots, int64_t row_tiles, int64_t col_tiles, int64_t max_splits) {
  slots = std::max<int64_t>(slots, 1);
  row_tiles = std::max<int64_t>(row_tiles, 1);
  const int64_t hi = std::max<int64_t>(1, std::min(col_tiles, max_splits));
  int64_t best = 1;
  double best_cost = 0.0;
  for (int64_t s = 1; s <= hi; ++s) {
    const int64_t waves = (row_tiles * s + slots - 1) / slots;
    const int64_t per_block = (col_tiles + s - 1) / s;
    const double cost = static_cast<double>(waves * per_block) * (1.0 + 0.002 * static_cast<double>(s));
    if (s == 1 || cost < best_cost) {
      best = s;
      best_cost = cost;
    }
  }
  return best;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
inline int64_t ceil_div(T a, T b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace dnnrl
