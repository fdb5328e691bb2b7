// Block-level distance tile engine shared by the mining and k-NN kernels.
//
// A block computes the dot products S = A[row0:row0+BM] . B[col0:col0+BN]^T of two
// row-major (rows, D) matrices, staging D through shared memory in BK-wide chunks
// (double-buffered with cp.async when rows are 16-byte aligned), and leaves S in
// shared memory (BM x LDS, in the accumulation type) for the caller's epilogue,
// which turns it into distances ||a||^2 + ||b||^2 - 2 a.b and reduces them on the spot.
//
// Two engines:
//   TcTile<T, BM, BN, WM, WN[, BK]>  tensor cores through wmma, float32 accumulation.
//       T = __half / __nv_bfloat16: one m16n16k16 product (products are exact in fp32).
//       T = float: "3xTF32": a = a_big + a_small (both tf32), and
//       a.b ~= a_small.b_big + a_big.b_small + a_big.b_big, which keeps ~fp32 accuracy
//       (the dropped a_small.b_small term is ~2^-22 relative) at tensor-core speed.
//   SimtTile<64, 64>           float64 on CUDA cores, 256 threads, 4x4 per thread.
// Both expose: T, acc_t, kThreads, BM, BN, LDS, kMainBytes and
//   static __device__ void run(A, row0, M, B, col0, N, D, vec, smem)
// run() starts and ends with the block in lockstep; on return S (aliasing the
// staging buffers at smem[0]) is complete and visible to every thread.
#pragma once

#include <mma.h>

#include <limits>

#include "utils.cuh"

namespace dnnrl {
namespace cuda {

// Stage rows [row0, row0 + ROWS) x columns [k0, k0 + BK) of a row-major (M, D)
// matrix into shared memory laid out [ROWS][LDK]; out-of-range elements are 0.
// vec: D % (16 / sizeof(T)) == 0 and the base pointer is 16-byte aligned, so whole
// 16-byte vectors are either fully inside a row or fully past its end.
template <typename T, int ROWS, int BK, int LDK, int NT>
__device__ __forceinline__ void stage_rows(T* sm, const T* g, int row0, int M, int k0, int D,
                                           bool vec) {
  constexpr int EPV = 16 / sizeof(T);
  constexpr int VPR = BK / EPV;
  static_assert(BK % EPV == 0, "BK must hold whole 16-byte vectors");
  static_assert((LDK * sizeof(T)) % 16 == 0, "rows of the staging tile must stay 16-byte aligned");
  if (vec) {
    for (int v = threadIdx.x; v < ROWS * VPR; v += NT) {
      int r = v / VPR, c = (v % VPR) * EPV;
      int gr = row0 + r, gk = k0 + c;
      bool ok = gr < M && gk < D;
      const T* src = ok ? g + static_cast<int64_t>(gr) * D + gk : g;
      cp_async16(sm + r * LDK + c, src, ok);
    }
  } else {
    for (int e = threadIdx.x; e < ROWS * BK; e += NT) {
      int r = e / BK, c = e % BK;
      int gr = row0 + r, gk = k0 + c;
      sm[r * LDK + c] = (gr < M && gk < D) ? g[static_cast<int64_t>(gr) * D + gk] : zero_elem<T>();
    }
  }
}

// ------------------------------------------------------------------ tensor cores
template <typename T> struct WmmaShape;
template <> struct WmmaShape<__half> {
  static constexpr int K = 16;
  using AFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major>;
  using BFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __half, nvcuda::wmma::col_major>;
  using CFrag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
};
template <> struct WmmaShape<__nv_bfloat16> {
  static constexpr int K = 16;
  using AFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::row_major>;
  using BFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::col_major>;
  using CFrag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
};
template <> struct WmmaShape<float> {
  static constexpr int K = 8;
  using AFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 8, nvcuda::wmma::precision::tf32, nvcuda::wmma::row_major>;
  using BFrag = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 8, nvcuda::wmma::precision::tf32, nvcuda::wmma::col_major>;
  using CFrag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 8, float>;
};

// Split a tf32 fragment loaded from fp32 values into its big and small tf32 parts.
// Element-wise, so the (opaque) fragment layout does not matter.
template <typename Frag>
__device__ __forceinline__ void split_tf32(Frag& big, Frag& small) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(DNNRL_CUDA_EMU)
#pragma unroll
  for (int e = 0; e < big.num_elements; ++e) {
    float v = big.x[e];
    float b = nvcuda::wmma::__float_to_tf32(v);
    small.x[e] = nvcuda::wmma::__float_to_tf32(v - b);  // v - b is exact in fp32
    big.x[e] = b;
  }
#endif
}

// BK_: the D-chunk staged per pipeline step (32 by default; the k-NN filter pass uses 64:
// twice the tensor-core work between two barriers, against twice the staging memory).
template <typename T_, int BM_, int BN_, int WM, int WN, int BK_ = 32>
struct TcTile {
  using T = T_;
  using acc_t = float;
  using Shape = WmmaShape<T>;
  static constexpr int BM = BM_, BN = BN_;
  static constexpr int WARPS_M = BM / WM, WARPS_N = BN / WN;
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int FM = WM / 16, FN = WN / 16;
  static constexpr int BK = BK_;
  static constexpr int LDK = BK + 16 / sizeof(T);  // +16 bytes per row against bank conflicts
  static constexpr int LDS = BN + 4;               // wmma store needs a multiple of 4 floats
  static constexpr int kStageElems = (BM + BN) * LDK;
  static constexpr int kStageBytes = 2 * kStageElems * static_cast<int>(sizeof(T));
  static constexpr int kSBytes = BM * LDS * static_cast<int>(sizeof(float));
  static constexpr int kMainBytes = ((kStageBytes > kSBytes ? kStageBytes : kSBytes) + 127) / 128 * 128;
  static_assert(BM % WM == 0 && BN % WN == 0 && WM % 16 == 0 && WN % 16 == 0, "bad warp tiling");
  static_assert(BK % Shape::K == 0, "BK must be a multiple of the mma K");

