// CPU kernels of the triplet-loss ops (contracts in dnnrl_ext/reference.py):
//   triplet_loss           fused batch-hard / semi-hard / easy-positive mining + exp or hinge loss
//   triplet_loss_indexed   the same loss on explicit (anchor, positive, negative) triplets
//   triplet_loss_backward  gradient of either form from the saved indices
//
// Mining never holds the B x B distance matrix. The batch is cut into row blocks of
// T rows; for every block pair (I, J) with J >= I one BLAS product X_I X_J^T gives a
// T x T tile of d = ||x_i||^2 + ||x_j||^2 - 2 x_i.x_j that stays in cache and is reduced
// at once, row-wise for the anchors of I and column-wise for the anchors of J (the
// matrix is symmetric, so each pair is computed once). Workers keep per-anchor partial
// results that are merged at the end with the tie rules of common.h, so the result
// does not depend on which thread took which tile. Semi-hard mining needs d(a,p)
// first and makes a second pass over the same tiles.
//
// The expansion is only used to choose indices. Inputs with a non-finite value (or
// norms large enough to overflow it) go through an exact path instead, which computes
// every distance by explicit differences with the NaN rules of the reference.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"
#include "cpu/cpu_utils.h"
#include "cpu/tile_product.h"

namespace dnnrl {
namespace ops {

namespace {

using at::Tensor;
using cpu::cpu_has_avx2;
using cpu::exact_sq_dist;

template <typename acc_t>
constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();

// ----------------------------------------------------------------------------- mining state

// Best (value, index) per anchor of one worker; index -1 means "none yet".
template <typename acc_t>
struct AnchorBest {
  std::vector<acc_t> pos_v, neg_v;
  std::vector<int64_t> pos_j, neg_j;
  explicit AnchorBest(int64_t B)
      : pos_v(B, -kInf<acc_t>), neg_v(B, kInf<acc_t>), pos_j(B, -1), neg_j(B, -1) {}
};

template <typename acc_t>
inline void offer_max(acc_t v, int64_t j, acc_t& bv, int64_t& bj) {
  if (j >= 0 && better_max(v, j, bv, bj)) {
    bv = v;
    bj = j;
  }
}

template <typename acc_t>
inline void offer_min(acc_t v, int64_t j, acc_t& bv, int64_t& bj) {
  if (j >= 0 && better_min(v, j, bv, bj)) {
    bv = v;
    bj = j;
  }
}

// Tile-local best per column (column anchors of an off-diagonal tile); row indices
// are tile-relative int32 so that the update loop vectorises next to the float values.
template <typename acc_t>
struct ColumnBest {
  std::vector<acc_t> pos_v, neg_v;
  std::vector<int32_t> pos_r, neg_r;
  explicit ColumnBest(int64_t T) : pos_v(T), neg_v(T), pos_r(T), neg_r(T) {}
  void reset(int64_t n) {
    std::fill_n(pos_v.begin(), n, -kInf<acc_t>);
    std::fill_n(neg_v.begin(), n, kInf<acc_t>);
    std::fill_n(pos_r.begin(), n, -1);
    std::fill_n(neg_r.begin(), n, -1);
  }
};

enum class Pass { kHard, kSemi };

constexpr int kLanes = 16;

// Rows per distance tile: large enough for an efficient sgemm, small enough that the
// tile stays in L2 and that there are several tile pairs to share between threads.
int64_t tile_rows(int64_t B) {
  if (B >= 256) return 128;  // measured: 128 ~ 192 < 256 < 512 rows (D = 512, one thread)
  return std::max<int64_t>(16, ((B + 1) / 2 + 7) / 8 * 8);
}

// State of one tile-row sweep: the row anchor's kLanes running bests and the
// column anchors' running bests (off the diagonal).
template <typename acc_t>
struct RowSweep {
  const acc_t* srow;   // x_i . x_j for the tile's columns
  const acc_t* sqj;    // ||x_j||^2
  const int32_t* labj;
  const acc_t* thrj;   // semi-hard thresholds of the column anchors
  int64_t nj;
  acc_t sqi, ti;       // ||x_i||^2, threshold of the row anchor
  acc_t psign;         // +1: the farthest positive; -1: the nearest (easy_positive), as the largest -d
  int32_t li, self, rr;  // row label, column index of the anchor itself (-1: none), row index
  acc_t *bp, *bn, *cp, *cn;
  int32_t *bpj, *bnj, *cpr, *cnr;
};

// Portable sweep of columns [c, nj). Everything is element-wise: lane l keeps the
// best of columns l, l + kLanes, ...; column c keeps the best over rows so far.
// Comparisons are strict and indices ascend, so each keeps the smallest index
// among equals.
template <Pass kPass, bool kColumns, typename acc_t>
void sweep_row_scalar(const RowSweep<acc_t>& s, int64_t c) {
  constexpr bool kHard = kPass == Pass::kHard;
  const acc_t inf = kInf<acc_t>, two = acc_t(2);
  for (int l = 0; c < s.nj; ++c, l = (l + 1) % kLanes) {
    const acc_t v = (s.sqi + s.sqj[c]) - two * s.srow[c];
    const bool same = s.labj[c] == s.li;
    acc_t nc;
    if constexpr (kHard) {
      const acc_t pc = (same && c != s.self) ? s.psign * v : -inf;
      if (pc > s.bp[l]) { s.bp[l] = pc; s.bpj[l] = int32_t(c); }
      if (kColumns && pc > s.cp[c]) { s.cp[c] = pc; s.cpr[c] = s.rr; }
      nc = same ? inf : v;
    } else {
      nc = (!same && v > s.ti) ? v : inf;
    }
    if (nc < s.bn[l]) { s.bn[l] = nc; s.bnj[l] = int32_t(c); }
    if constexpr (kColumns) {
      const acc_t ncc = kHard ? nc : ((!same && v > s.thrj[c]) ? v : inf);
      if (ncc < s.cn[c]) { s.cn[c] = ncc; s.cnr[c] = s.rr; }
    }
  }
}

#if DNNRL_X86_SIMD
// Lanes of b where m is set, else of a (int32 lanes selected by a float mask).
__attribute__((target("avx2"), always_inline)) inline __m256i blend_i(__m256i a, __m256i b, __m256 m) {
  return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), m));
}

