// CUDA kernels of dnnrl_ext::knn and dnnrl_ext::knn_vote.
//
// Fast path (k small enough that every thread's top-k list fits in shared memory,
// k <= 77 for float32 with the 128x128 tile, about 190 with the 64x64 tile):
//   row_norms   ||q||^2 and ||g||^2                         warp per row
//   knn_pass    distance tiles (tile.cuh); thread t keeps a sorted top-k list of
//               query t / TPR over every TPR-th column of the tiles of its column
//               split, by insertion against the current k-th best in registers
//                                                           grid (query tiles, splits)
//   knn_merge   warp per query: k-way merge of the splits x TPR sorted lists
//               (<= 128, 4 per lane) into dist/idx; knn_vote also votes here
// float32, k <= 16, N > 32 (and float16 copies under 64 MiB), opt-in with
// DNNRL_KNN_CANDIDATES=1: the candidate path below (a float16 pass for 32 candidates,
// exact float32 re-rank, a proven certificate; the fast path above runs only for the
// uncertified queries). Off by default: measured on the H200 it was slower than the exact
// pass it was meant to beat (below). DNNRL_KNN_EXACT=1 keeps it off in any case;
// DNNRL_KNN_STATS=1 records how many queries took the exact pass (a device sync per call;
// read by dnnrl_ext._C.knn_candidate_stats, which dnnrl_ext.ops turns into a warning).
// float32, k <= 32, opt-in with DNNRL_KNN_FILTER=1 (precedence over the candidate path):
// the filter path (a float16 bound pass over every s-th gallery row, a float16 filter
// pass that keeps every row within a proven threshold, an exact float32 re-rank of the
// few within the error band; no per-thread lists). Not yet measured on a GPU.
// Large k: knn_large, block per query (grid-stride): distances of a 1024-row gallery
// tile, bitonic sort in shared memory, merge-path merge with the running top-k
// list (ping-pong between the output and one (Q, k) workspace); then knn_vote runs
// vote_rows. Extra memory O(Q k + Q + N), never Q x N.
// Order everywhere: ascending distance, NaN last, ties to the smaller index.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <atomic>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <type_traits>
#include <utility>

#include "tile.cuh"