  static __device__ __forceinline__ void stage(T* st, const T* A, int row0, int M, const T* B,
                                               int col0, int N, int k0, int D, bool vec) {
    stage_rows<T, BM, BK, LDK, kThreads>(st, A, row0, M, k0, D, vec);
    stage_rows<T, BN, BK, LDK, kThreads>(st + BM * LDK, B, col0, N, k0, D, vec);
  }

  static __device__ void run(const T* A, int row0, int M, const T* B, int col0, int N, int D,
                             bool vec, unsigned char* smem) {
    using namespace nvcuda;
    T* st = reinterpret_cast<T*>(smem);
    const int warp = threadIdx.x / 32;
    const int wr = warp / WARPS_N, wc = warp % WARPS_N;
    typename Shape::CFrag acc[FM][FN];
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.f);

    const int nk = (D + BK - 1) / BK;
    if (nk > 0) {
      stage(st, A, row0, M, B, col0, N, 0, D, vec);
      cp_async_commit();
    }
    for (int kc = 0; kc < nk; ++kc) {
      if (kc + 1 < nk) {  // prefetch the next chunk into the other buffer
        stage(st + ((kc + 1) & 1) * kStageElems, A, row0, M, B, col0, N, (kc + 1) * BK, D, vec);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const T* As = st + (kc & 1) * kStageElems + (wr * WM) * LDK;
      const T* Bs = st + (kc & 1) * kStageElems + BM * LDK + (wc * WN) * LDK;
#pragma unroll
      for (int ks = 0; ks < BK; ks += Shape::K) {
        typename Shape::AFrag a[FM];
        typename Shape::BFrag b[FN];
#pragma unroll
        for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(a[i], As + i * 16 * LDK + ks, LDK);
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::load_matrix_sync(b[j], Bs + j * 16 * LDK + ks, LDK);
        mma_all(acc, a, b);
      }
      __syncthreads();  // the next prefetch overwrites this buffer
    }
    cp_async_wait<0>();
    __syncthreads();
    float* S = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j)
        wmma::store_matrix_sync(S + (wr * WM + i * 16) * LDS + wc * WN + j * 16, acc[i][j], LDS,
                                wmma::mem_row_major);
    __syncthreads();
  }

  // 16-bit inputs: one product per fragment pair.
  template <typename AF, typename BF, typename CF>
  static __device__ __forceinline__ void mma_all(CF (&acc)[FM][FN], AF (&a)[FM], BF (&b)[FN]) {
    if constexpr (sizeof(T) == 2) {
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) nvcuda::wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    } else {
      // float: 3xTF32, small terms first so they are not swamped by the big one.
      AF as[FM];
      BF bs[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) split_tf32(a[i], as[i]);
#pragma unroll
      for (int j = 0; j < FN; ++j) split_tf32(b[j], bs[j]);
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) {
          nvcuda::wmma::mma_sync(acc[i][j], as[i], b[j], acc[i][j]);
          nvcuda::wmma::mma_sync(acc[i][j], a[i], bs[j], acc[i][j]);
          nvcuda::wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
    }
  }
};