// AVX2 sweep of the float tiles (compilers do not vectorise the index-carrying
// selects above). Same arithmetic, (||x_i||^2 + ||x_j||^2) - 2 s without FMA, so
// results equal the portable path. 16 columns per step into lanes 0-7 and 8-15.
// Returns the first column left for the portable sweep.
template <Pass kPass, bool kColumns>
__attribute__((target("avx2"))) int64_t sweep_row_avx2(const RowSweep<float>& s) {
  constexpr bool kHard = kPass == Pass::kHard;
  const __m256 inf = _mm256_set1_ps(kInf<float>), ninf = _mm256_set1_ps(-kInf<float>);
  const __m256 two = _mm256_set1_ps(2.f), sqi = _mm256_set1_ps(s.sqi), ti = _mm256_set1_ps(s.ti);
  const __m256 psign = _mm256_set1_ps(s.psign);
  const __m256i li = _mm256_set1_epi32(s.li), self = _mm256_set1_epi32(s.self), rr = _mm256_set1_epi32(s.rr);
  const __m256i step = _mm256_set1_epi32(kLanes);
  __m256 bp[2], bn[2];
  __m256i bpj[2], bnj[2], idx[2];
  for (int h = 0; h < 2; ++h) {
    bp[h] = _mm256_loadu_ps(s.bp + 8 * h);
    bn[h] = _mm256_loadu_ps(s.bn + 8 * h);
    bpj[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.bpj + 8 * h));
    bnj[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.bnj + 8 * h));
    idx[h] = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 * h));
  }
  int64_t c = 0;
  for (; c + kLanes <= s.nj; c += kLanes) {
    for (int h = 0; h < 2; ++h) {
      const int64_t cc = c + 8 * h;
      const __m256 v = _mm256_sub_ps(_mm256_add_ps(sqi, _mm256_loadu_ps(s.sqj + cc)),
                                     _mm256_mul_ps(two, _mm256_loadu_ps(s.srow + cc)));
      const __m256i lab = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.labj + cc));
      const __m256 same = _mm256_castsi256_ps(_mm256_cmpeq_epi32(lab, li));
      __m256 nc;
      if constexpr (kHard) {
        const __m256 is_self = _mm256_castsi256_ps(_mm256_cmpeq_epi32(idx[h], self));
        const __m256 pc = _mm256_blendv_ps(ninf, _mm256_mul_ps(psign, v), _mm256_andnot_ps(is_self, same));
        const __m256 up = _mm256_cmp_ps(pc, bp[h], _CMP_GT_OQ);
        bp[h] = _mm256_blendv_ps(bp[h], pc, up);
        bpj[h] = blend_i(bpj[h], idx[h], up);
        if constexpr (kColumns) {
          const __m256 cpv = _mm256_loadu_ps(s.cp + cc);
          const __m256 cu = _mm256_cmp_ps(pc, cpv, _CMP_GT_OQ);
          _mm256_storeu_ps(s.cp + cc, _mm256_blendv_ps(cpv, pc, cu));
          __m256i* cpr = reinterpret_cast<__m256i*>(s.cpr + cc);
          _mm256_storeu_si256(cpr, blend_i(_mm256_loadu_si256(cpr), rr, cu));
        }
        nc = _mm256_blendv_ps(v, inf, same);
      } else {
        const __m256 beyond = _mm256_andnot_ps(same, _mm256_cmp_ps(v, ti, _CMP_GT_OQ));
        nc = _mm256_blendv_ps(inf, v, beyond);
      }
      const __m256 un = _mm256_cmp_ps(nc, bn[h], _CMP_LT_OQ);
      bn[h] = _mm256_blendv_ps(bn[h], nc, un);
      bnj[h] = blend_i(bnj[h], idx[h], un);
      if constexpr (kColumns) {
        __m256 ncc = nc;
        if constexpr (!kHard) {
          const __m256 beyond = _mm256_andnot_ps(same, _mm256_cmp_ps(v, _mm256_loadu_ps(s.thrj + cc), _CMP_GT_OQ));
          ncc = _mm256_blendv_ps(inf, v, beyond);
        }
        const __m256 cnv = _mm256_loadu_ps(s.cn + cc);
        const __m256 cu = _mm256_cmp_ps(ncc, cnv, _CMP_LT_OQ);
        _mm256_storeu_ps(s.cn + cc, _mm256_blendv_ps(cnv, ncc, cu));
        __m256i* cnr = reinterpret_cast<__m256i*>(s.cnr + cc);
        _mm256_storeu_si256(cnr, blend_i(_mm256_loadu_si256(cnr), rr, cu));
      }
      idx[h] = _mm256_add_epi32(idx[h], step);
    }
  }
  for (int h = 0; h < 2; ++h) {
    _mm256_storeu_ps(s.bp + 8 * h, bp[h]);
    _mm256_storeu_ps(s.bn + 8 * h, bn[h]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(s.bpj + 8 * h), bpj[h]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(s.bnj + 8 * h), bnj[h]);
  }
  return c;
}
#endif

