// Helpers shared by the CPU kernels: argument checks with messages that name the
// argument, the accumulation dtype, and exact row distances.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

// Hand-written AVX2 paths for the hot loops (the build targets x86-64-v2, and GCC
// does not vectorise index-carrying selects); chosen at run time by cpu_has_avx2().
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DNNRL_X86_SIMD 1
#include <immintrin.h>
#else
#define DNNRL_X86_SIMD 0
#endif

namespace dnnrl {
namespace cpu {

// float64 for float64 inputs, float32 for every other floating dtype (SPEC section 2).
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// DNNRL_NO_SIMD=1 in the environment forces the portable loops (to test them).
inline bool cpu_has_avx2() {
#if DNNRL_X86_SIMD
  static const bool has = __builtin_cpu_supports("avx2") && std::getenv("DNNRL_NO_SIMD") == nullptr;
  return has;
#else
  return false;
#endif
}

// Work (in multiply-adds) below which a loop stays on the calling thread. Forking an
// OpenMP region costs microseconds on an idle machine but a whole scheduler slice
// (milliseconds) when another process holds the second core, so small problems
// (e.g. a 128-row batch) must not pay for it.
constexpr int64_t kParallelWork = int64_t(1) << 20;
// Work (B^2 D / 2 multiply-adds) below which the BLAS tile loops run on one worker.
// A 128 x 512 batch is above it: its three 64-row tiles on two threads measured
// 143 us against 185 us on one (forward+backward, 2-core dev machine under load ~3).
constexpr int64_t kParallelTileWork = int64_t(1) << 21;

// MKL's per-thread thread count (the C entry point; the lower-case symbol is the
// Fortran one, taking a pointer), when the BLAS behind torch is MKL (declared weak:
// absent with OpenBLAS and friends, then the guard below does nothing).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

// Keeps BLAS calls on the calling thread while alive. Used where the kernel runs a
// small problem on one thread: otherwise MKL would fork its own OpenMP team for each
// tiny product, with the same scheduler-slice cost as above. (Inside at::parallel_for
// MKL already runs single-threaded.)
class SingleThreadBlas {
 public:
  explicit SingleThreadBlas(bool enable) {
    if (enable && MKL_Set_Num_Threads_Local != nullptr) {
      previous_ = MKL_Set_Num_Threads_Local(1);
      active_ = true;
    }
  }
  ~SingleThreadBlas() {
    if (active_) MKL_Set_Num_Threads_Local(previous_);
  }
  SingleThreadBlas(const SingleThreadBlas&) = delete;
  SingleThreadBlas& operator=(const SingleThreadBlas&) = delete;

 private:
  int previous_ = 0;
  bool active_ = false;
};

// Grain (items per chunk) for at::parallel_for over items of `cost` multiply-adds.
inline int64_t grain_for(int64_t cost) {
  return std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, cost));
}

// A (rows, dim) floating CPU tensor.
inline void check_embeddings(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the CPU kernel, got ", t.device());
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D (rows, dim), got shape ", t.sizes());
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, name,
              " must be float16, bfloat16, float32 or float64, got ", s);
}

// A 1-D integer CPU tensor of the given length (length < 0: any).
inline void check_index_vector(const char* name, const at::Tensor& t, int64_t length,
                               const char* length_desc) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), name,
              " must be an integer tensor, got ", t.scalar_type());
  if (length >= 0) {
    TORCH_CHECK(t.size(0) == length, name, " must have length ", length, " (", length_desc,
                "), got ", t.size(0));
  }
}

// Every entry of idx[0..n) lies in [lo, hi), else an error naming the argument.
inline void check_index_range(const char* name, const int64_t* idx, int64_t n, int64_t lo, int64_t hi,
                              const char* what) {
  for (int64_t t = 0; t < n; ++t) {
    TORCH_CHECK(idx[t] >= lo && idx[t] < hi, name, "[", t, "] = ", idx[t], " is out of range [", lo,
                ", ", hi, ") (", what, ")");
  }
}

// ||a - b||^2 by explicit differences with 8 partial sums (vectorisable without
// reassociation, and closer to torch's blocked reduction than one running sum).
template <typename acc_t>
inline acc_t exact_sq_dist(const acc_t* a, const acc_t* b, int64_t D) {
  constexpr int kW = 8;
  acc_t part[kW] = {};
  int64_t d = 0;
  for (; d + kW <= D; d += kW) {
    for (int l = 0; l < kW; ++l) {
      const acc_t t = a[d + l] - b[d + l];
      part[l] += t * t;
    }
  }
  for (int l = 0; d < D; ++d, ++l) {
    const acc_t t = a[d] - b[d];
    part[l] += t * t;
  }
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

// ||a||^2, same summation pattern as exact_sq_dist.
template <typename acc_t>
inline acc_t sq_norm(const acc_t* a, int64_t D) {
  constexpr int kW = 8;
  acc_t part[kW] = {};
  int64_t d = 0;
  for (; d + kW <= D; d += kW) {
    for (int l = 0; l < kW; ++l) part[l] += a[d + l] * a[d + l];
  }
  for (int l = 0; d < D; ++d, ++l) part[l] += a[d] * a[d];
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

}  // namespace cpu
}  // namespace dnnrl
