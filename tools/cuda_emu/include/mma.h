// Emulator stand-in for <mma.h> (nvcuda::wmma): fragments spread over the 32 lanes of a
// warp, num_elements per lane as on the GPU, in a layout of our own (the real one is
// unspecified, so code may only touch x[] element-wise); mma_sync is a warp collective.
// The checks the hardware leaves undefined: 256-bit aligned pointers and an ldm that is a
// multiple of 16 bytes.
#pragma once
#include "dnnrl_cuda_emu.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
template <typename Use, int M, int N, int K> struct Dims;
template <int M, int N, int K> struct Dims<matrix_a, M, N, K> { static constexpr int R = M, C = K; };
template <int M, int N, int K> struct Dims<matrix_b, M, N, K> { static constexpr int R = K, C = N; };
template <int M, int N, int K> struct Dims<accumulator, M, N, K> { static constexpr int R = M, C = N; };
template <typename T> struct Storage { using type = T; };
template <> struct Storage<precision::tf32> { using type = float; };

// Element e of lane l is tile element pos(e, l) (row-major index); a bijection per e.
constexpr int pos(int e, int lane) { return e * 32 + ((lane + 11 * e) & 31); }

inline float tf32_truncate(float v) {  // what the tensor core reads of an fp32 operand
  unsigned u = __float_as_uint(v);
  if ((u & 0x7f800000u) == 0x7f800000u) return v;
  return __uint_as_float(u & 0xffffe000u);
}
template <typename T> inline float operand(T v, bool tf32);
template <> inline float operand<float>(float v, bool tf32) { return tf32 ? tf32_truncate(v) : v; }
template <> inline float operand<__half>(__half v, bool) { return __half2float(v); }
template <> inline float operand<__nv_bfloat16>(__nv_bfloat16 v, bool) { return __bfloat162float(v); }

template <typename E>
inline void check_mem(const E* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    ::dnnrl_emu::fail(std::string(what) + ": pointer not 256-bit aligned (undefined on the GPU)");
  if ((ldm * sizeof(E)) % 16 != 0)
    ::dnnrl_emu::fail(std::string(what) + ": ldm " + std::to_string(ldm) + " is not a multiple of 16 bytes");
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using element_type = typename detail::Storage<T>::type;
  static constexpr int R = detail::Dims<Use, M, N, K>::R, C = detail::Dims<Use, M, N, K>::C;
  static constexpr int num_elements = R * C / 32;
  element_type x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = static_cast<typename fragment<Use, M, N, K, T, L>::element_type>(v);
}

template <typename Use, int M, int N, int K, typename T, typename L, typename E>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const E* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, L>;
  static_assert(std::is_same<E, typename F::element_type>::value, "load_matrix_sync: pointer type != fragment type");
  static_assert(std::is_same<L, row_major>::value || std::is_same<L, col_major>::value,
                "matrix fragment needs a layout");
  detail::check_mem(p, ldm, "wmma::load_matrix_sync");
  const int lane = ::dnnrl_emu::lane_id();
  for (int e = 0; e < F::num_elements; ++e) {
    const int q = detail::pos(e, lane), r = q / F::C, c = q % F::C;
    f.x[e] = std::is_same<L, row_major>::value ? p[r * ldm + c] : p[c * ldm + r];
  }
}

template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T, void>& f, unsigned ldm, layout_t layout) {
  using F = fragment<accumulator, M, N, K, T, void>;
  detail::check_mem(p, ldm, "wmma::store_matrix_sync");
  const int lane = ::dnnrl_emu::lane_id();
  for (int e = 0; e < F::num_elements; ++e) {
    const int q = detail::pos(e, lane), r = q / F::C, c = q % F::C;
    (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[e];
  }
}

namespace detail {
template <typename FD, typename FA, typename FB, typename FC>
struct MmaArg {
  FD* d;
  const FA* a;
  const FB* b;
  const FC* c;
};
template <typename FD, typename FA, typename FB, typename FC, bool kTf32, int M, int N, int K>
void mma_complete(void* const* args, unsigned) {
  float A[M][K], Bm[K][N], Cm[M][N];
  for (int l = 0; l < 32; ++l) {
    const auto* g = static_cast<MmaArg<FD, FA, FB, FC>*>(args[l]);
    for (int e = 0; e < FA::num_elements; ++e) {
      const int q = pos(e, l);
      A[q / K][q % K] = operand(g->a->x[e], kTf32);
    }
    for (int e = 0; e < FB::num_elements; ++e) {
      const int q = pos(e, l);
      Bm[q / N][q % N] = operand(g->b->x[e], kTf32);
    }
    for (int e = 0; e < FC::num_elements; ++e) {
      const int q = pos(e, l);
      Cm[q / N][q % N] = g->c->x[e];
    }
  }
  // Products are exact in float32 for 16-bit and tf32 operands; the order and rounding of
  // the sum are the hardware's own business (the tests' tolerances allow for either).
  // k outside j: the inner loop vectorises.
  float Dm[M][N];
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) Dm[i][j] = Cm[i][j];
    for (int k = 0; k < K; ++k) {
      const float a = A[i][k];
      for (int j = 0; j < N; ++j) Dm[i][j] += a * Bm[k][j];
    }
  }
  for (int l = 0; l < 32; ++l) {
    auto* g = static_cast<MmaArg<FD, FA, FB, FC>*>(args[l]);
    for (int e = 0; e < FD::num_elements; ++e) {
      const int q = pos(e, l);
      g->d->x[e] = Dm[q / N][q % N];
    }
  }
}
}  // namespace detail

template <int M, int N, int K, typename TA, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  using FD = fragment<accumulator, M, N, K, float>;
  using FA = fragment<matrix_a, M, N, K, TA, LA>;
  using FB = fragment<matrix_b, M, N, K, TA, LB>;
  detail::MmaArg<FD, FA, FB, FD> arg{&d, &a, &b, &c};
  constexpr bool kTf32 = std::is_same<TA, precision::tf32>::value;
  ::dnnrl_emu::warp_collective(0xffffffffu, &detail::mma_complete<FD, FA, FB, FD, kTf32, M, N, K>, &arg,
                               "wmma::mma_sync", __FILE__, __LINE__);
}

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits.
inline float __float_to_tf32(float v) {
  unsigned u = __float_as_uint(v);
  if ((u & 0x7f800000u) == 0x7f800000u) return (u & 0x007fffffu) ? __uint_as_float(0x7fffffffu) : v;
  u += 0x1000u;
  return __uint_as_float(u & 0xffffe000u);
}

}  // namespace wmma
}  // namespace nvcuda