template <Pass kPass, bool kColumns, typename acc_t>
void sweep_row(const RowSweep<acc_t>& s) {
  int64_t c = 0;
#if DNNRL_X86_SIMD
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu_has_avx2()) c = sweep_row_avx2<kPass, kColumns>(s);
  }
#endif
  sweep_row_scalar<kPass, kColumns>(s, c);
}

// Reduces one tile for the row anchors [i0, i0+ni) and, off the diagonal, for the
// column anchors [j0, j0+nj). `tile` holds x_I x_J^T; d = (||x_i||^2 + ||x_j||^2) - 2 s.
//   kHard: farthest positive (psign = 1; with psign = -1 the nearest, kept as -d so that
//          one max serves both: x -> -x is exact and keeps ties and NaN) and nearest negative.
//   kSemi: nearest negative with d > thr[anchor] (thr = d(a,p) + gamma).
// One fused sweep per tile row; lanes and column bests are merged with the tie rule.
template <Pass kPass, typename acc_t>
void reduce_tile(const acc_t* tile, int64_t i0, int64_t ni, int64_t j0, int64_t nj, const acc_t* sq,
                 const int32_t* lab, const acc_t* thr, acc_t psign, AnchorBest<acc_t>& best,
                 ColumnBest<acc_t>& col) {
  constexpr bool kHard = kPass == Pass::kHard;
  const bool diag = i0 == j0;
  col.reset(nj);
  acc_t bp[kLanes], bn[kLanes];
  int32_t bpj[kLanes], bnj[kLanes];
  RowSweep<acc_t> s;
  s.sqj = sq + j0;
  s.labj = lab + j0;
  s.thrj = kHard ? nullptr : thr + j0;
  s.nj = nj;
  s.psign = psign;
  s.bp = bp;
  s.bn = bn;
  s.bpj = bpj;
  s.bnj = bnj;
  s.cp = col.pos_v.data();
  s.cn = col.neg_v.data();
  s.cpr = col.pos_r.data();
  s.cnr = col.neg_r.data();
  for (int64_t r = 0; r < ni; ++r) {
    const int64_t gi = i0 + r;
    s.srow = tile + r * nj;
    s.sqi = sq[gi];
    s.ti = kHard ? acc_t(0) : thr[gi];
    s.li = lab[gi];
    s.self = diag ? int32_t(r) : -1;  // never a positive of itself
    s.rr = int32_t(r);
    for (int l = 0; l < kLanes; ++l) {
      bp[l] = -kInf<acc_t>;
      bn[l] = kInf<acc_t>;
      bpj[l] = -1;
      bnj[l] = -1;
    }
    if (diag) {
      sweep_row<kPass, false>(s);
    } else {
      sweep_row<kPass, true>(s);
    }
    for (int l = 0; l < kLanes; ++l) {
      if (kHard && bpj[l] >= 0) offer_max(bp[l], j0 + bpj[l], best.pos_v[gi], best.pos_j[gi]);
      if (bnj[l] >= 0) offer_min(bn[l], j0 + bnj[l], best.neg_v[gi], best.neg_j[gi]);
    }
  }
  if (diag) return;
  for (int64_t c = 0; c < nj; ++c) {
    const int64_t gj = j0 + c;
    if (kHard && s.cpr[c] >= 0) offer_max(s.cp[c], i0 + s.cpr[c], best.pos_v[gj], best.pos_j[gj]);
    if (s.cnr[c] >= 0) offer_min(s.cn[c], i0 + s.cnr[c], best.neg_v[gj], best.neg_j[gj]);
  }
}

