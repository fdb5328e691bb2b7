// CPU kernels of the k-NN ops (contracts in dnnrl_ext/reference.py):
//   knn       k nearest gallery rows per query, squared Euclidean, ascending
//   knn_vote  majority vote of those k (ties -> the class whose nearest member ranks first)
//
// The Q x N distance matrix is never built. Work items are (query block, gallery
// segment) pairs taken dynamically by the workers; each walks its segment in gallery
// blocks, computes a QB x NB tile q g^T with one single-threaded GEMM (oneDNN for
// float32 where torch has it, see tile_product.h; the tile stays in L2), turns it
// into distances with the same expression as the reference,
// (||q||^2 - 2 q.g) + ||g||^2 clamped at 0, and updates a per-(query, segment) sorted
// top-k list. Lists are merged per query at the end. Every list is scanned in
// ascending gallery order and merged with the key (NaN last, distance, index), so the
// result does not depend on the thread schedule. Memory: O((Q + N) D + Q k S) plus
// one tile per thread.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/cpu_utils.h"
#include "cpu/tile_product.h"

namespace dnnrl {
namespace ops {

namespace {

using at::Tensor;

// Query rows and gallery rows per tile, and gallery rows per segment (work item).
constexpr int64_t kQueryBlock = 512;
constexpr int64_t kGalleryBlock = 1024;

// Ranking key: non-NaN before NaN, then smaller distance, then smaller index.
template <typename acc_t>
inline bool key_less(acc_t d, int64_t j, acc_t bd, int64_t bj) {
  const bool dn = d != d, bn = bd != bd;
  if (dn != bn) return bn;
  if (!dn && d != bd) return d < bd;
  return j < bj;
}

// Inserts (d, j) into the sorted list kd/ki of length cnt <= k (caller checked that it
// belongs there).
template <typename acc_t>
inline void insert_sorted(acc_t* kd, int64_t* ki, int64_t& cnt, int64_t k, acc_t d, int64_t j) {
  int64_t pos = cnt < k ? cnt : k - 1;
  while (pos > 0 && key_less(d, j, kd[pos - 1], ki[pos - 1])) {
    kd[pos] = kd[pos - 1];
    ki[pos] = ki[pos - 1];
    --pos;
  }
  kd[pos] = d;
  ki[pos] = j;
  if (cnt < k) ++cnt;
}

// A row's squared norm as the distances use it: NaN where it is inf or NaN (a non-finite
// element, or a norm beyond the accumulation type), so that every distance of that row is
// NaN, whatever the signs would make of the expansion (inf, NaN or a number). The
// reference and the CUDA kernels apply the same rule.
template <typename acc_t>
inline acc_t knn_row_norm(const acc_t* row, int64_t D) {
  const acc_t n = cpu::sq_norm(row, D);
  return std::isfinite(n) ? n : std::numeric_limits<acc_t>::quiet_NaN();
}

// Distance of query i to gallery row j from s = q_i . g_j, exactly as the reference
// computes it: (||q||^2 - 2 s) + ||g||^2, clamped at 0 (NaN stays NaN).
template <typename acc_t>
inline acc_t knn_dist(acc_t qi, acc_t s, acc_t gj) {
  const acc_t d = (qi - acc_t(2) * s) + gj;
  return d < acc_t(0) ? acc_t(0) : d;
}

#if DNNRL_X86_SIMD
// AVX2 scan of columns [c, nj) once the list is full with a non-NaN worst entry:
// eight distances at a time, and only lanes below the current worst are inserted.
// Returns the first column left for the portable loop.
__attribute__((target("avx2"))) int64_t scan_row_avx2(const float* srow, const float* gn, int64_t c, int64_t nj,
                                                       float qi, int64_t g0, float* kd, int64_t* ki,
                                                       int64_t& cnt, int64_t k) {
  const __m256 two = _mm256_set1_ps(2.f), vqi = _mm256_set1_ps(qi), zero = _mm256_setzero_ps();
  float worst = kd[k - 1];
  __m256 vw = _mm256_set1_ps(worst);
  alignas(32) float t[8];
  for (; c + 8 <= nj; c += 8) {
    __m256 d = _mm256_add_ps(_mm256_sub_ps(vqi, _mm256_mul_ps(two, _mm256_loadu_ps(srow + c))),
                             _mm256_loadu_ps(gn + c));
    d = _mm256_max_ps(zero, d);  // max(0, NaN) returns its second operand: NaN stays NaN
    int m = _mm256_movemask_ps(_mm256_cmp_ps(d, vw, _CMP_LT_OQ));
    if (m == 0) continue;
    _mm256_store_ps(t, d);
    while (m) {
      const int b = __builtin_ctz(m);
      m &= m - 1;
      if (t[b] < worst) {
        insert_sorted(kd, ki, cnt, k, t[b], g0 + c + b);
        worst = kd[k - 1];
      }
    }
    vw = _mm256_set1_ps(worst);
  }
  return c;
}
#endif

// Offers gallery rows g0 .. g0+nj-1 (ascending; s = their dot products with the
// query) to the query's sorted list.
template <typename acc_t>
inline void scan_row(const acc_t* srow, const acc_t* gn, int64_t nj, acc_t qi, int64_t g0, acc_t* kd,
                     int64_t* ki, int64_t& cnt, int64_t k) {
  int64_t c = 0;
  // Until the list is full of non-NaN values every candidate needs the full key.
  for (; c < nj && (cnt < k || kd[k - 1] != kd[k - 1]); ++c) {
    const acc_t d = knn_dist(qi, srow[c], gn[c]);
    if (cnt < k || key_less(d, g0 + c, kd[k - 1], ki[k - 1])) insert_sorted(kd, ki, cnt, k, d, g0 + c);
  }
  if (c == nj) return;
#if DNNRL_X86_SIMD
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu::cpu_has_avx2()) c = scan_row_avx2(srow, gn, c, nj, qi, g0, kd, ki, cnt, k);
  }
#endif
  // Then only a strictly smaller distance can enter (an equal one has a larger index;
  // NaN compares false).
  acc_t worst = kd[k - 1];
  for (; c < nj; ++c) {
    const acc_t d = knn_dist(qi, srow[c], gn[c]);
    if (d < worst) {
      insert_sorted(kd, ki, cnt, k, d, g0 + c);
      worst = kd[k - 1];
    }
  }
}

// Fills dist (Q, k) and idx (Q, k) for acc-dtype contiguous q (Q, D), g (N, D).
template <typename acc_t>
void knn_search(const Tensor& q, const Tensor& g, int64_t k, acc_t* out_d, int64_t* out_i) {
  const int64_t Q = q.size(0), N = g.size(0), D = q.size(1);
  if (Q == 0) return;
  const acc_t* qp = q.data_ptr<acc_t>();
  const acc_t* gp = g.data_ptr<acc_t>();
  std::vector<acc_t> qn(Q), gn(N);
  at::parallel_for(0, Q, cpu::grain_for(D), [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) qn[i] = knn_row_norm(qp + i * D, D);
  });
  at::parallel_for(0, N, cpu::grain_for(D), [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) gn[i] = knn_row_norm(gp + i * D, D);
  });

  const int64_t nthreads = at::get_num_threads();
  const int64_t nqb = (Q + kQueryBlock - 1) / kQueryBlock;
  const int64_t ngb = (N + kGalleryBlock - 1) / kGalleryBlock;
  // Enough segments that the work items balance over the threads (>= 8 per thread).
  int64_t nseg = std::min<int64_t>(ngb, std::max<int64_t>(1, (8 * nthreads + nqb - 1) / nqb));
  const int64_t seg_blocks = (ngb + nseg - 1) / nseg;
  nseg = (ngb + seg_blocks - 1) / seg_blocks;
  const int64_t nitems = nqb * nseg;

  // Segment s of query i: list at ((s * Q) + i) * k; with one segment, the output itself.
  std::vector<acc_t> seg_d(nseg > 1 ? nseg * Q * k : 0);
  std::vector<int64_t> seg_i(nseg > 1 ? nseg * Q * k : 0);
  std::vector<int64_t> seg_cnt(nseg * Q, 0);
  acc_t* list_d = nseg > 1 ? seg_d.data() : out_d;
  int64_t* list_i = nseg > 1 ? seg_i.data() : out_i;

  const bool small = Q * N * D < cpu::kParallelTileWork;  // stay on this thread
  const int64_t nworkers = small ? 1 : std::max<int64_t>(1, std::min<int64_t>(nthreads, nitems));
  std::atomic<int64_t> next{0};
  cpu::SingleThreadBlas single_thread_blas(nworkers == 1);
  const bool onednn = cpu::use_onednn_tiles(q.scalar_type());
  at::parallel_for(0, nworkers, 1, [&](int64_t w0, int64_t w1) {
    std::vector<acc_t> tile(kQueryBlock * kGalleryBlock);
    for (int64_t w = w0; w < w1; ++w) {
      for (int64_t item = next.fetch_add(1); item < nitems; item = next.fetch_add(1)) {
        const int64_t qb = item / nseg, s = item % nseg;
        const int64_t i0 = qb * kQueryBlock, ni = std::min(kQueryBlock, Q - i0);
        const int64_t gb_end = std::min(ngb, (s + 1) * seg_blocks);
        const Tensor qblk = q.narrow(0, i0, ni);
        for (int64_t gb = s * seg_blocks; gb < gb_end; ++gb) {
          const int64_t j0 = gb * kGalleryBlock, nj = std::min(kGalleryBlock, N - j0);
          const Tensor prod = cpu::tile_product(qblk, g.narrow(0, j0, nj), onednn, tile.data());
          const acc_t* pp = prod.data_ptr<acc_t>();
          for (int64_t r = 0; r < ni; ++r) {
            const int64_t li = s * Q + i0 + r;
            scan_row(pp + r * nj, gn.data() + j0, nj, qn[i0 + r], j0, list_d + li * k,
                     list_i + li * k, seg_cnt[li], k);
          }
        }
      }
    }
  });

  if (nseg == 1) return;
  // Merge the segments of every query (segment order = gallery order).
  at::parallel_for(0, Q, cpu::grain_for(k * nseg * k), [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      acc_t* kd = out_d + i * k;
      int64_t* ki = out_i + i * k;
      int64_t cnt = 0;
      for (int64_t s = 0; s < nseg; ++s) {
        const int64_t li = s * Q + i;
        const acc_t* sd = seg_d.data() + li * k;
        const int64_t* si = seg_i.data() + li * k;
        for (int64_t t = 0; t < seg_cnt[li]; ++t) {
          if (cnt < k || key_less(sd[t], si[t], kd[k - 1], ki[k - 1])) {
            insert_sorted(kd, ki, cnt, k, sd[t], si[t]);
          } else {
            break;  // the segment's list is sorted: the rest cannot enter either
          }
        }
      }
    }
  });
}