namespace dnnrl {
namespace cuda {

// DNNRL_KNN_STATS diagnostics of the last knn / knn_vote call of this process: queries
// left to the exact pass and queries in all, -1 when the candidate path did not run.
// A plain counter read from Python afterwards, not a TORCH_WARN inside the op: on the
// H200 (torch 2.11) a TORCH_WARN from this op, called through torch.ops, crashed the
// process (SIGSEGV in the op call; the same inputs ran clean without the warning).
std::atomic<int64_t> g_stats_exact_rows{-1};
std::atomic<int64_t> g_stats_queries{-1};

std::pair<int64_t, int64_t> knn_candidate_stats() {
  return {g_stats_exact_rows.load(), g_stats_queries.load()};
}

namespace {

constexpr int kListsPerLane = 4;  // knn_merge handles up to 128 lists per query
constexpr int kMaxLists = 32 * kListsPerLane;
constexpr int kLargeTile = 1024;
constexpr int kLargeThreads = 256;

template <typename Eng>
constexpr size_t knn_smem(int k) {
  return Eng::kMainBytes + 2 * Eng::BN * sizeof(typename Eng::acc_t) +
         static_cast<size_t>(k) * Eng::kThreads * (sizeof(typename Eng::acc_t) + sizeof(int));
}

// kScaled: q and g are scaled copies (row i of the original = scale[i] x row i of the
// copy), so the dot product of the tile is multiplied back by qs[row] * gs[col].
// row_flags (nullable): only query tiles holding a row with a non-zero flag run.
template <typename Eng, bool kScaled>
__global__ void __launch_bounds__(Eng::kThreads) knn_pass_kernel(
    const typename Eng::T* __restrict__ q, const typename Eng::T* __restrict__ g,
    const typename Eng::acc_t* __restrict__ qn, const typename Eng::acc_t* __restrict__ gn,
    const typename Eng::acc_t* __restrict__ qs, const typename Eng::acc_t* __restrict__ gs,
    const int* __restrict__ row_flags, int Q, int N, int D, bool vec, int k, int col_tiles, int splits,
    typename Eng::acc_t* __restrict__ part_d, int* __restrict__ part_i) {
  using acc_t = typename Eng::acc_t;
  constexpr int BM = Eng::BM, BN = Eng::BN, NT = Eng::kThreads, LDS = Eng::LDS;
  constexpr int TPR = NT / BM;
  constexpr int CPT = BN / TPR;
  extern __shared__ __align__(128) unsigned char smem[];
  acc_t* cn = reinterpret_cast<acc_t*>(smem + Eng::kMainBytes);
  acc_t* cs = cn + BN;                                 // column scales (kScaled)
  acc_t* ld = cs + BN;                                 // [k][NT]: thread-interleaved, conflict-free
  int* li = reinterpret_cast<int*>(ld + static_cast<size_t>(k) * NT);
  const int tid = threadIdx.x;
  const int row0 = blockIdx.x * BM, split = blockIdx.y;
  const int r = tid / TPR, h = tid % TPR;
  const int row = row0 + r;
  const bool row_ok = row < Q;
  if (row_flags != nullptr && !__syncthreads_or(row_ok && row_flags[row] != 0)) return;  // block-uniform
  const acc_t rn = row_ok ? qn[row] : acc_t(0);
  const acc_t rs2 = kScaled && row_ok ? acc_t(2) * qs[row] : acc_t(2);  // x2 and a power of two: exact
  int cnt = 0;         // entries in this thread's list
  acc_t wd = 0;        // the k-th best so far (valid once cnt == k; wj = -1 before)
  int wj = -1;

  for (int ct = split; ct < col_tiles; ct += splits) {
    const int col0 = ct * BN;
    for (int c = tid; c < BN; c += NT) {
      cn[c] = col0 + c < N ? gn[col0 + c] : acc_t(0);
      if (kScaled) cs[c] = col0 + c < N ? gs[col0 + c] : acc_t(0);
    }
    Eng::run(q, row0, Q, g, col0, N, D, vec, smem);
    const acc_t* S = reinterpret_cast<const acc_t*>(smem);
    if (row_ok) {
      for (int u = 0; u < CPT; ++u) {
        const int c = ((u + r) % CPT) * TPR + h;
        const int j = col0 + c;
        if (j >= N) continue;
        const acc_t dot = kScaled ? cs[c] * S[r * LDS + c] : S[r * LDS + c];
        const acc_t d = clamp0(rn + cn[c] - rs2 * dot);
        if (!knn_less(d, j, wd, wj)) continue;  // wj < 0 while the list is not full
        int p = cnt < k ? cnt : k - 1;         // full: the last entry drops out
        while (p > 0) {
          const acc_t pd = ld[(p - 1) * NT + tid];
          const int pi = li[(p - 1) * NT + tid];
          if (!knn_less(d, j, pd, pi)) break;
          ld[p * NT + tid] = pd;
          li[p * NT + tid] = pi;
          --p;
        }
        ld[p * NT + tid] = d;
        li[p * NT + tid] = j;
        if (cnt < k) ++cnt;
        if (cnt == k) {
          wd = ld[(k - 1) * NT + tid];
          wj = li[(k - 1) * NT + tid];
        }
      }
    }
    __syncthreads();
  }
  if (row_ok) {
    const int64_t base = ((static_cast<int64_t>(split) * Q + row) * TPR + h) * k;
    for (int e = 0; e < k; ++e) {
      part_d[base + e] = e < cnt ? ld[e * NT + tid] : acc_t(0);
      part_i[base + e] = e < cnt ? li[e * NT + tid] : -1;
    }
  }
}

// Label of gallery row j, or -1 when j or its label is out of range (skipped).
__device__ __forceinline__ int64_t label_of(const int64_t* labels, int64_t j, int64_t N, int64_t C) {
  if (j < 0 || j >= N) return -1;
  const int64_t l = labels[j];
  return (l >= 0 && l < C) ? l : -1;
}

// Majority vote of one query's k neighbours (idx, nearest first), by one warp.
// The winner is the first class, in rank order of first appearance, with the most
// votes: exactly "ties go to the tied class whose nearest member ranks first".
__device__ void vote_row(const int64_t* idx, int k, const int64_t* labels, int64_t N, int64_t C,
                         int64_t* votes, int64_t* pred) {
  const int lane = threadIdx.x % 32;
  for (int64_t c = lane; c < C; c += 32) votes[c] = 0;
  __syncwarp();
  int64_t best_c = 0;
  int best_v = 0;
  for (int e = 0; e < k; ++e) {
    const int64_t le = label_of(labels, idx[e], N, C);
    if (le < 0) continue;  // same for every lane
    int before = 0, total = 0;
    for (int e0 = 0; e0 < k; e0 += 32) {
      const int e2 = e0 + lane;
      const bool m = e2 < k && label_of(labels, idx[e2], N, C) == le;
      const unsigned b = __ballot_sync(0xffffffffu, m);
      total += __popc(b);
      const int lim = e - e0;  // lanes below lim rank before e
      const unsigned lt = lim >= 32 ? 0xffffffffu : (lim <= 0 ? 0u : ((1u << lim) - 1u));
      before += __popc(b & lt);
    }
    if (before > 0) continue;  // not the first appearance of its class
    if (lane == 0) votes[le] = total;
    if (total > best_v) {
      best_v = total;
      best_c = le;
    }
  }
  if (lane == 0) *pred = best_c;
}

// Warp per query: k-way merge of `lists` sorted lists (list l = split l / tpr,
// owner thread l % tpr). Every gallery index appears in exactly one list.
template <typename acc_t, bool kVote>
__global__ void __launch_bounds__(256) knn_merge_kernel(
    const acc_t* __restrict__ part_d, const int* __restrict__ part_i, int lists, int tpr, int Q, int k,
    acc_t* __restrict__ out_d, int64_t* __restrict__ out_i, const int64_t* __restrict__ labels, int64_t N,
    int64_t C, int64_t* __restrict__ votes, int64_t* __restrict__ pred, const int* __restrict__ row_flags) {
  const int q = blockIdx.x * 8 + threadIdx.x / 32;
  if (q >= Q) return;
  if (row_flags != nullptr && row_flags[q] == 0) return;  // warp-uniform: this row is answered already
  const int lane = threadIdx.x % 32;
  int64_t base[kListsPerLane];
  int ptr[kListsPerLane];
  acc_t hd[kListsPerLane];
  int hj[kListsPerLane];
#pragma unroll
  for (int u = 0; u < kListsPerLane; ++u) {
    const int l = lane + 32 * u;
    base[u] = ((static_cast<int64_t>(l / tpr) * Q + q) * tpr + l % tpr) * k;
    ptr[u] = 0;
    hd[u] = l < lists ? part_d[base[u]] : acc_t(0);
    hj[u] = l < lists ? part_i[base[u]] : -1;
  }
  for (int e = 0; e < k; ++e) {
    acc_t bd = hd[0];
    int bj = hj[0], bu = 0;
#pragma unroll
    for (int u = 1; u < kListsPerLane; ++u) {
      if (knn_less(hd[u], hj[u], bd, bj)) {
        bd = hd[u];
        bj = hj[u];
        bu = u;
      }
    }
    acc_t md = bd;
    int mj = bj;
    warp_min_pair(md, mj);
    if (mj >= 0 && bj == mj) {  // indices are unique: exactly one lane owns the minimum
#pragma unroll
      for (int u = 0; u < kListsPerLane; ++u) {
        if (u == bu) {
          ++ptr[u];
          const bool more = ptr[u] < k;
          hd[u] = more ? part_d[base[u] + ptr[u]] : acc_t(0);
          hj[u] = more ? part_i[base[u] + ptr[u]] : -1;
        }
      }
    }
    if (lane == 0) {
      if (out_d != nullptr) out_d[static_cast<int64_t>(q) * k + e] = md;
      out_i[static_cast<int64_t>(q) * k + e] = mj;
    }
  }
  if (kVote) {
    __syncwarp();  // lane 0's idx writes are visible to the warp
    vote_row(out_i + static_cast<int64_t>(q) * k, k, labels, N, C, votes + static_cast<int64_t>(q) * C, pred + q);
  }
}

template <typename acc_t>
__device__ __forceinline__ int count_less_smem(const acc_t* sd, const int* si, int len, acc_t d, int j) {
  int lo = 0, hi = len;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (knn_less(sd[mid], si[mid], d, j)) lo = mid + 1; else hi = mid;
  }
  return lo;
}
template <typename acc_t>
__device__ __forceinline__ int count_less_global(const acc_t* gd, const int64_t* gi, int len, acc_t d, int j) {
  int lo = 0, hi = len;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (knn_less(gd[mid], static_cast<int>(gi[mid]), d, j)) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Any k: block per query. The running list ping-pongs between (d0, i0) (the
// output) and (d1, i1) (a workspace); it ends in the output.
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kLargeThreads) knn_large_kernel(
    const T* __restrict__ q, const T* __restrict__ g, const acc_t* __restrict__ qn, const acc_t* __restrict__ gn,
    int Q, int N, int D, int k, acc_t* d0, int64_t* i0, acc_t* d1, int64_t* i1) {
  __shared__ acc_t sd[kLargeTile];
  __shared__ int si[kLargeTile];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  constexpr int kWarps = kLargeThreads / 32;
  for (int qi = blockIdx.x; qi < Q; qi += gridDim.x) {
    const T* xq = q + static_cast<int64_t>(qi) * D;
    const acc_t qq = qn[qi];
    const int64_t row = static_cast<int64_t>(qi) * k;
    int L = 0, cur = 0;
    for (int n0 = 0; n0 < N; n0 += kLargeTile) {
      const int cnt = min(kLargeTile, N - n0);
      for (int i = warp; i < kLargeTile; i += kWarps) {
        if (i < cnt) {
          const T* xg = g + static_cast<int64_t>(n0 + i) * D;
          acc_t dot = 0;
          for (int e = lane; e < D; e += 32) dot += load_acc<acc_t>(xq + e) * load_acc<acc_t>(xg + e);
          dot = warp_sum(dot);
          if (lane == 0) {
            sd[i] = clamp0(qq + gn[n0 + i] - acc_t(2) * dot);
            si[i] = n0 + i;
          }
        } else if (lane == 0) {
          sd[i] = 0;
          si[i] = -1;  // sorts after everything
        }
      }
      __syncthreads();
      for (int size = 2; size <= kLargeTile; size <<= 1) {  // bitonic sort, ascending
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
          for (int i = tid; i < kLargeTile; i += kLargeThreads) {
            const int p = i ^ stride;
            if (p > i) {
              const bool up = (i & size) == 0;
              const acc_t a = sd[i], b = sd[p];
              const int ai = si[i], bi = si[p];
              if (up ? knn_less(b, bi, a, ai) : knn_less(a, ai, b, bi)) {
                sd[i] = b; si[i] = bi; sd[p] = a; si[p] = ai;
              }
            }
          }
          __syncthreads();
        }
      }
      acc_t* sdst = cur ? d0 : d1;
      int64_t* idst = cur ? i0 : i1;
      const acc_t* ssrc = cur ? d1 : d0;
      const int64_t* isrc = cur ? i1 : i0;
      const int Lp = min(k, L + cnt);
      for (int i = tid; i < L; i += kLargeThreads) {  // running list entries
        const acc_t a = ssrc[row + i];
        const int ai = static_cast<int>(isrc[row + i]);
        const int p = i + count_less_smem(sd, si, cnt, a, ai);
        if (p < Lp) { sdst[row + p] = a; idst[row + p] = ai; }
      }
      for (int i = tid; i < cnt; i += kLargeThreads) {  // this tile's entries
        const acc_t b = sd[i];
        const int bi = si[i];
        const int p = i + count_less_global(ssrc + row, isrc + row, L, b, bi);
        if (p < Lp) { sdst[row + p] = b; idst[row + p] = bi; }
      }
      __syncthreads();  // global writes visible to the block before the next merge reads them
      cur ^= 1;
      L = Lp;
    }
    if (cur == 1) {  // the list ended in the workspace
      for (int e = tid; e < k; e += kLargeThreads) {
        d0[row + e] = d1[row + e];
        i0[row + e] = i1[row + e];
      }
    }
    __syncthreads();
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(256) vote_rows_kernel(const int64_t* __restrict__ idx, int Q, int k,
                                                        const int64_t* __restrict__ labels, int64_t N, int64_t C,
                                                        int64_t* __restrict__ votes, int64_t* __restrict__ pred) {
  const int q = blockIdx.x * 8 + threadIdx.x / 32;
  if (q >= Q) return;
  vote_row(idx + static_cast<int64_t>(q) * k, k, labels, N, C, votes + static_cast<int64_t>(q) * C, pred + q);
}

// ------------------------------------------------------------- float32 candidate path
// float32 queries at small k: a float16 pass picks kCand candidates per query, an
// exact float32 re-rank orders them, and a proven error bound certifies that no other
// gallery row can enter the top k; uncertified queries get the exact 3xTF32 pass.
//
// Why: the exact float32 tile costs three TF32 tensor-core products per product
// (3xTF32), the float16 tile one, at twice the TF32 rate per instruction.
//
// Float16 copies are scaled per row by a power of two (max |x~| in [2^14, 2^15)), so
// neither overflow nor (beyond a 2^-39-relative term) underflow can occur, and every
// element is off by at most u = 2^-11 relative. With exact products and float32
// sums, |dot~ - dot| <= c ||q|| ||g||, c = 2u + u^2 + D 2^-22 (accumulation, twice the
// truncating-adder bound) + D 2^-23 (the re-rank's own float32 dot), x 1.25. Every
// non-candidate j has approximate distance >= tau (the kCand-th candidate's), so its
// float32 distance is >= tau - e with e = 2 c sqrt(||q||^2 max||g||^2) + 2^-20
// (||q||^2 + max||g||^2) (the roundings of ||q||^2 + ||g||^2 - 2 dot). The query is
// certified when the k-th re-ranked distance is < tau - e: then the top k in float32
// (the re-rank's own arithmetic), ties to the smaller index included, lie among the
// candidates. The exact pass computes its float32 distances differently (3xTF32), so a
// certified query's distances can differ from it in the last bits, and so can the
// order of two rows within that rounding of each other (exact duplicates cannot: both
// arithmetics give them equal values). Rows with non-finite values or extreme
// magnitudes are never certified (a gallery one: no query is).
constexpr int kCand = 32;         // one candidate per lane of the re-rank warp
constexpr int kCandMaxK = 16;     // the path runs for k <= this (the rest is headroom)
constexpr int kScaleExpLimit = 48;  // rows with max |x| outside 2^+-48 go to the exact pass

// Warp per row: float16 copy scaled by a power of two (padded with zeros to Dp
// columns), the scale back (2^(E-15)), and validity: finite values, a finite norm and
// a max |x| within 2^+-kScaleExpLimit (or an all-zero row). Invalid rows: row_bad[row]
// = 1 (when given) and *any_bad = 1 (when given); valid rows raise *max_norm_bits.
__global__ void __launch_bounds__(256) to_half_scaled_kernel(const float* __restrict__ x, int rows, int D, int Dp,
                                                             const float* __restrict__ norms,
                                                             __half* __restrict__ out, float* __restrict__ scale,
                                                             int* __restrict__ row_bad, int* __restrict__ any_bad,
                                                             unsigned* __restrict__ max_norm_bits) {
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * 8 + threadIdx.x / 32;
  if (row >= rows) return;
  const float* p = x + static_cast<int64_t>(row) * D;
  float m = 0.f;
  bool finite = true;
  for (int e = lane; e < D; e += 32) {
    const float v = p[e];
    finite = finite && isfinite(v);
    m = fmaxf(m, fabsf(v));
  }
  finite = __all_sync(0xffffffffu, finite);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  int E = 0;
  if (m > 0.f) frexpf(m, &E);  // m in [2^(E-1), 2^E)
  const float nrm = norms[row];
  const bool ok = finite && isfinite(nrm) && (m == 0.f || (E >= -kScaleExpLimit && E <= kScaleExpLimit));
  const float up = ok ? ldexpf(1.f, 15 - E) : 0.f;  // exact power of two
  __half* o = out + static_cast<int64_t>(row) * Dp;
  // an invalid row becomes zeros (inf * 0 would give NaN); it is never certified anyway
  for (int e = lane; e < Dp; e += 32) o[e] = __float2half_rn(ok && e < D ? p[e] * up : 0.f);
  if (lane == 0) {
    scale[row] = ok ? ldexpf(1.f, E - 15) : 0.f;
    if (row_bad != nullptr) row_bad[row] = ok ? 0 : 1;
    if (!ok && any_bad != nullptr) atomicOr(any_bad, 1);
    if (ok && max_norm_bits != nullptr) atomicMax(max_norm_bits, __float_as_uint(nrm));  // >= 0: bits order as values
  }
}

// Warp per query: exact float32 distances of the kCand candidates (one per lane),
// bitonic sort by (distance, index), certification against tau - e; certified rows
// get their k results (and their vote), the others flags[q] = 1 for the exact pass.
template <bool kVote>
__global__ void __launch_bounds__(256) knn_rerank_kernel(
    const float* __restrict__ q, const float* __restrict__ g, const float* __restrict__ qn,
    const float* __restrict__ gn, int Q, int D, int k, const float* __restrict__ cand_d,
    const int64_t* __restrict__ cand_i, const int* __restrict__ status, float c_dot, float* __restrict__ out_d,
    int64_t* __restrict__ out_i, int* __restrict__ flags, const int64_t* __restrict__ labels, int64_t N, int64_t C,
    int64_t* __restrict__ votes, int64_t* __restrict__ pred) {
  // status: [0] any gallery row invalid, [1] bits of max ||g||^2, [2 + q] query row q invalid
  const int qi = blockIdx.x * 8 + threadIdx.x / 32;
  if (qi >= Q) return;
  const int lane = threadIdx.x % 32;
  const int64_t cbase = static_cast<int64_t>(qi) * kCand;
  const int64_t my_j = cand_i[cbase + lane];
  const float* xq = q + static_cast<int64_t>(qi) * D;
  float my_dot = 0.f;
  for (int c = 0; c < kCand; ++c) {
    const int64_t j = __shfl_sync(0xffffffffu, my_j, c);
    if (j < 0) continue;  // warp-uniform
    const float* xg = g + j * D;
    float dot = 0.f;
    for (int e = lane; e < D; e += 32) dot = fmaf(xq[e], xg[e], dot);
    dot = warp_sum(dot);
    if (lane == c) my_dot = dot;
  }
  const float rn = qn[qi];
  float d = my_j >= 0 ? clamp0(rn + gn[my_j] - 2.f * my_dot) : 0.f;
  int j = static_cast<int>(my_j);
  for (int size = 2; size <= 32; size <<= 1) {  // bitonic sort across the warp, ascending
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      const float od = __shfl_xor_sync(0xffffffffu, d, stride);
      const int oj = __shfl_xor_sync(0xffffffffu, j, stride);
      const bool keep_min = ((lane & stride) == 0) == ((lane & size) == 0 || size == 32);
      if (keep_min ? knn_less(od, oj, d, j) : knn_less(d, j, od, oj)) {
        d = od;
        j = oj;
      }
    }
  }
  const float dk = __shfl_sync(0xffffffffu, d, k - 1);
  const int jk = __shfl_sync(0xffffffffu, j, k - 1);
  const float tau = cand_i[cbase + kCand - 1] < 0 ? INFINITY : cand_d[cbase + kCand - 1];
  const float gmax = __uint_as_float(static_cast<unsigned>(status[1]));
  // sqrt(rn) sqrt(gmax), not sqrt(rn gmax): the product can underflow for tiny rows (e too small)
  const float e = 2.f * c_dot * (sqrtf(rn) * sqrtf(gmax)) + ldexpf(rn + gmax, -20);
  const bool certified = status[0] == 0 && status[2 + qi] == 0 && jk >= 0 && dk < tau - e;  // NaN: false
  if (lane == 0) flags[qi] = certified ? 0 : 1;
  if (!certified) return;  // warp-uniform
  const int64_t obase = static_cast<int64_t>(qi) * k;
  if (lane < k) {
    out_i[obase + lane] = j;
    if (out_d != nullptr) out_d[obase + lane] = d;
  }
  if (kVote) {
    __syncwarp();  // the idx writes are visible to the warp
    vote_row(out_i + obase, k, labels, N, C, votes + static_cast<int64_t>(qi) * C, pred + qi);
  }
}

// ------------------------------------------------------------- float32 filter path
// Opt-in (DNNRL_KNN_FILTER=1): the same float16 copies and error bound as the candidate
// path above, but no per-thread candidate lists, whose insertion sort (divergent: 8 of 32
// lanes active in Nsight Compute) made that path slow. Instead a threshold that provably
// admits every true neighbour:
//   bound pass   an upper bound tau_s on the approximate k-th distance of each query over
//                a strided subset of the gallery (every s-th row): the k-th smallest of
//                disjoint column groups' minima (knn_bound_kernel + knn_bound_select_kernel;
//                no lists either)
//   filter pass  every approximate distance a_j <= tau_s + 2e (+ rounding slack) is
//                appended to the query's candidate buffer (an atomic slot counter; rare)
//   re-rank      warp per query: alpha = the k-th smallest a_j among the candidates; the
//                exact float32 distance (the candidate path's re-rank arithmetic) of every
//                candidate with a_j <= alpha + 2e; the top k of those by (distance, index)
// Proof, with |a_j - f_j| <= e for every valid row (f: the float32 distance): k distinct
// subset rows have a <= tau_s, so f <= tau_s + e for them, so the k-th smallest f over the whole gallery,
// f_(k), is <= tau_s + e, and every j with f_j <= f_(k) has a_j <= f_j + e <= tau_s + 2e: a
// candidate. Likewise the k candidates with a <= alpha bound f_(k) <= alpha + e, so every
// such j has a_j <= alpha + 2e and is re-ranked. The top k by (f, j) over the re-ranked rows
// is therefore the top k over the gallery, ties to the smaller index included.
// Queries with more than kFilterCap candidates, fewer than k (non-finite rows), or any
// invalid row (as in the candidate path) take the exact pass. Expected candidates per
// query: about s k (the subset's k-th is about the (s k)-th of the gallery) plus the rows
// within the band, so s is chosen to keep that near kFilterCap / 4.
constexpr int kFilterCap = 512;                   // candidate slots per query
constexpr int kFilterPerLane = kFilterCap / 32;   // held in registers by the re-rank warp
constexpr int kFilterMaxK = 32;
constexpr int kFilterMaxStride = 16;
constexpr int kFilterChunk = 8192;                // queries per filter pass: 32 MiB of slots
constexpr int kFilterMaxSplits = 64;
constexpr int kBoundBuckets = 16;                 // column groups per thread of the bound pass
constexpr int kBoundMaxSplits = 8;                // so at most 8 x 2 x 16 group minima per query
constexpr int kBoundMaxGroups = kBoundMaxSplits * 2 * kBoundBuckets;

// Slack added to an approximate distance: 2e (e as in knn_rerank_kernel: |a_j - f_j| <= e)
// plus 2^-20 (||q||^2 + max||g||^2) for the float32 roundings of the sums that use it.
__device__ __forceinline__ float filter_slack(float rn, float gmax, float c_dot) {
  const float e = 2.f * c_dot * (sqrtf(rn) * sqrtf(gmax)) + ldexpf(rn + gmax, -20);
  return 2.f * e + ldexpf(rn + gmax, -20);
}

// Warp per subset row i: gallery row ((i * mult) mod Ns) * stride of the float16 copy (Dp % 8
// == 0: whole 16-byte vectors), with its float32 norm and its scale. mult is coprime to Ns,
// so the subset is still every stride-th row, each once, but in a scrambled order: the bound
// pass groups neighbouring subset columns, and a gallery sorted by class (ImageFolder order)
// would otherwise put a query's nearest rows into a few contiguous tiles, and so into few
// groups (a kernel-exact emulation: one FER-scale query over its slots).
__global__ void __launch_bounds__(256) gather_subset_kernel(const __half* __restrict__ g16,
                                                            const float* __restrict__ gn,
                                                            const float* __restrict__ gs, int Ns, int stride,
                                                            int64_t mult, int Dp, __half* __restrict__ out16,
                                                            float* __restrict__ out_n, float* __restrict__ out_s) {
  const int i = blockIdx.x * 8 + threadIdx.x / 32;
  if (i >= Ns) return;
  const int lane = threadIdx.x % 32;
  const int64_t src = (static_cast<int64_t>(i) * mult % Ns) * stride;
  const int4* s = reinterpret_cast<const int4*>(g16 + src * Dp);
  int4* d = reinterpret_cast<int4*>(out16 + static_cast<int64_t>(i) * Dp);
  for (int v = lane; v < Dp / 8; v += 32) d[v] = s[v];
  if (lane == 0) {
    out_n[i] = gn[src];
    out_s[i] = gs[src];
  }
}

// A column tile's squared norms and float16 scales into shared memory (the bound and
// filter passes); columns past N get 0. Visible to the block after its next barrier.
template <int BN, int NT>
__device__ __forceinline__ void stage_col_scales(float* cn, float* cs, const float* __restrict__ gn,
                                                 const float* __restrict__ gs, int col0, int N) {
  for (int c = threadIdx.x; c < BN; c += NT) {
    cn[c] = col0 + c < N ? gn[col0 + c] : 0.f;
    cs[c] = col0 + c < N ? gs[col0 + c] : 0.f;
  }
}

// Bound pass over the float16 copies of the gallery subset (kScaled arithmetic of
// knn_pass_kernel), without lists: thread t (query row t / TPR, every TPR-th column of each
// tile) keeps the smallest approximate distance in each of kBoundBuckets column groups
// (its columns u = b mod kBoundBuckets of every tile of its split). The groups of all
// threads and splits of a row are disjoint, so the k-th smallest group minimum is the
// approximate distance of a row with k - 1 other rows at or below it: an upper bound on the
// subset's k-th smallest, which is all the proof needs (about the subset's k-th when the
// k nearest fall into distinct groups; there are splits x TPR x 16 of them). part: (splits,
// Q, TPR, kBoundBuckets) minima, +inf for an empty group.
// No two-blocks-per-SM register cap here (unlike knn_filter_kernel): the 16 running minima
// stay live across the tile's main loop. Under the cap a fully unrolled epilogue spilled
// (448-byte stack frame); as written (unrolled by bucket only) the kernel takes 128
// registers with 64-wide D chunks and 164 with 32-wide ones, no spills. The pass covers
// 1 / s of the gallery.
template <typename Eng>
__global__ void __launch_bounds__(Eng::kThreads) knn_bound_kernel(
    const __half* __restrict__ q, const __half* __restrict__ g, const float* __restrict__ qn,
    const float* __restrict__ gn, const float* __restrict__ qs, const float* __restrict__ gs, int Q, int N, int Dp,
    int col_tiles, int splits, float* __restrict__ part) {
  constexpr int BM = Eng::BM, BN = Eng::BN, NT = Eng::kThreads, LDS = Eng::LDS;
  constexpr int TPR = NT / BM;
  constexpr int CPT = BN / TPR;
  static_assert(std::is_same<typename Eng::T, __half>::value, "the bound pass reads the float16 copies");
  static_assert(CPT % kBoundBuckets == 0, "every bucket takes the same columns of each tile");
  extern __shared__ __align__(128) unsigned char smem[];
  float* cn = reinterpret_cast<float*>(smem + Eng::kMainBytes);
  float* cs = cn + BN;
  const int tid = threadIdx.x;
  const int row0 = blockIdx.x * BM, split = blockIdx.y;
  const int r = tid / TPR, h = tid % TPR;
  const int row = row0 + r;
  const bool row_ok = row < Q;
  const float rn = row_ok ? qn[row] : 0.f;
  const float rs2 = row_ok ? 2.f * qs[row] : 2.f;
  float m[kBoundBuckets];
#pragma unroll
  for (int b = 0; b < kBoundBuckets; ++b) m[b] = INFINITY;
  for (int ct = split; ct < col_tiles; ct += splits) {
    const int col0 = ct * BN;
    stage_col_scales<BN, NT>(cn, cs, gn, gs, col0, N);
    Eng::run(q, row0, Q, g, col0, N, Dp, true, smem);  // ends with a barrier: cn/cs visible
    const float* S = reinterpret_cast<const float*>(smem);
    if (row_ok) {
#pragma unroll 1
      for (int u0 = 0; u0 < CPT; u0 += kBoundBuckets) {
#pragma unroll
        for (int b = 0; b < kBoundBuckets; ++b) {  // column u = u0 + b goes to bucket b
          const int c = ((u0 + b + r) % CPT) * TPR + h;  // staggered: no bank conflicts on S
          if (col0 + c < N) {
            const float d = clamp0(rn + cn[c] - rs2 * (cs[c] * S[r * LDS + c]));
            m[b] = fminf(m[b], d);  // (NaN only in flagged rows)
          }
        }
      }
    }
    __syncthreads();  // S, cn, cs are overwritten by the next tile
  }
  if (row_ok) {
    const int64_t base = ((static_cast<int64_t>(split) * Q + row) * TPR + h) * kBoundBuckets;
#pragma unroll
    for (int b = 0; b < kBoundBuckets; ++b) part[base + b] = m[b];
  }
}

// Warp per query: bound[q] = the k-th smallest of its splits x tpr x kBoundBuckets group
// minima (at most kBoundMaxGroups, kBoundMaxGroups / 32 per lane), by k extract-min rounds.
__global__ void __launch_bounds__(256) knn_bound_select_kernel(const float* __restrict__ part, int splits, int tpr,
                                                               int Q, int k, float* __restrict__ bound) {
  const int qi = blockIdx.x * 8 + threadIdx.x / 32;
  if (qi >= Q) return;
  const int lane = threadIdx.x % 32;
  const int per_split = tpr * kBoundBuckets;
  const int G = splits * per_split;
  float v[kBoundMaxGroups / 32];
  int id[kBoundMaxGroups / 32];
#pragma unroll
  for (int u = 0; u < kBoundMaxGroups / 32; ++u) {
    const int e = lane + 32 * u;
    const bool in = e < G;
    v[u] = in ? part[(static_cast<int64_t>(e / per_split) * Q + qi) * per_split + e % per_split] : 0.f;
    id[u] = in ? e : -1;  // unique ids: ties between equal minima go to the smaller id
  }
  float bd = 0.f;
  for (int e = 0; e < k; ++e) {
    bd = 0.f;
    int bj = -1;
#pragma unroll
    for (int u = 0; u < kBoundMaxGroups / 32; ++u) {
      if (knn_less(v[u], id[u], bd, bj)) {
        bd = v[u];
        bj = id[u];
      }
    }
    warp_min_pair(bd, bj);
#pragma unroll
    for (int u = 0; u < kBoundMaxGroups / 32; ++u)
      if (bj >= 0 && id[u] == bj) id[u] = -1;  // extracted
    if (bj < 0) {  // fewer than k groups (k > G cannot happen: G >= 32 >= k): admit everything
      bd = INFINITY;
      break;
    }
  }
  if (lane == 0) bound[qi] = bd;
}

// Filter pass over the float16 copies (kScaled arithmetic of knn_pass_kernel). Thread t
// owns query row t / TPR and every TPR-th column of each tile; an approximate distance at
// or below the row's threshold takes a slot from count[row]. No lists, so no insertion
// and no per-thread state beyond the threshold: two blocks fit an SM.
template <typename Eng>
__global__ void __launch_bounds__(Eng::kThreads, 2) knn_filter_kernel(
    const __half* __restrict__ q, const __half* __restrict__ g, const float* __restrict__ qn,
    const float* __restrict__ gn, const float* __restrict__ qs, const float* __restrict__ gs,
    const float* __restrict__ bound, const int* __restrict__ status, const int* __restrict__ q_bad,
    float c_dot, int Q, int N, int Dp, int col_tiles, int splits, int* __restrict__ count,
    int* __restrict__ cand_j, float* __restrict__ cand_a) {
  constexpr int BM = Eng::BM, BN = Eng::BN, NT = Eng::kThreads, LDS = Eng::LDS;
  constexpr int TPR = NT / BM;
  constexpr int CPT = BN / TPR;
  static_assert(std::is_same<typename Eng::T, __half>::value, "the filter pass reads the float16 copies");
  extern __shared__ __align__(128) unsigned char smem[];
  float* cn = reinterpret_cast<float*>(smem + Eng::kMainBytes);
  float* cs = cn + BN;
  if (status[0] != 0) return;  // an invalid gallery row: every query takes the exact pass (grid-uniform)
  const int tid = threadIdx.x;
  const int row0 = blockIdx.x * BM, split = blockIdx.y;
  const int r = tid / TPR, h = tid % TPR;
  const int row = row0 + r;
  const bool row_ok = row < Q;
  float rn = 0.f, rs2 = 2.f, thr = -1.f;  // distances are >= 0 (or NaN): -1 admits nothing
  if (row_ok) {
    rn = qn[row];
    rs2 = 2.f * qs[row];  // x2 and a power of two: exact
    if (q_bad[row] == 0) {
      const float gmax = __uint_as_float(static_cast<unsigned>(status[1]));
      thr = bound[row] + filter_slack(rn, gmax, c_dot);  // NaN: nothing; +inf: everything
    }
  }
  const int64_t slots = static_cast<int64_t>(row) * kFilterCap;
  for (int ct = split; ct < col_tiles; ct += splits) {
    const int col0 = ct * BN;
    stage_col_scales<BN, NT>(cn, cs, gn, gs, col0, N);
    Eng::run(q, row0, Q, g, col0, N, Dp, true, smem);  // ends with a barrier: cn/cs visible
    const float* S = reinterpret_cast<const float*>(smem);
    if (row_ok) {
      for (int u = 0; u < CPT; ++u) {
        const int c = ((u + r) % CPT) * TPR + h;  // staggered: no bank conflicts on S
        const int j = col0 + c;
        if (j >= N) continue;
        const float d = clamp0(rn + cn[c] - rs2 * (cs[c] * S[r * LDS + c]));
        if (d <= thr) {
          const int p = atomicAdd(count + row, 1);
          if (p < kFilterCap) {
            cand_j[slots + p] = j;
            cand_a[slots + p] = d;
          }
        }
      }
    }
    __syncthreads();  // S, cn, cs are overwritten by the next tile
  }
}

// Warp per query: the exact re-rank of the filter pass's candidates (see above). Rows
// that cannot be answered here get flags[q] = 1 (the exact pass), the others their k
// results (and their vote).
template <bool kVote>
__global__ void __launch_bounds__(256) knn_filter_rerank_kernel(
    const float* __restrict__ q, const float* __restrict__ g, const float* __restrict__ qn,
    const float* __restrict__ gn, const int* __restrict__ status, const int* __restrict__ q_bad, float c_dot, int Q,
    int D, int k, const int* __restrict__ count, const int* __restrict__ cand_j, const float* __restrict__ cand_a,
    float* __restrict__ out_d, int64_t* __restrict__ out_i, int* __restrict__ flags,
    const int64_t* __restrict__ labels, int64_t N, int64_t C, int64_t* __restrict__ votes,
    int64_t* __restrict__ pred) {
  const int qi = blockIdx.x * 8 + threadIdx.x / 32;
  if (qi >= Q) return;
  const int lane = threadIdx.x % 32;
  const int n = count[qi];
  const bool ok = status[0] == 0 && q_bad[qi] == 0 && n >= k && n <= kFilterCap;
  if (lane == 0) flags[qi] = ok ? 0 : 1;
  if (!ok) return;  // warp-uniform
  const int64_t base = static_cast<int64_t>(qi) * kFilterCap;
  float a[kFilterPerLane], f[kFilterPerLane];
  int j[kFilterPerLane];
#pragma unroll
  for (int u = 0; u < kFilterPerLane; ++u) {
    const int e = lane + 32 * u;
    a[u] = e < n ? cand_a[base + e] : 0.f;
    j[u] = e < n ? cand_j[base + e] : -1;  // an empty slot sorts after everything
    f[u] = 0.f;
  }
  // alpha: the k-th smallest (a, j) among the candidates, by k extract-min rounds
  unsigned taken = 0u;
  float alpha = 0.f;
  for (int e = 0; e < k; ++e) {
    float bd = 0.f;
    int bj = -1;
#pragma unroll
    for (int u = 0; u < kFilterPerLane; ++u) {
      if (!((taken >> u) & 1u) && knn_less(a[u], j[u], bd, bj)) {
        bd = a[u];
        bj = j[u];
      }
    }
    warp_min_pair(bd, bj);
#pragma unroll
    for (int u = 0; u < kFilterPerLane; ++u)
      if (bj >= 0 && j[u] == bj) taken |= 1u << u;  // candidate indices are unique
    alpha = bd;
  }
  const float rn = qn[qi];
  const float gmax = __uint_as_float(static_cast<unsigned>(status[1]));
  const float lim = alpha + filter_slack(rn, gmax, c_dot);
  const float* xq = q + static_cast<int64_t>(qi) * D;
  unsigned in_r = 0u;  // the candidates re-ranked in float32
#pragma unroll
  for (int u = 0; u < kFilterPerLane; ++u) {
    const bool in = j[u] >= 0 && a[u] <= lim;
    if (in) in_r |= 1u << u;
    unsigned m = __ballot_sync(0xffffffffu, in);
    while (m != 0u) {  // warp-uniform
      const int src = __ffs(m) - 1;
      m &= m - 1u;
      const int jj = __shfl_sync(0xffffffffu, j[u], src);
      const float* xg = g + static_cast<int64_t>(jj) * D;
      float dot = 0.f;  // the candidate path's re-rank arithmetic, to the operation
      for (int e = lane; e < D; e += 32) dot = fmaf(xq[e], xg[e], dot);
      dot = warp_sum(dot);
      if (lane == src) f[u] = clamp0(rn + gn[jj] - 2.f * dot);
    }
  }
  const int64_t obase = static_cast<int64_t>(qi) * k;
  for (int e = 0; e < k; ++e) {
    float bd = 0.f;
    int bj = -1;
#pragma unroll
    for (int u = 0; u < kFilterPerLane; ++u) {
      if (((in_r >> u) & 1u) && knn_less(f[u], j[u], bd, bj)) {
        bd = f[u];
        bj = j[u];
      }
    }
    warp_min_pair(bd, bj);
#pragma unroll
    for (int u = 0; u < kFilterPerLane; ++u)
      if (bj >= 0 && j[u] == bj) in_r &= ~(1u << u);
    if (lane == 0) {
      out_i[obase + e] = bj;
      if (out_d != nullptr) out_d[obase + e] = bd;
    }
  }
  if (kVote) {
    __syncwarp();  // lane 0's idx writes are visible to the warp
    vote_row(out_i + obase, k, labels, N, C, votes + static_cast<int64_t>(qi) * C, pred + qi);
  }
}

// ------------------------------------------------------------------ host side
template <typename Eng>
bool knn_fits(int k) {
  return knn_smem<Eng>(k) <= static_cast<size_t>(max_smem_optin());
}

// Tile pass + merge with engine Eng. Writes out_i (and out_d when non-null; and
// votes/pred when labels is non-null) for every query row, or only for the rows with
// a non-zero row_flags entry when row_flags is given. qs/gs: row scales (kScaled).
template <typename Eng, bool kScaled = false>
void knn_fast(const typename Eng::T* q, const typename Eng::T* g, const typename Eng::acc_t* qn,
              const typename Eng::acc_t* gn, const typename Eng::acc_t* qs, const typename Eng::acc_t* gs,
              const int* row_flags, int Q, int N, int D, bool vec, int k, typename Eng::acc_t* out_d,
              int64_t* out_i, const int64_t* labels, int64_t C, int64_t* votes, int64_t* pred,
              const at::TensorOptions& opts, cudaStream_t stream) {
  using acc_t = typename Eng::acc_t;
  constexpr int TPR = Eng::kThreads / Eng::BM;
  const size_t smem = knn_smem<Eng>(k);
  auto kern = knn_pass_kernel<Eng, kScaled>;
  allow_smem(kern, smem);
  const int64_t row_tiles = ceil_div<int64_t>(Q, Eng::BM);
  const int64_t col_tiles = ceil_div<int64_t>(N, Eng::BN);
  const int splits = static_cast<int>(
      pick_splits(resident_slots(kern, Eng::kThreads, smem), row_tiles, col_tiles, kMaxLists / TPR));
  const int64_t entries = static_cast<int64_t>(splits) * Q * TPR * k;
  at::Tensor ws = at::empty({entries * static_cast<int64_t>(sizeof(acc_t) + sizeof(int))}, opts.dtype(at::kByte));
  acc_t* part_d = reinterpret_cast<acc_t*>(ws.data_ptr<uint8_t>());
  int* part_i = reinterpret_cast<int*>(part_d + entries);
  kern<<<dim3(static_cast<unsigned>(row_tiles), splits), Eng::kThreads, smem, stream>>>(
      q, g, qn, gn, qs, gs, row_flags, Q, N, D, vec, k, static_cast<int>(col_tiles), splits, part_d, part_i);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const unsigned blocks = static_cast<unsigned>(ceil_div<int64_t>(Q, 8));
  if (labels != nullptr) {
    knn_merge_kernel<acc_t, true><<<blocks, 256, 0, stream>>>(part_d, part_i, splits * TPR, TPR, Q, k, out_d, out_i,
                                                              labels, N, C, votes, pred, row_flags);
  } else {
    knn_merge_kernel<acc_t, false><<<blocks, 256, 0, stream>>>(part_d, part_i, splits * TPR, TPR, Q, k, out_d,
                                                               out_i, nullptr, N, 0, nullptr, nullptr, row_flags);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The exact tile path (every row, or the flagged rows only).
template <typename T>
void knn_exact(const T* qp, const T* gp, const typename Acc<T>::type* qn, const typename Acc<T>::type* gn,
               const int* row_flags, int Q, int N, int D, bool vec, int k, typename Acc<T>::type* dptr,
               int64_t* iptr, const int64_t* lab, int64_t C, int64_t* vptr, int64_t* pptr,
               const at::TensorOptions& opts, cudaStream_t stream) {
  using Large = typename Engines<T>::Large;
  using Small = typename Engines<T>::Small;
  const bool big = ceil_div<int64_t>(Q, Large::BM) * ceil_div<int64_t>(N, Large::BN) >= num_sms();
  if (k <= 32 && big && knn_fits<Large>(k)) {
    knn_fast<Large>(qp, gp, qn, gn, nullptr, nullptr, row_flags, Q, N, D, vec, k, dptr, iptr, lab, C, vptr, pptr,
                    opts, stream);
  } else {
    knn_fast<Small>(qp, gp, qn, gn, nullptr, nullptr, row_flags, Q, N, D, vec, k, dptr, iptr, lab, C, vptr, pptr,
                    opts, stream);
  }
}

// The float32 candidate path is opt-in: DNNRL_KNN_CANDIDATES=1 (and DNNRL_KNN_EXACT unset
// or 0). On the H200 (2026-11-28, benchmarks/results/nvidia-h200-2026-11-28-s7.json) it
// took 6.7 ms for knn_vote at FER-2013 scale (3,589 x 28,709 x 512, k = 10) against 4.8 ms
// for the exact 3xTF32 pass: its float16 pass keeps 32 candidates per query, and that
// selection, not the distance products, is what costs (Nsight Compute: 6.4 ms for the
// float16 tile pass, 4.7 ms for the float32 one). Kept, tested, for a faster selection.
bool candidate_path_enabled() {
  return env_flag("DNNRL_KNN_CANDIDATES", false) && !env_flag("DNNRL_KNN_EXACT", false);
}

// Float16 copies cost (Q + N) x D x 2 bytes: beyond this the exact pass runs instead.
constexpr int64_t kCandMaxCopyElems = int64_t(1) << 25;  // 64 MiB
// The candidate lists cost Q x 32 x 12 bytes plus Q x 512 bytes per column split of the
// tile pass; beyond this many queries (about 56 MiB with one split) the exact pass runs.
constexpr int64_t kCandMaxQueries = int64_t(1) << 16;

bool use_candidate_path(int Q, int N, int D, int k) {
  using HL = Engines<__half>::Large;
  using HS = Engines<__half>::Small;
  const int64_t Dp = ceil_div<int64_t>(D, 8) * 8;
  return k <= kCandMaxK && N > kCand && Q <= kCandMaxQueries &&
         (static_cast<int64_t>(Q) + N) * Dp <= kCandMaxCopyElems &&
         knn_fits<HL>(kCand) && knn_fits<HS>(kCand) && candidate_path_enabled();
}

// The float16 copies both opt-in float32 paths start from (to_half_scaled_kernel on the
// queries and the gallery): rows padded to Dp = D rounded up to 8, the row scales (qs: Q,
// gs: N) and the status words ([0] any gallery row invalid, [1] bits of max ||g||^2,
// [2 + q] query row q invalid). Owns the tensors; launches on `stream`.
struct HalfCopies {
  int Dp;
  at::Tensor q16, g16, scales, status;
  __half *q16p, *g16p;
  float *qs, *gs;
  int* st;
  HalfCopies(const float* qp, const float* gp, const float* qn, const float* gn, int Q, int N, int D,
             const at::TensorOptions& opts, cudaStream_t stream)
      : Dp(static_cast<int>(ceil_div<int64_t>(D, 8) * 8)),
        q16(at::empty({static_cast<int64_t>(Q) * Dp}, opts.dtype(at::kHalf))),
        g16(at::empty({static_cast<int64_t>(N) * Dp}, opts.dtype(at::kHalf))),
        scales(at::empty({static_cast<int64_t>(Q) + N}, opts.dtype(at::kFloat))),
        status(at::zeros({static_cast<int64_t>(Q) + 2}, opts.dtype(at::kInt))),
        q16p(reinterpret_cast<__half*>(q16.data_ptr<at::Half>())),
        g16p(reinterpret_cast<__half*>(g16.data_ptr<at::Half>())),
        qs(scales.data_ptr<float>()), gs(qs + Q), st(status.data_ptr<int>()) {
    to_half_scaled_kernel<<<static_cast<unsigned>(ceil_div<int64_t>(Q, 8)), 256, 0, stream>>>(
        qp, Q, D, Dp, qn, q16p, qs, st + 2, nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    to_half_scaled_kernel<<<static_cast<unsigned>(ceil_div<int64_t>(N, 8)), 256, 0, stream>>>(
        gp, N, D, Dp, gn, g16p, gs, nullptr, st, reinterpret_cast<unsigned*>(st + 1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// c of the float16 copies' error bound, |approximate dot - float32 dot| <= c ||q|| ||g||
// (derivation above knn_rerank_kernel).
float half_copy_bound(int D) {
  const double u = std::ldexp(1.0, -11);
  return static_cast<float>(1.25 * (2 * u + u * u + D * std::ldexp(1.0, -22) + D * std::ldexp(1.0, -23)));
}

void knn_candidates(const float* qp, const float* gp, const float* qn, const float* gn, int Q, int N, int D,
                    bool vec, int k, float* dptr, int64_t* iptr, const int64_t* lab, int64_t C, int64_t* vptr,
                    int64_t* pptr, const at::TensorOptions& opts, cudaStream_t stream) {
  using HL = Engines<__half>::Large;
  using HS = Engines<__half>::Small;
  HalfCopies hc(qp, gp, qn, gn, Q, N, D, opts, stream);
  __half *q16p = hc.q16p, *g16p = hc.g16p;
  float *qs = hc.qs, *gs = hc.gs;
  int* st = hc.st;
  const int Dp = hc.Dp;  // 16-byte rows: the vectorised staging
  at::Tensor flags = at::empty({Q}, opts.dtype(at::kInt));
  at::Tensor cand_d = at::empty({static_cast<int64_t>(Q) * kCand}, opts.dtype(at::kFloat));
  at::Tensor cand_i = at::empty({static_cast<int64_t>(Q) * kCand}, opts.dtype(at::kLong));
  const bool big = ceil_div<int64_t>(Q, HL::BM) * ceil_div<int64_t>(N, HL::BN) >= num_sms();
  if (big) {
    knn_fast<HL, true>(q16p, g16p, qn, gn, qs, gs, nullptr, Q, N, Dp, true, kCand, cand_d.data_ptr<float>(),
                       cand_i.data_ptr<int64_t>(), nullptr, 0, nullptr, nullptr, opts, stream);
  } else {
    knn_fast<HS, true>(q16p, g16p, qn, gn, qs, gs, nullptr, Q, N, Dp, true, kCand, cand_d.data_ptr<float>(),
                       cand_i.data_ptr<int64_t>(), nullptr, 0, nullptr, nullptr, opts, stream);
  }
  const float c_dot = half_copy_bound(D);
  const unsigned blocks = static_cast<unsigned>(ceil_div<int64_t>(Q, 8));
  if (lab != nullptr) {
    knn_rerank_kernel<true><<<blocks, 256, 0, stream>>>(qp, gp, qn, gn, Q, D, k, cand_d.data_ptr<float>(),
                                                        cand_i.data_ptr<int64_t>(), st, c_dot, dptr, iptr,
                                                        flags.data_ptr<int>(), lab, N, C, vptr, pptr);
  } else {
    knn_rerank_kernel<false><<<blocks, 256, 0, stream>>>(qp, gp, qn, gn, Q, D, k, cand_d.data_ptr<float>(),
                                                         cand_i.data_ptr<int64_t>(), st, c_dot, dptr, iptr,
                                                         flags.data_ptr<int>(), nullptr, N, 0, nullptr, nullptr);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // The uncertified rows (usually none: the blocks of the exact pass return at once).
  knn_exact<float>(qp, gp, qn, gn, flags.data_ptr<int>(), Q, N, D, vec, k, dptr, iptr, lab, C, vptr, pptr, opts,
                   stream);
  if (env_flag("DNNRL_KNN_STATS", false)) {  // diagnostics only: one device sync
    g_stats_exact_rows.store(flags.sum().item<int64_t>());
    g_stats_queries.store(Q);
  }
}

// The float32 filter path is opt-in: DNNRL_KNN_FILTER=1 (and DNNRL_KNN_EXACT unset or 0);
// it takes precedence over DNNRL_KNN_CANDIDATES. Not yet measured on a GPU.
bool filter_path_enabled() {
  return env_flag("DNNRL_KNN_FILTER", false) && !env_flag("DNNRL_KNN_EXACT", false);
}

// The filter pass's engines: the float16 tiles with 64-wide D chunks (DNNRL_KNN_FILTER_BK=32:
// the 32-wide ones of every other pass, for A/B timing). The bound pass always takes the
// 64-wide ones, chosen by size only: the A/B switches time the filter pass alone.
template <int BK>
struct FilterEngines {
  using Large = TcTile<__half, 128, 128, 64, 32, BK>;
  using Small = TcTile<__half, 64, 64, 32, 32, BK>;
};
bool filter_bk32() {
  const char* v = std::getenv("DNNRL_KNN_FILTER_BK");
  return v != nullptr && v[0] == '3' && v[1] == '2' && v[2] == '\0';
}
// DNNRL_KNN_FILTER_TILE=64: the filter pass on the 64x64 tile at any size (4 warps, up to
// four blocks per SM against the 128x128 tile's two), for A/B timing.
bool filter_small_tile() {
  const char* v = std::getenv("DNNRL_KNN_FILTER_TILE");
  return v != nullptr && v[0] == '6' && v[1] == '4' && v[2] == '\0';
}

bool use_filter_path(int Q, int N, int D, int k) {
  const int64_t Dp = ceil_div<int64_t>(D, 8) * 8;
  return k <= kFilterMaxK && Q <= kCandMaxQueries && (static_cast<int64_t>(Q) + N) * Dp <= kCandMaxCopyElems &&
         filter_path_enabled();
}

// Subset stride s: about s k candidates per query (about kFilterCap / 4, which leaves the
// tail room: modelled at FER-2013 scale with k = 10, s = 12, benchmarks/filter_path_model.py,
// random / clustered rows: mean 148 / 141, max 347 / 384 of 512), and at least k subset rows
// (s <= N / k, so ceil(N / s) >= k). The threshold's slack uses the largest gallery norm,
// so a gallery of very different row norms overflows the slots (exact pass: right, slow).
int filter_stride(int N, int k) {
  const int s = std::max(1, std::min(kFilterMaxStride, kFilterCap / (4 * k)));
  return std::max(1, std::min(s, N / k));
}

template <typename Eng>
void launch_filter(const __half* q16, const __half* g16, const float* qn, const float* gn, const float* qs,
                   const float* gs, const float* bound, const int* status, const int* q_bad, float c_dot, int Q,
                   int N, int Dp, int* count, int* cand_j, float* cand_a, cudaStream_t stream) {
  const size_t smem = Eng::kMainBytes + 2 * Eng::BN * sizeof(float);
  auto kern = knn_filter_kernel<Eng>;
  allow_smem(kern, smem);
  const int64_t row_tiles = ceil_div<int64_t>(Q, Eng::BM);
  const int64_t col_tiles = ceil_div<int64_t>(N, Eng::BN);
  const int splits = static_cast<int>(
      pick_splits(resident_slots(kern, Eng::kThreads, smem), row_tiles, col_tiles, kFilterMaxSplits));
  kern<<<dim3(static_cast<unsigned>(row_tiles), splits), Eng::kThreads, smem, stream>>>(
      q16, g16, qn, gn, qs, gs, bound, status, q_bad, c_dot, Q, N, Dp, static_cast<int>(col_tiles), splits, count,
      cand_j, cand_a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Bound pass (knn_bound_kernel over the subset, then knn_bound_select_kernel): bound (Q,).
template <typename Eng>
void launch_bound(const __half* q16, const __half* sub16, const float* qn, const float* sub_n, const float* qs,
                  const float* sub_s, int Q, int Ns, int Dp, int k, float* bound, const at::TensorOptions& opts,
                  cudaStream_t stream) {
  constexpr int TPR = Eng::kThreads / Eng::BM;
  static_assert(kBoundMaxSplits * TPR * kBoundBuckets <= kBoundMaxGroups, "group minima per query");
  const size_t smem = Eng::kMainBytes + 2 * Eng::BN * sizeof(float);
  auto kern = knn_bound_kernel<Eng>;
  allow_smem(kern, smem);
  const int64_t row_tiles = ceil_div<int64_t>(Q, Eng::BM);
  const int64_t col_tiles = ceil_div<int64_t>(Ns, Eng::BN);
  // As many splits, so group minima, as the subset's column tiles allow (up to 8 x 32 = 256).
  // The groups follow the engine's tile width, which bound_pass picks by Q and the card's SM
  // count: the same query can get another bound (so another candidate count) in another
  // batch or on another card. Either way its result is right up to float32 rounding, but a
  // query near the slot limit may be answered by the re-rank in one call and by the exact
  // pass in another, which can differ in the last bits. With few groups next to k the
  // k-th smallest minimum is loose (modelled: 32 groups for k = 32 sent half the queries of
  // a 300 x 4,000 case over their slots; 256 keep every FER-2013-scale query within them,
  // benchmarks/filter_path_model.py).
  const int splits = static_cast<int>(std::min<int64_t>(col_tiles, kBoundMaxSplits));
  at::Tensor part = at::empty({static_cast<int64_t>(splits) * Q * TPR * kBoundBuckets}, opts.dtype(at::kFloat));
  kern<<<dim3(static_cast<unsigned>(row_tiles), splits), Eng::kThreads, smem, stream>>>(
      q16, sub16, qn, sub_n, qs, sub_s, Q, Ns, Dp, static_cast<int>(col_tiles), splits, part.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  knn_bound_select_kernel<<<static_cast<unsigned>(ceil_div<int64_t>(Q, 8)), 256, 0, stream>>>(
      part.data_ptr<float>(), splits, TPR, Q, k, bound);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The bound pass on the 64-wide tiles, the 128x128 one once it gives every SM a block.
void bound_pass(const __half* q16, const __half* sub16, const float* qn, const float* sub_n, const float* qs,
                const float* sub_s, int Q, int Ns, int Dp, int k, float* bound, const at::TensorOptions& opts,
                cudaStream_t stream) {
  using HL = Engines<__half>::Large;
  if (ceil_div<int64_t>(Q, HL::BM) * ceil_div<int64_t>(Ns, HL::BN) >= num_sms()) {
    launch_bound<FilterEngines<64>::Large>(q16, sub16, qn, sub_n, qs, sub_s, Q, Ns, Dp, k, bound, opts, stream);
  } else {
    launch_bound<FilterEngines<64>::Small>(q16, sub16, qn, sub_n, qs, sub_s, Q, Ns, Dp, k, bound, opts, stream);
  }
}

// The filter pass with the engine chosen by size (as above) and by the A/B switches
// DNNRL_KNN_FILTER_BK / DNNRL_KNN_FILTER_TILE.
template <int BK>
void filter_pass(bool large, const __half* q16, const __half* g16, const float* qn, const float* gn, const float* qs,
                 const float* gs, const float* bound, const int* status, const int* q_bad, float c_dot, int Q, int N,
                 int Dp, int* count, int* cand_j, float* cand_a, cudaStream_t stream) {
  if (large) {
    launch_filter<typename FilterEngines<BK>::Large>(q16, g16, qn, gn, qs, gs, bound, status, q_bad, c_dot, Q, N, Dp,
                                                     count, cand_j, cand_a, stream);
  } else {
    launch_filter<typename FilterEngines<BK>::Small>(q16, g16, qn, gn, qs, gs, bound, status, q_bad, c_dot, Q, N, Dp,
                                                     count, cand_j, cand_a, stream);
  }
}
bool filter_large_tile(int64_t rows, int64_t cols) {
  using HL = Engines<__half>::Large;
  return !filter_small_tile() && ceil_div<int64_t>(rows, HL::BM) * ceil_div<int64_t>(cols, HL::BN) >= num_sms();
}

void knn_filter(const float* qp, const float* gp, const float* qn, const float* gn, int Q, int N, int D, bool vec,
                int k, float* dptr, int64_t* iptr, const int64_t* lab, int64_t C, int64_t* vptr, int64_t* pptr,
                const at::TensorOptions& opts, cudaStream_t stream) {
  HalfCopies hc(qp, gp, qn, gn, Q, N, D, opts, stream);
  __half *q16p = hc.q16p, *g16p = hc.g16p;
  float *qs = hc.qs, *gs = hc.gs;
  int* st = hc.st;
  const int Dp = hc.Dp;  // 16-byte rows: the vectorised staging

  // the subset of the bound pass: every s-th gallery row, in a scrambled order
  const int s = filter_stride(N, k);
  const int Ns = static_cast<int>(ceil_div<int64_t>(N, s));
  at::Tensor sub16 = at::empty({static_cast<int64_t>(Ns) * Dp}, opts.dtype(at::kHalf));
  at::Tensor sub_ns = at::empty({2 * static_cast<int64_t>(Ns)}, opts.dtype(at::kFloat));
  auto* sub16p = reinterpret_cast<__half*>(sub16.data_ptr<at::Half>());
  float* sub_n = sub_ns.data_ptr<float>();
  float* sub_s = sub_n + Ns;
  int64_t mult = 7919;  // a prime; the next odd number coprime to Ns
  while (std::gcd<int64_t, int64_t>(mult, Ns) != 1) mult += 2;
  gather_subset_kernel<<<static_cast<unsigned>(ceil_div<int64_t>(Ns, 8)), 256, 0, stream>>>(
      g16p, gn, gs, Ns, s, mult % Ns, Dp, sub16p, sub_n, sub_s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor bound_t = at::empty({static_cast<int64_t>(Q)}, opts.dtype(at::kFloat));
  float* bound = bound_t.data_ptr<float>();
  const bool bk32 = filter_bk32();
  const float c_dot = half_copy_bound(D);  // the candidate path's bound, unchanged

  // bound pass + filter pass + re-rank, in chunks of queries (the group minima and the
  // candidate slots are reused)
  const int chunk = std::min(Q, kFilterChunk);
  at::Tensor count = at::empty({chunk}, opts.dtype(at::kInt));
  at::Tensor cand_j = at::empty({static_cast<int64_t>(chunk) * kFilterCap}, opts.dtype(at::kInt));
  at::Tensor cand_a = at::empty({static_cast<int64_t>(chunk) * kFilterCap}, opts.dtype(at::kFloat));
  at::Tensor flags = at::empty({Q}, opts.dtype(at::kInt));
  int* cnt = count.data_ptr<int>();
  int* cj = cand_j.data_ptr<int>();
  float* ca = cand_a.data_ptr<float>();
  int* fl = flags.data_ptr<int>();
  for (int c0 = 0; c0 < Q; c0 += chunk) {
    const int Qc = std::min(chunk, Q - c0);
    C10_CUDA_CHECK(cudaMemsetAsync(cnt, 0, static_cast<size_t>(Qc) * sizeof(int), stream));
    const __half* qc16 = q16p + static_cast<int64_t>(c0) * Dp;
    bound_pass(qc16, sub16p, qn + c0, sub_n, qs + c0, sub_s, Qc, Ns, Dp, k, bound + c0, opts, stream);
    if (bk32) {
      filter_pass<32>(filter_large_tile(Qc, N), qc16, g16p, qn + c0, gn, qs + c0, gs, bound + c0, st, st + 2 + c0,
                      c_dot, Qc, N, Dp, cnt, cj, ca, stream);
    } else {
      filter_pass<64>(filter_large_tile(Qc, N), qc16, g16p, qn + c0, gn, qs + c0, gs, bound + c0, st, st + 2 + c0,
                      c_dot, Qc, N, Dp, cnt, cj, ca, stream);
    }
    const unsigned blocks = static_cast<unsigned>(ceil_div<int64_t>(Qc, 8));
    float* dc = dptr != nullptr ? dptr + static_cast<int64_t>(c0) * k : nullptr;
    int64_t* ic = iptr + static_cast<int64_t>(c0) * k;
    if (lab != nullptr) {
      knn_filter_rerank_kernel<true><<<blocks, 256, 0, stream>>>(
          qp + static_cast<int64_t>(c0) * D, gp, qn + c0, gn, st, st + 2 + c0, c_dot, Qc, D, k, cnt, cj, ca, dc, ic,
          fl + c0, lab, N, C, vptr + static_cast<int64_t>(c0) * C, pptr + c0);
    } else {
      knn_filter_rerank_kernel<false><<<blocks, 256, 0, stream>>>(
          qp + static_cast<int64_t>(c0) * D, gp, qn + c0, gn, st, st + 2 + c0, c_dot, Qc, D, k, cnt, cj, ca, dc, ic,
          fl + c0, nullptr, N, 0, nullptr, nullptr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // The rows the filter could not answer (usually none: the exact pass's blocks return at once).
  knn_exact<float>(qp, gp, qn, gn, fl, Q, N, D, vec, k, dptr, iptr, lab, C, vptr, pptr, opts, stream);
  if (env_flag("DNNRL_KNN_STATS", false)) {  // diagnostics only: one device sync
    g_stats_exact_rows.store(flags.sum().item<int64_t>());
    g_stats_queries.store(Q);
  }
}

// Shared driver of knn and knn_vote. out_d may be undefined (vote only needs idx).
template <typename scalar_t>
void knn_impl(const at::Tensor& query, const at::Tensor& gallery, int k, at::Tensor& out_d, at::Tensor& out_i,
              const at::Tensor* labels, int64_t C, at::Tensor* votes, at::Tensor* pred) {
  using T = typename Native<scalar_t>::type;
  using acc_t = typename Acc<scalar_t>::type;
  using Small = typename Engines<T>::Small;
  g_stats_exact_rows.store(-1);
  g_stats_queries.store(-1);
  const int Q = static_cast<int>(query.size(0)), N = static_cast<int>(gallery.size(0));
  const int D = static_cast<int>(query.size(1));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const T* qp = reinterpret_cast<const T*>(query.data_ptr<scalar_t>());
  const T* gp = reinterpret_cast<const T*>(gallery.data_ptr<scalar_t>());
  const bool vec = aligned16(qp) && aligned16(gp) && (D * sizeof(T)) % 16 == 0;
  const auto opts = query.options();
  at::Tensor norms = at::empty({static_cast<int64_t>(Q) + N}, opts.dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* qn = norms.data_ptr<acc_t>();
  acc_t* gn = qn + Q;
  row_norms_kernel<T, acc_t, true><<<static_cast<unsigned>(ceil_div<int64_t>(Q, 8)), 256, 0, stream>>>(qp, Q, D, qn);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  row_norms_kernel<T, acc_t, true><<<static_cast<unsigned>(ceil_div<int64_t>(N, 8)), 256, 0, stream>>>(gp, N, D, gn);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  acc_t* dptr = out_d.defined() ? out_d.data_ptr<acc_t>() : nullptr;
  const int64_t* lab = labels ? labels->data_ptr<int64_t>() : nullptr;
  int64_t* vptr = votes ? votes->data_ptr<int64_t>() : nullptr;
  int64_t* pptr = pred ? pred->data_ptr<int64_t>() : nullptr;
  if constexpr (std::is_same<T, float>::value) {
    if (use_filter_path(Q, N, D, k)) {
      knn_filter(qp, gp, qn, gn, Q, N, D, vec, k, dptr, out_i.data_ptr<int64_t>(), lab, C, vptr, pptr, opts, stream);
      return;
    }
    if (use_candidate_path(Q, N, D, k)) {
      knn_candidates(qp, gp, qn, gn, Q, N, D, vec, k, dptr, out_i.data_ptr<int64_t>(), lab, C, vptr, pptr, opts,
                     stream);
      return;
    }
  }
  if (knn_fits<Small>(k)) {
    knn_exact<T>(qp, gp, qn, gn, nullptr, Q, N, D, vec, k, dptr, out_i.data_ptr<int64_t>(), lab, C, vptr, pptr,
                 opts, stream);
  } else {
    at::Tensor d0 = out_d.defined() ? out_d : at::empty({Q, k}, opts.dtype(norms.scalar_type()));
    at::Tensor d1 = at::empty({Q, k}, d0.options());
    at::Tensor i1 = at::empty({Q, k}, out_i.options());
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(Q, static_cast<int64_t>(num_sms()) * 4));
    knn_large_kernel<T, acc_t><<<blocks, kLargeThreads, 0, stream>>>(qp, gp, qn, gn, Q, N, D, k,
                                                                     d0.data_ptr<acc_t>(), out_i.data_ptr<int64_t>(),
                                                                     d1.data_ptr<acc_t>(), i1.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (lab != nullptr) {
      vote_rows_kernel<acc_t><<<static_cast<unsigned>(ceil_div<int64_t>(Q, 8)), 256, 0, stream>>>(
          out_i.data_ptr<int64_t>(), Q, k, lab, N, C, vptr, pptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

void check_knn(const char* op, const at::Tensor& query, const at::Tensor& gallery, int64_t k) {
  TORCH_CHECK(query.is_cuda(), op, ": query must be a CUDA tensor");
  TORCH_CHECK(gallery.device() == query.device(), op, ": gallery is on ", gallery.device(), " but query is on ",
              query.device());
  TORCH_CHECK(query.dim() == 2, op, ": query must be 2-D (Q, D), got ", query.dim(), " dims");
  TORCH_CHECK(gallery.dim() == 2, op, ": gallery must be 2-D (N, D), got ", gallery.dim(), " dims");
  TORCH_CHECK(query.size(1) == gallery.size(1), op, ": query has dim ", query.size(1), " but gallery has dim ",
              gallery.size(1));
  TORCH_CHECK(query.scalar_type() == gallery.scalar_type(), op, ": query is ", query.scalar_type(),
              " but gallery is ", gallery.scalar_type());
  TORCH_CHECK(query.scalar_type() == at::kFloat || query.scalar_type() == at::kDouble ||
                  query.scalar_type() == at::kHalf || query.scalar_type() == at::kBFloat16,
              op, ": query must be float16, bfloat16, float32 or float64, got ", query.scalar_type());
  TORCH_CHECK(gallery.size(0) >= 1, op, ": gallery is empty");
  TORCH_CHECK(k >= 1 && k <= gallery.size(0), op, ": k must be in [1, ", gallery.size(0), "], got ", k);
  // Tile and row indices are int, and the last tile reaches up to 1,023 past the end (the
  // large-k kernel's 1,024-row steps): keep a margin below 2^31.
  constexpr int64_t kMaxRows = (int64_t(1) << 31) - 2048;
  TORCH_CHECK(query.size(0) < kMaxRows && gallery.size(0) < kMaxRows && query.size(1) < kMaxRows, op,
              ": query and gallery must have fewer than 2^31 - 2048 rows and columns, got query ", query.sizes(),
              " and gallery ", gallery.sizes());
}

std::tuple<at::Tensor, at::Tensor> knn_forward_kernel(const at::Tensor& query_in, const at::Tensor& gallery_in,
                                                      int64_t k) {
  check_knn("knn", query_in, gallery_in, k);
  c10::cuda::CUDAGuard guard(query_in.device());
  const at::Tensor query = query_in.contiguous(), gallery = gallery_in.contiguous();
  const auto acc_type = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dist = at::empty({query.size(0), k}, query.options().dtype(acc_type));
  at::Tensor idx = at::empty({query.size(0), k}, query.options().dtype(at::kLong));
  if (query.size(0) == 0) return {dist, idx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "dnnrl_knn_cuda", [&] {
    knn_impl<scalar_t>(query, gallery, static_cast<int>(k), dist, idx, nullptr, 0, nullptr, nullptr);
  });
  return {dist, idx};
}

std::tuple<at::Tensor, at::Tensor> knn_vote_kernel(const at::Tensor& query_in, const at::Tensor& gallery_in,
                                                   const at::Tensor& labels_in, int64_t k, int64_t num_classes) {
  check_knn("knn_vote", query_in, gallery_in, k);
  TORCH_CHECK(labels_in.dim() == 1 && labels_in.size(0) == gallery_in.size(0),
              "knn_vote: gallery_labels must have shape (", gallery_in.size(0), "), got ", labels_in.sizes());
  TORCH_CHECK(labels_in.device() == query_in.device(), "knn_vote: gallery_labels is on ", labels_in.device(),
              " but query is on ", query_in.device());
  TORCH_CHECK(at::isIntegralType(labels_in.scalar_type(), false), "knn_vote: gallery_labels must be integer, got ",
              labels_in.scalar_type());
  TORCH_CHECK(num_classes >= 1, "knn_vote: num_classes must be positive, got ", num_classes);
  c10::cuda::CUDAGuard guard(query_in.device());
  const at::Tensor query = query_in.contiguous(), gallery = gallery_in.contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t Q = query.size(0);
  at::Tensor pred = at::empty({Q}, query.options().dtype(at::kLong));
  at::Tensor votes = at::empty({Q, num_classes}, query.options().dtype(at::kLong));
  if (Q == 0) return {pred, votes};
  at::Tensor idx = at::empty({Q, k}, query.options().dtype(at::kLong));  // O(Q k) workspace
  at::Tensor no_dist;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "dnnrl_knn_vote_cuda", [&] {
    knn_impl<scalar_t>(query, gallery, static_cast<int>(k), no_dist, idx, &labels, num_classes, &votes, &pred);
  });
  return {pred, votes};
}

}  // namespace
}  // namespace cuda
}  // namespace dnnrl

TORCH_LIBRARY_IMPL(dnnrl_ext, CUDA, m) {
  m.impl("knn", &dnnrl::cuda::knn_forward_kernel);
  m.impl("knn_vote", &dnnrl::cuda::knn_vote_kernel);
}