// Semi-hard mining reads every tile twice (hardest positive, then the negative above its
// threshold). The first pass's products are kept for the second while they fit in this
// many bytes (float32: B up to about 2,800) instead of a second round of GEMMs, which
// made semi-hard cost 1.8-1.9x batch-hard (B = 128 / 512 / 2048, 2-core Zen 4).
constexpr int64_t kTileCacheBytes = int64_t(16) << 20;

// Tile pairs J >= I of a B-row batch.
int64_t tile_pair_count(int64_t B) {
  const int64_t T = tile_rows(B), nb = (B + T - 1) / T;
  return nb * (nb + 1) / 2;
}

// One pass over all tile pairs J >= I: workers take tiles dynamically, compute the
// tile with one GEMM call (tile_product.h) and reduce it into their own AnchorBest. Returns the
// per-worker results (merged by the caller; the merge is order-independent).
// `cache` (optional): empty, it is filled with every pair's product; filled, the pass
// reads the products from it instead of computing them (the same values, bit for bit).
template <Pass kPass, typename acc_t>
std::vector<AnchorBest<acc_t>> tiled_pass(const Tensor& xf, const acc_t* sq, const int32_t* lab,
                                          const acc_t* thr, acc_t psign, std::vector<Tensor>* cache = nullptr) {
  const int64_t B = xf.size(0);
  const int64_t T = tile_rows(B);
  const int64_t nb = (B + T - 1) / T;
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t bi = 0; bi < nb; ++bi)
    for (int64_t bj = bi; bj < nb; ++bj) pairs.emplace_back(bi, bj);
  const bool reuse = cache != nullptr && !cache->empty();
  const bool keep = cache != nullptr && cache->empty();
  if (keep) cache->resize(pairs.size());  // each worker then writes only the slots of its own pairs
  TORCH_INTERNAL_ASSERT(!reuse || cache->size() == pairs.size());
  // One worker for small batches (a 128-row batch is ~0.1 ms of BLAS).
  const bool small = B * B * xf.size(1) / 2 < cpu::kParallelTileWork;
  const int64_t nworkers =
      small ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), pairs.size()));
  std::vector<AnchorBest<acc_t>> best;
  best.reserve(nworkers);
  for (int64_t w = 0; w < nworkers; ++w) best.emplace_back(B);
  std::atomic<size_t> next{0};
  cpu::SingleThreadBlas single_thread_blas(nworkers == 1);
  const bool onednn = cpu::use_onednn_tiles(xf.scalar_type());
  at::parallel_for(0, nworkers, 1, [&](int64_t w0, int64_t w1) {
    std::vector<acc_t> buf(reuse || keep ? 0 : T * T);
    ColumnBest<acc_t> col(T);
    for (int64_t w = w0; w < w1; ++w) {
      for (size_t p = next.fetch_add(1); p < pairs.size(); p = next.fetch_add(1)) {
        const int64_t i0 = pairs[p].first * T, j0 = pairs[p].second * T;
        const int64_t ni = std::min(T, B - i0), nj = std::min(T, B - j0);
        Tensor prod;
        if (reuse) {
          prod = (*cache)[p];
        } else if (keep) {
          // the at::mm path writes into `slot`; the oneDNN path returns a tensor of its own
          Tensor slot = at::empty({ni, nj}, xf.options());
          prod = cpu::tile_product(xf.narrow(0, i0, ni), xf.narrow(0, j0, nj), onednn, slot.data_ptr());
          (*cache)[p] = prod.data_ptr() == slot.data_ptr() ? slot : prod;
        } else {
          prod = cpu::tile_product(xf.narrow(0, i0, ni), xf.narrow(0, j0, nj), onednn, buf.data());
        }
        reduce_tile<kPass>(prod.data_ptr<acc_t>(), i0, ni, j0, nj, sq, lab, thr, psign, best[w], col);
      }
    }
  });
  return best;
}

// Labels as dense int32 ids (only equality matters), so tiles compare 32-bit lanes.
std::vector<int32_t> dense_label_ids(const int64_t* labels, int64_t B) {
  std::vector<int64_t> order(B);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return labels[a] < labels[b]; });
  std::vector<int32_t> ids(B);
  int32_t next = -1;
  for (int64_t t = 0; t < B; ++t) {
    if (t == 0 || labels[order[t]] != labels[order[t - 1]]) ++next;
    ids[order[t]] = next;
  }
  return ids;
}