// ------------------------------------------------------------------ float64 SIMT
template <int BM_, int BN_>
struct SimtTile {
  using T = double;
  using acc_t = double;
  static constexpr int BM = BM_, BN = BN_;
  static constexpr int kThreads = 256;  // 16 x 16 threads, each (BM/16) x (BN/16)
  static constexpr int TM = BM / 16, TN = BN / 16;
  static constexpr int BK = 16;
  static constexpr int LDK = BK + 2;  // 144-byte rows: 16-byte aligned for cp.async
  static constexpr int LDS = BN + 1;
  static constexpr int kStageElems = (BM + BN) * LDK;
  static constexpr int kStageBytes = 2 * kStageElems * 8;
  static constexpr int kSBytes = BM * LDS * 8;
  static constexpr int kMainBytes = ((kStageBytes > kSBytes ? kStageBytes : kSBytes) + 127) / 128 * 128;

  static __device__ void run(const double* A, int row0, int M, const double* B, int col0, int N,
                             int D, bool vec, unsigned char* smem) {
    double* st = reinterpret_cast<double*>(smem);
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    double acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = 0.0;
    const int nk = (D + BK - 1) / BK;
    if (nk > 0) {
      stage_rows<double, BM, BK, LDK, kThreads>(st, A, row0, M, 0, D, vec);
      stage_rows<double, BN, BK, LDK, kThreads>(st + BM * LDK, B, col0, N, 0, D, vec);
      cp_async_commit();
    }
    for (int kc = 0; kc < nk; ++kc) {
      if (kc + 1 < nk) {
        double* nx = st + ((kc + 1) & 1) * kStageElems;
        stage_rows<double, BM, BK, LDK, kThreads>(nx, A, row0, M, (kc + 1) * BK, D, vec);
        stage_rows<double, BN, BK, LDK, kThreads>(nx + BM * LDK, B, col0, N, (kc + 1) * BK, D, vec);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const double* As = st + (kc & 1) * kStageElems;
      const double* Bs = As + BM * LDK;
#pragma unroll 4
      for (int kk = 0; kk < BK; ++kk) {
        double a[TM], b[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) a[i] = As[(ty + 16 * i) * LDK + kk];
#pragma unroll
        for (int j = 0; j < TN; ++j) b[j] = Bs[(tx + 16 * j) * LDK + kk];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
    cp_async_wait<0>();
    __syncthreads();
    double* S = reinterpret_cast<double*>(smem);
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) S[(ty + 16 * i) * LDS + tx + 16 * j] = acc[i][j];
    __syncthreads();
  }
};

// ||p||^2 of one row by one warp, fixed order (every lane gets the same value). The
// one definition, so that norms computed inside a kernel equal row_norms_kernel's.
template <typename T, typename acc_t>
__device__ __forceinline__ acc_t warp_row_sq_norm(const T* p, int D) {
  const int lane = threadIdx.x % 32;
  acc_t s = 0;
  for (int e = lane; e < D; e += 32) {
    acc_t v = load_acc<acc_t>(p + e);
    s += v * v;
  }
  return warp_sum(s);
}

// ||row||^2 of every row of a (rows, D) matrix, warp per row, fixed order.
// kNonFiniteAsNaN (the k-NN): a norm that is inf or NaN is stored as NaN, so that every
// distance of that row, norm + norm - 2 dot, is NaN whatever the dot gives (the expansion
// alone would give inf, NaN or a number, by the signs; the CPU kernel and the reference
// apply the same rule).
template <typename T, typename acc_t, bool kNonFiniteAsNaN = false>
__global__ void __launch_bounds__(256) row_norms_kernel(const T* __restrict__ x, int rows, int D,
                                                        acc_t* __restrict__ out) {
  const int row = blockIdx.x * 8 + threadIdx.x / 32;
  if (row >= rows) return;
  acc_t s = warp_row_sq_norm<T, acc_t>(x + static_cast<int64_t>(row) * D, D);
  if (kNonFiniteAsNaN && !isfinite(s)) s = std::numeric_limits<acc_t>::quiet_NaN();
  if (threadIdx.x % 32 == 0) out[row] = s;
}

// Engines per element type: a large tile for big problems and a small one that
// gives more blocks when the problem is small. Tiny (the mining of batches up to a few
// hundred rows): four times the blocks of Small, and a quarter of its tensor-core work per
// warp between two barriers. At B = 128 the Small tile made 4 blocks, each warp running
// the whole D loop over a 32 x 32 block of products (mine_pass 49-60 us on the H200).
template <typename T> struct Engines {
  using Large = TcTile<T, 128, 128, 64, 32>;  // 8 warps
  using Small = TcTile<T, 64, 64, 32, 32>;    // 4 warps
  using Tiny = TcTile<T, 32, 32, 16, 16>;     // 4 warps, one 16 x 16 fragment each
};
template <> struct Engines<double> {
  using Large = SimtTile<64, 64>;
  using Small = SimtTile<64, 64>;
  using Tiny = SimtTile<64, 64>;
};

}  // namespace cuda
}  // namespace dnnrl