void check_knn_args(const Tensor& query, const Tensor& gallery, int64_t k) {
  cpu::check_embeddings("query", query);
  cpu::check_embeddings("gallery", gallery);
  TORCH_CHECK(query.size(1) == gallery.size(1), "query has dim ", query.size(1), " but gallery has dim ",
              gallery.size(1));
  TORCH_CHECK(query.scalar_type() == gallery.scalar_type(), "query is ", query.scalar_type(),
              " but gallery is ", gallery.scalar_type(), ": cast one of them");
  TORCH_CHECK(gallery.size(0) > 0, "gallery is empty: k-NN needs at least one gallery row");
  TORCH_CHECK(k >= 1 && k <= gallery.size(0), "k must be in [1, ", gallery.size(0),
              "] (the gallery size), got ", k);
}

template <typename scalar_t>
std::tuple<Tensor, Tensor> knn_forward_kernel_impl(const Tensor& query, const Tensor& gallery, int64_t k) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = cpu::acc_dtype(query.scalar_type());
  // half / bfloat16 rows are converted to float32 once (O((Q + N) D)).
  const Tensor q = query.detach().contiguous().to(acc);
  const Tensor g = gallery.detach().contiguous().to(acc);
  const int64_t Q = q.size(0);
  Tensor dist = at::empty({Q, k}, at::TensorOptions().dtype(acc));
  Tensor idx = at::empty({Q, k}, at::TensorOptions().dtype(at::kLong));
  knn_search<acc_t>(q, g, k, dist.data_ptr<acc_t>(), idx.data_ptr<int64_t>());
  return {dist, idx};
}