// Fast mining (finite inputs): fills pos / neg with -1 where none exists.
template <typename acc_t>
void mine_tiled(const Tensor& xf, const acc_t* sq, const int32_t* lab, int64_t mining, acc_t gamma,
                int64_t* pos, int64_t* neg) {
  const int64_t B = xf.size(0);
  std::vector<acc_t> pos_v(B);
  std::vector<Tensor> tiles;  // the first pass's products, for the semi-hard pass
  const int64_t tile_bytes = tile_pair_count(B) * tile_rows(B) * tile_rows(B) * int64_t(sizeof(acc_t));
  const bool cache_tiles = mining == kSemiHard && tile_bytes <= kTileCacheBytes;
  {
    const acc_t psign = mining == kEasyPositive ? acc_t(-1) : acc_t(1);
    auto parts = tiled_pass<Pass::kHard, acc_t>(xf, sq, lab, nullptr, psign, cache_tiles ? &tiles : nullptr);
    for (int64_t i = 0; i < B; ++i) {
      acc_t pv = -kInf<acc_t>, nv = kInf<acc_t>;
      int64_t pj = -1, nj = -1;
      for (auto& w : parts) {
        offer_max(w.pos_v[i], w.pos_j[i], pv, pj);
        offer_min(w.neg_v[i], w.neg_j[i], nv, nj);
      }
      pos[i] = pj;
      neg[i] = nj;
      pos_v[i] = pv;  // -d(a,p) for easy_positive (not used: no threshold)
    }
  }
  if (mining != kSemiHard) return;
  // The threshold uses the same tile value of d(a,p) that chose p, so a negative at
  // exactly the positive's distance (a duplicate row) is never taken as semi-hard.
  std::vector<acc_t> thr(B);
  for (int64_t i = 0; i < B; ++i) thr[i] = pos[i] >= 0 ? pos_v[i] + gamma : kInf<acc_t>;
  auto parts = tiled_pass<Pass::kSemi, acc_t>(xf, sq, lab, thr.data(), acc_t(1), cache_tiles ? &tiles : nullptr);
  for (int64_t i = 0; i < B; ++i) {
    acc_t nv = kInf<acc_t>;
    int64_t nj = -1;
    for (auto& w : parts) offer_min(w.neg_v[i], w.neg_j[i], nv, nj);
    if (nj >= 0) neg[i] = nj;
  }
}

// Exact mining (inputs with NaN/inf or huge norms): explicit differences per anchor
// row, NaN winning every comparison as in the reference. O(B^2 D) but O(B) memory.
template <typename acc_t>
void mine_exact(const acc_t* x, int64_t B, int64_t D, const int32_t* lab, int64_t mining,
                acc_t gamma, int64_t* pos, int64_t* neg) {
  at::parallel_for(0, B, cpu::grain_for(B * D), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> d(B);
    for (int64_t i = b0; i < b1; ++i) {
      const acc_t* xi = x + i * D;
      for (int64_t j = 0; j < B; ++j) d[j] = exact_sq_dist(xi, x + j * D, D);
      acc_t pv = 0, nv = 0;
      int64_t pj = -1, nj = -1;
      for (int64_t j = 0; j < B; ++j) {
        if (lab[j] == lab[i]) {
          const bool take = mining == kEasyPositive ? better_min(d[j], j, pv, pj) : better_max(d[j], j, pv, pj);
          if (j != i && take) { pv = d[j]; pj = j; }
        } else if (better_min(d[j], j, nv, nj)) {
          nv = d[j];
          nj = j;
        }
      }
      if (mining == kSemiHard && pj >= 0) {
        const acc_t t = pv + gamma;
        acc_t sv = 0;
        int64_t sj = -1;
        for (int64_t j = 0; j < B; ++j) {
          const bool beyond = d[j] > t || std::isnan(d[j]);
          if (lab[j] != lab[i] && beyond && better_min(d[j], j, sv, sj)) {
            sv = d[j];
            sj = j;
          }
        }
        if (sj >= 0) nj = sj;
      }
      pos[i] = pj;
      neg[i] = nj;
    }
  });
}

// Writes the reduced loss (or the per-triplet vector) from per-triplet values.
template <typename acc_t>
Tensor reduce_loss(const std::vector<acc_t>& per, int64_t count, int64_t reduction, at::ScalarType acc) {
  const int64_t T = int64_t(per.size());
  if (reduction == kNone) {
    Tensor out = at::empty({T}, at::TensorOptions().dtype(acc));
    std::copy(per.begin(), per.end(), out.data_ptr<acc_t>());
    return out;
  }
  double total = 0;  // sequential double sum: deterministic and accurate
  for (acc_t v : per) total += double(v);
  if (reduction == kMean) total /= double(std::max<int64_t>(count, 1));
  return at::scalar_tensor(total, at::TensorOptions().dtype(acc));
}

void check_codes(int64_t loss_type, int64_t reduction) {
  TORCH_CHECK(loss_type == kExp || loss_type == kHinge, "loss_type must be 0 (exp) or 1 (hinge), got ",
              loss_type);
  TORCH_CHECK(reduction == kNone || reduction == kMean || reduction == kSum,
              "reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

// ----------------------------------------------------------------------------- forward (mined)

template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> triplet_loss_forward_kernel_impl(
    const Tensor& x, const Tensor& labels, int64_t mining, int64_t loss_type, double alpha_,
    double gamma_, double margin_, int64_t reduction) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = cpu::acc_dtype(x.scalar_type());
  const int64_t B = x.size(0), D = x.size(1);
  const acc_t alpha = acc_t(alpha_), gamma = acc_t(gamma_), margin = acc_t(margin_);
  const Tensor xf = x.detach().contiguous().to(acc);
  const Tensor lab64 = labels.contiguous().to(at::kLong);
  const acc_t* xp = xf.data_ptr<acc_t>();

  Tensor pos = at::empty({B}, at::TensorOptions().dtype(at::kLong));
  Tensor neg = at::empty({B}, at::TensorOptions().dtype(at::kLong));
  Tensor r = at::zeros({B}, at::TensorOptions().dtype(acc));
  Tensor valid = at::empty({B}, at::TensorOptions().dtype(at::kBool));
  int64_t* pp = pos.data_ptr<int64_t>();
  int64_t* np = neg.data_ptr<int64_t>();

  const std::vector<int32_t> lab = dense_label_ids(lab64.data_ptr<int64_t>(), B);
  std::vector<acc_t> sq(B);
  at::parallel_for(0, B, cpu::grain_for(2 * D), [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) sq[i] = cpu::sq_norm(xp + i * D, D);
  });
  // The expansion ||a||^2 + ||b||^2 - 2 a.b is finite and meaningful only for finite
  // rows whose norms cannot overflow it.
  const acc_t limit = std::numeric_limits<acc_t>::max() / acc_t(16);
  bool fast = true;
  for (int64_t i = 0; i < B; ++i) fast = fast && std::isfinite(sq[i]) && sq[i] <= limit;
  if (fast) {
    mine_tiled<acc_t>(xf, sq.data(), lab.data(), mining, gamma, pp, np);
  } else {
    mine_exact<acc_t>(xp, B, D, lab.data(), mining, gamma, pp, np);
  }

  // r recomputed for the chosen pair by explicit differences; invalid anchors: -1, 0.
  std::vector<acc_t> per(B);
  acc_t* rp = r.data_ptr<acc_t>();
  bool* vp = valid.data_ptr<bool>();
  at::parallel_for(0, B, cpu::grain_for(2 * D), [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      const bool ok = pp[i] >= 0 && np[i] >= 0;
      vp[i] = ok;
      if (!ok) {
        pp[i] = np[i] = -1;
        per[i] = acc_t(0);
        continue;
      }
      const acc_t* xi = xp + i * D;
      rp[i] = exact_sq_dist(xi, xp + np[i] * D, D) - exact_sq_dist(xi, xp + pp[i] * D, D);
      per[i] = triplet_value(rp[i], loss_type, alpha, gamma, margin);
    }
  });
  int64_t count = 0;
  for (int64_t i = 0; i < B; ++i) count += vp[i];
  return {reduce_loss(per, count, reduction, acc), pos, neg, r, valid};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> triplet_loss_forward_kernel(
    const Tensor& x, const Tensor& labels, int64_t mining, int64_t loss_type, double alpha,
    double gamma, double margin, int64_t reduction) {
  at::NoGradGuard no_grad;  // internal BLAS calls on x must not be recorded
  cpu::check_embeddings("x", x);
  cpu::check_index_vector("labels", labels, x.size(0), "one label per row of x");
  TORCH_CHECK(mining == kBatchHard || mining == kSemiHard || mining == kEasyPositive,
              "mining must be 0 (batch_hard), 1 (semi_hard) or 2 (easy_positive), got ", mining);
  check_codes(loss_type, reduction);
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "triplet_loss_forward_kernel", [&] {
    out = triplet_loss_forward_kernel_impl<scalar_t>(x, labels, mining, loss_type, alpha, gamma, margin,
                                                     reduction);
  });
  return out;
}

// ----------------------------------------------------------------------------- forward (indexed)

template <typename scalar_t>
std::tuple<Tensor, Tensor> triplet_loss_indexed_forward_kernel_impl(
    const Tensor& x, const Tensor& anchor, const Tensor& positive, const Tensor& negative,
    int64_t loss_type, double alpha_, double gamma_, double margin_, int64_t reduction) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = cpu::acc_dtype(x.scalar_type());
  const int64_t D = x.size(1), T = anchor.size(0);
  const acc_t alpha = acc_t(alpha_), gamma = acc_t(gamma_), margin = acc_t(margin_);
  const Tensor xf = x.detach().contiguous().to(acc);
  const acc_t* xp = xf.data_ptr<acc_t>();
  const int64_t* a = anchor.data_ptr<int64_t>();
  const int64_t* p = positive.data_ptr<int64_t>();
  const int64_t* n = negative.data_ptr<int64_t>();
  Tensor r = at::empty({T}, at::TensorOptions().dtype(acc));
  acc_t* rp = r.data_ptr<acc_t>();
  std::vector<acc_t> per(T);
  at::parallel_for(0, T, cpu::grain_for(2 * D), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const acc_t* xa = xp + a[t] * D;
      rp[t] = exact_sq_dist(xa, xp + n[t] * D, D) - exact_sq_dist(xa, xp + p[t] * D, D);
      per[t] = triplet_value(rp[t], loss_type, alpha, gamma, margin);
    }
  });
  return {reduce_loss(per, T, reduction, acc), r};
}