std::tuple<Tensor, Tensor> knn_forward_kernel(const Tensor& query, const Tensor& gallery, int64_t k) {
  at::NoGradGuard no_grad;  // internal BLAS calls must not be recorded
  check_knn_args(query, gallery, k);
  std::tuple<Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "knn_forward_kernel", [&] {
    out = knn_forward_kernel_impl<scalar_t>(query, gallery, k);
  });
  return out;
}

// Vote of one query: votes per class, prediction = most votes, ties to the class whose
// nearest member ranks first (score = votes * (k + 1) + (k - first rank)).
void vote_row(const int64_t* nbr_idx, const int64_t* labels, int64_t k, int64_t C, int64_t* votes,
              int64_t* pred, std::vector<int64_t>& first) {
  std::fill(first.begin(), first.end(), k);
  std::fill(votes, votes + C, 0);
  for (int64_t t = 0; t < k; ++t) {
    const int64_t c = labels[nbr_idx[t]];
    ++votes[c];
    if (first[c] == k) first[c] = t;
  }
  int64_t best = 0, best_score = -1;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t score = votes[c] * (k + 1) + (k - first[c]);
    if (score > best_score) {
      best_score = score;
      best = c;
    }
  }
  *pred = best;
}

std::tuple<Tensor, Tensor> knn_vote_forward_kernel(const Tensor& query, const Tensor& gallery,
                                                   const Tensor& gallery_labels, int64_t k,
                                                   int64_t num_classes) {
  at::NoGradGuard no_grad;
  check_knn_args(query, gallery, k);
  cpu::check_index_vector("gallery_labels", gallery_labels, gallery.size(0), "one label per gallery row");
  TORCH_CHECK(num_classes >= 1, "num_classes must be positive, got ", num_classes);
  const Tensor labels = gallery_labels.contiguous().to(at::kLong);
  const int64_t* lp = labels.data_ptr<int64_t>();
  cpu::check_index_range("gallery_labels", lp, labels.size(0), 0, num_classes, "num_classes");
  Tensor idx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "knn_vote_forward_kernel", [&] {
    idx = std::get<1>(knn_forward_kernel_impl<scalar_t>(query, gallery, k));
  });
  const int64_t Q = query.size(0);
  Tensor pred = at::empty({Q}, at::TensorOptions().dtype(at::kLong));
  Tensor votes = at::empty({Q, num_classes}, at::TensorOptions().dtype(at::kLong));
  const int64_t* ip = idx.data_ptr<int64_t>();
  int64_t* pp = pred.data_ptr<int64_t>();
  int64_t* vp = votes.data_ptr<int64_t>();
  at::parallel_for(0, Q, cpu::grain_for(k + num_classes), [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> first(num_classes);
    for (int64_t i = b0; i < b1; ++i) vote_row(ip + i * k, lp, k, num_classes, vp + i * num_classes, pp + i, first);
  });
  return {pred, votes};
}

}  // namespace

TORCH_LIBRARY_IMPL(dnnrl_ext, CPU, m) {
  m.impl(TORCH_SELECTIVE_NAME("dnnrl_ext::knn"), TORCH_FN(knn_forward_kernel));
  m.impl(TORCH_SELECTIVE_NAME("dnnrl_ext::knn_vote"), TORCH_FN(knn_vote_forward_kernel));
}

}  // namespace ops
}  // namespace dnnrl