std::tuple<Tensor, Tensor> triplet_loss_indexed_forward_kernel(
    const Tensor& x, const Tensor& anchor, const Tensor& positive, const Tensor& negative,
    int64_t loss_type, double alpha, double gamma, double margin, int64_t reduction) {
  at::NoGradGuard no_grad;
  cpu::check_embeddings("x", x);
  cpu::check_index_vector("anchor", anchor, -1, "");
  const int64_t T = anchor.size(0), B = x.size(0);
  cpu::check_index_vector("positive", positive, T, "same as anchor");
  cpu::check_index_vector("negative", negative, T, "same as anchor");
  check_codes(loss_type, reduction);
  const Tensor a = anchor.contiguous().to(at::kLong);
  const Tensor p = positive.contiguous().to(at::kLong);
  const Tensor n = negative.contiguous().to(at::kLong);
  cpu::check_index_range("anchor", a.data_ptr<int64_t>(), T, 0, B, "rows of x");
  cpu::check_index_range("positive", p.data_ptr<int64_t>(), T, 0, B, "rows of x");
  cpu::check_index_range("negative", n.data_ptr<int64_t>(), T, 0, B, "rows of x");
  std::tuple<Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "triplet_loss_indexed_forward_kernel", [&] {
    out = triplet_loss_indexed_forward_kernel_impl<scalar_t>(x, a, p, n, loss_type, alpha, gamma, margin,
                                                             reduction);
  });
  return out;
}

// ----------------------------------------------------------------------------- backward

// Gradient from the saved triplets. Each active triplet t (valid, non-zero dL/dr)
// with c = grad * dL/dr adds to three rows:
//   grad[a] += 2c (x_p - x_n),  grad[p] += 2c (x_a - x_p),  grad[n] += 2c (x_n - x_a).
// A counting sort of the (row, triplet, role) entries by row gives every row its own
// list in a fixed order; rows are then summed independently in parallel, so the
// result is deterministic and needs no atomics.
template <typename scalar_t>
Tensor triplet_loss_backward_kernel_impl(const Tensor& grad_loss, const Tensor& x, const int64_t* a,
                                         const int64_t* p, const int64_t* n, const Tensor& r,
                                         const bool* valid, int64_t loss_type, double alpha_,
                                         double gamma_, double margin_, int64_t reduction) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = cpu::acc_dtype(x.scalar_type());
  const int64_t B = x.size(0), D = x.size(1), T = r.size(0);
  const acc_t alpha = acc_t(alpha_), gamma = acc_t(gamma_), margin = acc_t(margin_);
  const Tensor xf = x.detach().contiguous().to(acc);
  const acc_t* xp = xf.data_ptr<acc_t>();
  const Tensor rf = r.contiguous().to(acc);
  const acc_t* rp = rf.data_ptr<acc_t>();
  const Tensor gf = grad_loss.contiguous().to(acc);
  const acc_t* gp = gf.data_ptr<acc_t>();

  int64_t count = T;
  if (valid != nullptr) count = std::count(valid, valid + T, true);
  // Per-triplet coefficient 2c (0: inactive).
  std::vector<acc_t> coef(T, acc_t(0));
  const acc_t scale = reduction == kMean ? acc_t(1) / acc_t(std::max<int64_t>(count, 1)) : acc_t(1);
  for (int64_t t = 0; t < T; ++t) {
    if (valid != nullptr && !valid[t]) continue;
    const acc_t g = reduction == kNone ? gp[t] : gp[0] * scale;
    coef[t] = acc_t(2) * g * triplet_dloss_dr(rp[t], loss_type, alpha, gamma, margin);
  }
  auto row_of = [&](int64_t t, int role) { return role == 0 ? (a ? a[t] : t) : role == 1 ? p[t] : n[t]; };
  std::vector<int64_t> start(B + 1, 0);
  for (int64_t t = 0; t < T; ++t) {
    if (coef[t] == acc_t(0)) continue;
    for (int role = 0; role < 3; ++role) ++start[row_of(t, role) + 1];
  }
  std::partial_sum(start.begin(), start.end(), start.begin());
  std::vector<int64_t> entry(start[B]);  // t * 3 + role, grouped by row, ascending t
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t t = 0; t < T; ++t) {
      if (coef[t] == acc_t(0)) continue;
      for (int role = 0; role < 3; ++role) entry[fill[row_of(t, role)]++] = t * 3 + role;
    }
  }

  Tensor grad = at::empty({B, D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  scalar_t* out = grad.data_ptr<scalar_t>();
  at::parallel_for(0, B, cpu::grain_for(3 * D), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> accum(D);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(accum.begin(), accum.end(), acc_t(0));
      for (int64_t e = start[b]; e < start[b + 1]; ++e) {
        const int64_t t = entry[e] / 3;
        const int role = int(entry[e] % 3);
        const acc_t c = coef[t];
        const acc_t* xa = xp + row_of(t, 0) * D;
        const acc_t* xpos = xp + p[t] * D;
        const acc_t* xneg = xp + n[t] * D;
        // the two rows whose difference this role receives: grad += c (u - v)
        const acc_t* u = role == 0 ? xpos : role == 1 ? xa : xneg;
        const acc_t* v = role == 0 ? xneg : role == 1 ? xpos : xa;
        for (int64_t d = 0; d < D; ++d) accum[d] += c * (u[d] - v[d]);
      }
      scalar_t* o = out + b * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(accum[d]);
    }
  });
  return grad;
}

Tensor triplet_loss_backward_kernel(const Tensor& grad_loss, const Tensor& x,
                                    const std::optional<Tensor>& anchor, const Tensor& pos,
                                    const Tensor& neg, const Tensor& r, const std::optional<Tensor>& valid,
                                    int64_t loss_type, double alpha, double gamma, double margin,
                                    int64_t reduction) {
  at::NoGradGuard no_grad;
  cpu::check_embeddings("x", x);
  check_codes(loss_type, reduction);
  const int64_t B = x.size(0);
  const bool indexed = anchor.has_value() && anchor->defined();
  cpu::check_index_vector("pos", pos, indexed ? -1 : B, "one per row of x in the mined form");
  const int64_t T = pos.size(0);
  cpu::check_index_vector("neg", neg, T, "same as pos");
  if (indexed) cpu::check_index_vector("anchor", *anchor, T, "same as pos");
  TORCH_CHECK(r.device().is_cpu() && r.dim() == 1 && r.size(0) == T && at::isFloatingType(r.scalar_type()),
              "r must be a 1-D floating CPU tensor of length ", T, " (same as pos), got shape ", r.sizes(),
              " and dtype ", r.scalar_type());
  TORCH_CHECK(grad_loss.device().is_cpu() && at::isFloatingType(grad_loss.scalar_type()),
              "grad_loss must be a floating CPU tensor, got ", grad_loss.scalar_type(), " on ",
              grad_loss.device());
  if (reduction == kNone) {
    TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == T, "grad_loss must have shape (", T,
                ",) for reduction none, got ", grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must be a scalar for reduction mean/sum, got shape ",
                grad_loss.sizes());
  }
  Tensor vb;
  if (valid.has_value() && valid->defined()) {
    TORCH_CHECK(valid->device().is_cpu() && valid->dim() == 1 && valid->size(0) == T &&
                    valid->scalar_type() == at::kBool,
                "valid must be a 1-D bool CPU tensor of length ", T, " (same as pos), got shape ",
                valid->sizes(), " and dtype ", valid->scalar_type());
    vb = valid->contiguous();
  }
  const Tensor p = pos.contiguous().to(at::kLong);
  const Tensor n = neg.contiguous().to(at::kLong);
  Tensor a;
  if (indexed) a = anchor->contiguous().to(at::kLong);
  const bool* vp = vb.defined() ? vb.data_ptr<bool>() : nullptr;
  // Indices of the triplets that contribute must address rows of x.
  const int64_t* ap = indexed ? a.data_ptr<int64_t>() : nullptr;
  const int64_t* pp = p.data_ptr<int64_t>();
  const int64_t* np = n.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    if (vp != nullptr && !vp[t]) continue;
    TORCH_CHECK(pp[t] >= 0 && pp[t] < B, "pos[", t, "] = ", pp[t], " is out of range [0, ", B, ")");
    TORCH_CHECK(np[t] >= 0 && np[t] < B, "neg[", t, "] = ", np[t], " is out of range [0, ", B, ")");
    if (ap) TORCH_CHECK(ap[t] >= 0 && ap[t] < B, "anchor[", t, "] = ", ap[t], " is out of range [0, ", B, ")");
  }
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "triplet_loss_backward_kernel", [&] {
    out = triplet_loss_backward_kernel_impl<scalar_t>(grad_loss, x, ap, pp, np, r, vp, loss_type, alpha, gamma,
                                                      margin, reduction);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dnnrl_ext, CPU, m) {
  m.impl(TORCH_SELECTIVE_NAME("dnnrl_ext::triplet_loss"), TORCH_FN(triplet_loss_forward_kernel));
  m.impl(TORCH_SELECTIVE_NAME("dnnrl_ext::triplet_loss_indexed"), TORCH_FN(triplet_loss_indexed_forward_kernel));
  m.impl(TORCH_SELECTIVE_NAME("dnnrl_ext::triplet_loss_backward"), TORCH_FN(triplet_loss_backward_kernel));
}

}  // namespace ops
}  // namespace dnnrl
