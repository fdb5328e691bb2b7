// CUDA kernels of dnnrl_ext::triplet_loss (fused mining + loss) and
// dnnrl_ext::triplet_loss_indexed.
//
// Mined form, one call = a fixed handful of launches on the current stream (2 for
// batch-hard at B <= 256 with mean / sum: mine_pass, mine_finalize):
//   row_norms      ||x_i||^2 (B > 256; smaller batches: inside mine_pass) grid ceil(B/8)
//   mine_pass      distance tiles (tile.cuh) reduced on the spot into, per anchor and
//                  per column split, the farthest positive (easy_positive: the nearest,
//                  kept as the largest -d) and nearest negative
//                  (semi-hard 2nd pass: nearest negative beyond d_ap + gamma)
//                                                              grid (row tiles, splits)
//   mine_threshold (semi-hard only) d_ap + gamma per anchor     warp per anchor
//   mine_finalize  merge the splits, recompute r = d(a,n) - d(a,p) by explicit
//                  differences, per-anchor loss, pos/neg/r/valid  warp per anchor;
//                  its last block reduces mean / sum in a fixed order (deterministic)
// Explicit triplets: indexed_loss (warp per triplet), then reduce_loss (one block).
// A pair with a row whose squared norm is not finite or beyond max / 16 takes its
// distance by explicit differences in mine_pass (the expansion would give NaN from
// inf - inf where the reference has inf), as the CPU kernel's exact mining does.
// Extra memory: norms (B), split partials (splits x B), per-anchor loss (B): O(B).
#include <cstdlib>
#include <cstring>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "tile.cuh"

namespace dnnrl {
namespace cuda {
namespace {

constexpr int kMaxSplits = 64;

template <typename acc_t>
struct MinePart {
  acc_t pd, nd;  // farthest positive (easy_positive: minus the nearest) / nearest (or semi-hard) negative distance
  int pj, nj;    // their indices, -1 when none
};

// One block: anchors [row0, row0 + BM) against the column tiles split, split +
// splits, ... Thread t owns anchor t / TPR and every TPR-th column of each tile, so
// its running best needs no synchronisation; the TPR owners of an anchor are
// adjacent lanes and merge with shuffles at the end.
// norms == nullptr: the block computes the norms it needs itself (small batches: one
// launch less). done_counter (nullable): reset to 0 here for mine_finalize.
// kEasy: the nearest positive (easy_positive) instead of the farthest, kept as the largest
// -d, so one max and the merges below serve both (x -> -x is exact, keeps ties and NaN).
// A template flag, not a run-time sign: a sign in a register made the float32 32 x 32
// pass spill 8 bytes that batch-hard did not spill.
template <typename Eng, bool kSemi, bool kEasy = false>
__global__ void __launch_bounds__(Eng::kThreads) mine_pass_kernel(
    const typename Eng::T* __restrict__ x, const int64_t* __restrict__ labels,
    const typename Eng::acc_t* __restrict__ norms, const typename Eng::acc_t* __restrict__ thr,
    int B, int D, bool vec, int col_tiles, int splits, MinePart<typename Eng::acc_t>* __restrict__ part,
    unsigned* __restrict__ done_counter) {
  using acc_t = typename Eng::acc_t;
  constexpr int BM = Eng::BM, BN = Eng::BN, NT = Eng::kThreads, LDS = Eng::LDS;
  constexpr int TPR = NT / BM;
  constexpr int CPT = BN / TPR;
  constexpr int kWarps = NT / 32;
  static_assert(NT % BM == 0 && BN % TPR == 0 && 32 % TPR == 0, "bad thread mapping");
  extern __shared__ __align__(128) unsigned char smem[];
  acc_t* cn = reinterpret_cast<acc_t*>(smem + Eng::kMainBytes);
  int64_t* cl = reinterpret_cast<int64_t*>(cn + BN);
  acc_t* rnorm = reinterpret_cast<acc_t*>(cl + BN);  // this block's row norms (inline norms only)

  if (done_counter != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *done_counter = 0u;
  const int row0 = blockIdx.x * BM, split = blockIdx.y;
  const int r = threadIdx.x / TPR, h = threadIdx.x % TPR;
  const int row = row0 + r;
  const bool row_ok = row < B;
  const int warp = threadIdx.x / 32;
  if (norms == nullptr) {  // block-uniform
    for (int i = warp; i < BM; i += kWarps) {
      const acc_t v = row0 + i < B ? warp_row_sq_norm<typename Eng::T, acc_t>(x + static_cast<int64_t>(row0 + i) * D, D)
                                   : acc_t(0);
      if (threadIdx.x % 32 == 0) rnorm[i] = v;
    }
    __syncthreads();
  }
  const acc_t rn = row_ok ? (norms == nullptr ? rnorm[r] : norms[row]) : acc_t(0);
  const int64_t rl = row_ok ? labels[row] : 0;
  const acc_t t = (kSemi && row_ok) ? thr[row] : acc_t(0);
  const acc_t lim = expansion_norm_limit<acc_t>();
  acc_t pd = 0, nd = 0;
  int pj = -1, nj = -1;

  for (int ct = split; ct < col_tiles; ct += splits) {
    const int col0 = ct * BN;
    if (norms == nullptr) {
      for (int c = warp; c < BN; c += kWarps) {
        const int j = col0 + c;
        const acc_t v = j < B ? warp_row_sq_norm<typename Eng::T, acc_t>(x + static_cast<int64_t>(j) * D, D)
                              : acc_t(0);
        if (threadIdx.x % 32 == 0) cn[c] = v;
      }
    }
    for (int c = threadIdx.x; c < BN; c += NT) {
      const int j = col0 + c;
      if (norms != nullptr) cn[c] = j < B ? norms[j] : acc_t(0);
      cl[c] = j < B ? labels[j] : 0;
    }
    Eng::run(x, row0, B, x, col0, B, D, vec, smem);  // ends with a barrier: cn/cl visible
    const acc_t* S = reinterpret_cast<const acc_t*>(smem);
    if (row_ok) {
      for (int u = 0; u < CPT; ++u) {
        const int c = ((u + r) % CPT) * TPR + h;  // staggered: no bank conflicts on S
        const int j = col0 + c;
        if (j >= B) continue;
        acc_t d = clamp0(rn + cn[c] - acc_t(2) * S[r * LDS + c]);
        if (!(rn <= lim && cn[c] <= lim)) {  // inf / NaN / overflowing rows: the reference's distance
          d = sq_dist_explicit<typename Eng::T, acc_t>(x + static_cast<int64_t>(row) * D,
                                                       x + static_cast<int64_t>(j) * D, D);
        }
        const bool same = cl[c] == rl;
        if (!kSemi) {
          if (same) {
            const acc_t dp = kEasy ? -d : d;
            if (j != row && take_max(dp, j, pd, pj)) { pd = dp; pj = j; }
          } else if (take_min(d, j, nd, nj)) {
            nd = d; nj = j;
          }
        } else if (!same && (d > t || d != d) && take_min(d, j, nd, nj)) {
          nd = d; nj = j;
        }
      }
    }
    __syncthreads();  // S, cn, cl are overwritten by the next tile
  }
#pragma unroll
  for (int off = 1; off < TPR; off <<= 1) {
    const acc_t opd = __shfl_xor_sync(0xffffffffu, pd, off);
    const int opj = __shfl_xor_sync(0xffffffffu, pj, off);
    const acc_t ond = __shfl_xor_sync(0xffffffffu, nd, off);
    const int onj = __shfl_xor_sync(0xffffffffu, nj, off);
    if (take_max(opd, opj, pd, pj)) { pd = opd; pj = opj; }
    if (take_min(ond, onj, nd, nj)) { nd = ond; nj = onj; }
  }
  if (row_ok && h == 0) part[static_cast<int64_t>(split) * B + row] = MinePart<acc_t>{pd, nd, pj, nj};
}

// Merge the split partials of one anchor across the warp (lane l takes splits
// l, l + 32, ...). Every lane ends with the same result.
template <typename acc_t>
__device__ __forceinline__ MinePart<acc_t> merge_parts(const MinePart<acc_t>* part, int splits, int B,
                                                       int row, bool want_pos) {
  const int lane = threadIdx.x % 32;
  MinePart<acc_t> m{acc_t(0), acc_t(0), -1, -1};
  for (int s = lane; s < splits; s += 32) {
    const MinePart<acc_t> p = part[static_cast<int64_t>(s) * B + row];
    if (want_pos && take_max(p.pd, p.pj, m.pd, m.pj)) { m.pd = p.pd; m.pj = p.pj; }
    if (take_min(p.nd, p.nj, m.nd, m.nj)) { m.nd = p.nd; m.nj = p.nj; }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const acc_t opd = __shfl_xor_sync(0xffffffffu, m.pd, off);
    const int opj = __shfl_xor_sync(0xffffffffu, m.pj, off);
    const acc_t ond = __shfl_xor_sync(0xffffffffu, m.nd, off);
    const int onj = __shfl_xor_sync(0xffffffffu, m.nj, off);
    if (want_pos && take_max(opd, opj, m.pd, m.pj)) { m.pd = opd; m.pj = opj; }
    if (take_min(ond, onj, m.nd, m.nj)) { m.nd = ond; m.nj = onj; }
  }
  return m;
}

// Semi-hard threshold d(a, p) + gamma per anchor (warp per anchor).
template <typename acc_t>
__global__ void __launch_bounds__(256) mine_threshold_kernel(const MinePart<acc_t>* __restrict__ part,
                                                             int splits, int B, acc_t gamma,
                                                             acc_t* __restrict__ thr) {
  const int row = blockIdx.x * 8 + threadIdx.x / 32;
  if (row >= B) return;
  const MinePart<acc_t> m = merge_parts(part, splits, B, row, true);
  if (threadIdx.x % 32 == 0) thr[row] = m.pd + gamma;  // no positive: unused (anchor invalid)
}

// sum((x_a - x_p)^2) and sum((x_a - x_n)^2) by explicit differences, warp-wide.
template <typename T, typename acc_t>
__device__ __forceinline__ acc_t relative_distance(const T* x, int64_t a, int64_t p, int64_t n, int D) {
  const int lane = threadIdx.x % 32;
  const T* xa = x + a * D;
  const T* xp = x + p * D;
  const T* xn = x + n * D;
  acc_t dan = 0, dap = 0;
  for (int e = lane; e < D; e += 32) {
    const acc_t va = load_acc<acc_t>(xa + e);
    const acc_t dn = va - load_acc<acc_t>(xn + e);
    const acc_t dp = va - load_acc<acc_t>(xp + e);
    dan += dn * dn;
    dap += dp * dp;
  }
  return warp_sum(dan) - warp_sum(dap);
}

// Block reduction of the per-row losses (mean over valid rows, at least 1, or sum) in
// a fixed order: every thread sums a strided slice, then a tree in shared memory.
// Reads with ld.global.cg: the rows may come from other blocks of this grid.
template <typename acc_t, int NT>
__device__ void block_reduce_rows(const acc_t* rows, const bool* valid, int64_t n, int64_t reduction, acc_t* out) {
  __shared__ acc_t ss[NT];
  __shared__ int64_t sc[NT];
  acc_t s = 0;
  int64_t c = 0;
  for (int64_t i = threadIdx.x; i < n; i += NT) {
    s += __ldcg(rows + i);
    c += valid == nullptr ? 1 : (__ldcg(reinterpret_cast<const unsigned char*>(valid) + i) ? 1 : 0);
  }
  ss[threadIdx.x] = s;
  sc[threadIdx.x] = c;
  __syncthreads();
  for (int w = NT / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) {
      ss[threadIdx.x] += ss[threadIdx.x + w];
      sc[threadIdx.x] += sc[threadIdx.x + w];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = reduction == kSum ? ss[0] : ss[0] / static_cast<acc_t>(sc[0] > 0 ? sc[0] : 1);
}

// Warp per anchor. With done_counter (mean / sum): the last block to finish (a ticket
// taken after a memory fence) also reduces every row into *loss, so no separate
// reduction launch is needed; which block that is does not change the result.
template <typename T, typename acc_t>
__global__ void __launch_bounds__(256) mine_finalize_kernel(
    const T* __restrict__ x, const MinePart<acc_t>* __restrict__ part1, int splits1,
    const MinePart<acc_t>* __restrict__ part2, int splits2, int B, int D, int64_t loss_type,
    acc_t alpha, acc_t gamma, acc_t margin, acc_t* __restrict__ loss_rows, int64_t* __restrict__ pos_out,
    int64_t* __restrict__ neg_out, acc_t* __restrict__ r_out, bool* __restrict__ valid_out,
    unsigned* __restrict__ done_counter, int64_t reduction, acc_t* __restrict__ loss) {
  const int row = blockIdx.x * 8 + threadIdx.x / 32;
  if (row < B) {  // warp-uniform
    const MinePart<acc_t> m = merge_parts(part1, splits1, B, row, true);
    int neg = m.nj;
    if (part2 != nullptr) {  // semi-hard: the qualifying negative if any, else batch-hard
      const MinePart<acc_t> s = merge_parts(part2, splits2, B, row, false);
      if (s.nj >= 0) neg = s.nj;
    }
    const bool valid = m.pj >= 0 && m.nj >= 0;
    acc_t r = 0;
    if (valid) r = relative_distance<T, acc_t>(x, row, m.pj, neg, D);
    if (threadIdx.x % 32 == 0) {
      pos_out[row] = valid ? m.pj : -1;
      neg_out[row] = valid ? neg : -1;
      r_out[row] = r;
      valid_out[row] = valid;
      loss_rows[row] = valid ? triplet_value<acc_t>(r, loss_type, alpha, gamma, margin) : acc_t(0);
    }
  }
  if (done_counter == nullptr) return;  // grid-uniform
  __shared__ bool last;
  __threadfence();  // this thread's rows are visible device-wide before the ticket
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(done_counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (last) {
    __threadfence();
    block_reduce_rows<acc_t, 256>(loss_rows, valid_out, B, reduction, loss);
  }
}

// Explicit triplets: warp per triplet. Out-of-range indices (the Python layer
// rejects them; under torch.compile it cannot) read nothing and give NaN.
template <typename T, typename acc_t>
__global__ void __launch_bounds__(256) indexed_loss_kernel(
    const T* __restrict__ x, const int64_t* __restrict__ anc, const int64_t* __restrict__ pos,
    const int64_t* __restrict__ neg, int64_t Tn, int64_t B, int D, int64_t loss_type, acc_t alpha,
    acc_t gamma, acc_t margin, acc_t* __restrict__ loss_rows, acc_t* __restrict__ r_out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  if (t >= Tn) return;
  const int64_t a = anc[t], p = pos[t], n = neg[t];
  acc_t r;
  if (a >= 0 && a < B && p >= 0 && p < B && n >= 0 && n < B) {
    r = relative_distance<T, acc_t>(x, a, p, n, D);
  } else {
    r = nan("");
  }
  if (threadIdx.x % 32 == 0) {
    r_out[t] = r;
    loss_rows[t] = triplet_value<acc_t>(r, loss_type, alpha, gamma, margin);
  }
}

// Mean (over valid rows, at least 1) or sum of the per-row losses: one block,
// fixed summation order, so the result is reproducible bit for bit.
template <typename acc_t>
__global__ void __launch_bounds__(512) reduce_loss_kernel(const acc_t* __restrict__ rows,
                                                          const bool* __restrict__ valid, int64_t n,
                                                          int64_t reduction, acc_t* __restrict__ out) {
  __shared__ acc_t ss[512];
  __shared__ int64_t sc[512];
  acc_t s = 0;
  int64_t c = 0;
  for (int64_t i = threadIdx.x; i < n; i += 512) {
    s += rows[i];
    c += valid == nullptr ? 1 : (valid[i] ? 1 : 0);
  }
  ss[threadIdx.x] = s;
  sc[threadIdx.x] = c;
  __syncthreads();
  for (int w = 256; w > 0; w >>= 1) {
    if (threadIdx.x < w) {
      ss[threadIdx.x] += ss[threadIdx.x + w];
      sc[threadIdx.x] += sc[threadIdx.x + w];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const acc_t total = ss[0];
    out[0] = reduction == kSum ? total : total / static_cast<acc_t>(sc[0] > 0 ? sc[0] : 1);
  }
}

// ------------------------------------------------------------------ host side
void check_common(const at::Tensor& x, int64_t loss_type, int64_t reduction) {
  TORCH_CHECK(x.is_cuda(), "triplet_loss: x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2, "triplet_loss: x must be 2-D (B, D), got ", x.dim(), " dims");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                  x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "triplet_loss: x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.size(0) < (int64_t(1) << 31) && x.size(1) < (int64_t(1) << 31),
              "triplet_loss: x has more than 2^31 - 1 rows or columns");
  TORCH_CHECK(loss_type == kExp || loss_type == kHinge, "triplet_loss: loss_type must be 0 (exp) or 1 (hinge), got ",
              loss_type);
  TORCH_CHECK(reduction == kNone || reduction == kMean || reduction == kSum,
              "triplet_loss: reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

void check_index(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got ", t.dim(), " dims");
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), op, ": ", name,
              " must be an integer tensor, got ", t.scalar_type());
}

template <typename Eng>
constexpr size_t mine_smem() {
  using acc_t = typename Eng::acc_t;
  return Eng::kMainBytes + Eng::BN * (sizeof(acc_t) + sizeof(int64_t)) + Eng::BM * sizeof(acc_t);
}

template <typename Eng>
void launch_mine_pass(bool semi, bool easy, const typename Eng::T* x, const int64_t* labels,
                      const typename Eng::acc_t* norms, const typename Eng::acc_t* thr, int B, int D,
                      bool vec, int splits, MinePart<typename Eng::acc_t>* part, unsigned* done_counter,
                      cudaStream_t stream) {
  const int row_tiles = static_cast<int>(ceil_div<int64_t>(B, Eng::BM));
  const int col_tiles = static_cast<int>(ceil_div<int64_t>(B, Eng::BN));
  const size_t smem = mine_smem<Eng>();
  const dim3 grid(row_tiles, splits);
  if (semi) {
    auto k = mine_pass_kernel<Eng, true>;
    allow_smem(k, smem);
    k<<<grid, Eng::kThreads, smem, stream>>>(x, labels, norms, thr, B, D, vec, col_tiles, splits, part,
                                             done_counter);
  } else if (easy) {
    auto k = mine_pass_kernel<Eng, false, true>;
    allow_smem(k, smem);
    k<<<grid, Eng::kThreads, smem, stream>>>(x, labels, norms, thr, B, D, vec, col_tiles, splits, part,
                                             done_counter);
  } else {
    auto k = mine_pass_kernel<Eng, false>;
    allow_smem(k, smem);
    k<<<grid, Eng::kThreads, smem, stream>>>(x, labels, norms, thr, B, D, vec, col_tiles, splits, part,
                                             done_counter);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Eng>
int mine_splits(int B) {
  const size_t smem = mine_smem<Eng>();
  auto k = mine_pass_kernel<Eng, false>;
  allow_smem(k, smem);
  const int64_t slots = resident_slots(k, Eng::kThreads, smem);
  return static_cast<int>(pick_splits(slots, ceil_div<int64_t>(B, Eng::BM), ceil_div<int64_t>(B, Eng::BN),
                                      kMaxSplits));
}

// Batches up to this size compute their norms inside mine_pass (one launch less; the
// extra reads are of rows the block stages anyway, and stay in L2).
constexpr int kInlineNormsMaxB = 256;

// loss (nullable): the reduced loss (mean / sum) is written by mine_finalize's last block.
template <typename scalar_t, typename Eng>
void mine_impl(const at::Tensor& x, const at::Tensor& labels, int64_t mining, int64_t loss_type,
               double alpha, double gamma, double margin, at::Tensor& loss_rows, at::Tensor& pos,
               at::Tensor& neg, at::Tensor& r, at::Tensor& valid, int64_t reduction, at::Tensor* loss) {
  using T = typename Native<scalar_t>::type;
  using acc_t = typename Acc<scalar_t>::type;
  static_assert(std::is_same<acc_t, typename Eng::acc_t>::value, "engine accumulates in acc_t");
  const int B = static_cast<int>(x.size(0)), D = static_cast<int>(x.size(1));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const T* xp = reinterpret_cast<const T*>(x.data_ptr<scalar_t>());
  const bool vec = aligned16(xp) && (D * sizeof(T)) % 16 == 0;
  const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const bool semi = mining == kSemiHard;

  const bool inline_norms = B <= kInlineNormsMaxB && loss_fewer_launches();
  const int splits = mine_splits<Eng>(B);
  // one workspace of raw bytes: (splits [+ splits], B) MinePart structs [, B thresholds]
  // [, B norms], the finalize ticket counter
  const int64_t part_bytes = static_cast<int64_t>(splits) * B * sizeof(MinePart<acc_t>);
  const int64_t thr_off = (semi ? 2 : 1) * part_bytes;
  const int64_t norms_off = thr_off + (semi ? B * static_cast<int64_t>(sizeof(acc_t)) : 0);
  const int64_t counter_off = ceil_div<int64_t>(norms_off + (inline_norms ? 0 : B * static_cast<int64_t>(sizeof(acc_t))), 16) * 16;
  at::Tensor ws = at::empty({counter_off + 16}, x.options().dtype(at::kByte));
  uint8_t* base = ws.data_ptr<uint8_t>();
  auto* part1 = reinterpret_cast<MinePart<acc_t>*>(base);
  auto* part2 = semi ? reinterpret_cast<MinePart<acc_t>*>(base + part_bytes) : nullptr;
  auto* thr = semi ? reinterpret_cast<acc_t*>(base + thr_off) : nullptr;
  acc_t* norms = inline_norms ? nullptr : reinterpret_cast<acc_t*>(base + norms_off);
  unsigned* counter = loss != nullptr ? reinterpret_cast<unsigned*>(base + counter_off) : nullptr;
  const int64_t* lab = labels.data_ptr<int64_t>();
  const unsigned row_blocks = static_cast<unsigned>(ceil_div<int64_t>(B, 8));

  if (!inline_norms) {
    row_norms_kernel<T, acc_t><<<row_blocks, 256, 0, stream>>>(xp, B, D, norms);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  launch_mine_pass<Eng>(false, mining == kEasyPositive, xp, lab, norms, nullptr, B, D, vec, splits, part1, counter,
                        stream);
  if (semi) {
    mine_threshold_kernel<acc_t><<<row_blocks, 256, 0, stream>>>(part1, splits, B, static_cast<acc_t>(gamma), thr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_mine_pass<Eng>(true, false, xp, lab, norms, thr, B, D, vec, splits, part2, nullptr, stream);
  }
  mine_finalize_kernel<T, acc_t><<<row_blocks, 256, 0, stream>>>(
      xp, part1, splits, part2, splits, B, D, loss_type, static_cast<acc_t>(alpha),
      static_cast<acc_t>(gamma), static_cast<acc_t>(margin), loss_rows.data_ptr<acc_t>(),
      pos.data_ptr<int64_t>(), neg.data_ptr<int64_t>(), r.data_ptr<acc_t>(), valid.data_ptr<bool>(), counter,
      reduction, loss != nullptr ? loss->data_ptr<acc_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

enum class MineTile { kAuto, kTiny, kSmall, kLarge };

// DNNRL_MINE_TILE=tiny|small|large: the mining tile at any batch size (tests compare the
// three on the same batch; benchmarks time them); unset: chosen by the batch size.
MineTile mine_tile_override() {
  const char* v = std::getenv("DNNRL_MINE_TILE");
  if (v == nullptr || v[0] == '\0') return MineTile::kAuto;
  if (std::strcmp(v, "tiny") == 0) return MineTile::kTiny;
  if (std::strcmp(v, "small") == 0) return MineTile::kSmall;
  if (std::strcmp(v, "large") == 0) return MineTile::kLarge;
  TORCH_CHECK(false, "triplet_loss: DNNRL_MINE_TILE must be tiny, small or large (or unset), got '", v, "'");
  return MineTile::kAuto;  // (not reached)
}

template <typename scalar_t>
void mine_dispatch(const at::Tensor& x, const at::Tensor& labels, int64_t mining, int64_t loss_type,
                   double alpha, double gamma, double margin, at::Tensor& loss_rows, at::Tensor& pos,
                   at::Tensor& neg, at::Tensor& r, at::Tensor& valid, int64_t reduction, at::Tensor* loss) {
  using T = typename Native<scalar_t>::type;
  using Large = typename Engines<T>::Large;
  using Small = typename Engines<T>::Small;
  using Tiny = typename Engines<T>::Tiny;
  const int64_t B = x.size(0);
  // The large tile only once it alone gives every SM a block; the tiny one while the
  // small one would leave three quarters of the SMs without a block (B <= 320 on 132 SMs).
  const int64_t sms = num_sms();
  MineTile tile = mine_tile_override();
  if (tile == MineTile::kAuto) {
    tile = ceil_div<int64_t>(B, Large::BM) * ceil_div<int64_t>(B, Large::BN) >= sms ? MineTile::kLarge
           : 4 * ceil_div<int64_t>(B, Small::BM) * ceil_div<int64_t>(B, Small::BN) <= sms ? MineTile::kTiny
                                                                                           : MineTile::kSmall;
  }
  if (tile == MineTile::kLarge) {
    mine_impl<scalar_t, Large>(x, labels, mining, loss_type, alpha, gamma, margin, loss_rows, pos, neg, r, valid,
                               reduction, loss);
  } else if (tile == MineTile::kTiny) {
    mine_impl<scalar_t, Tiny>(x, labels, mining, loss_type, alpha, gamma, margin, loss_rows, pos, neg, r, valid,
                              reduction, loss);
  } else {
    mine_impl<scalar_t, Small>(x, labels, mining, loss_type, alpha, gamma, margin, loss_rows, pos, neg, r, valid,
                               reduction, loss);
  }
}

void reduce_rows(const at::Tensor& rows, const at::Tensor* valid, int64_t reduction, at::Tensor& out) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "dnnrl_reduce_loss", [&] {
    reduce_loss_kernel<scalar_t><<<1, 512, 0, stream>>>(
        rows.data_ptr<scalar_t>(), valid ? valid->data_ptr<bool>() : nullptr, rows.numel(), reduction,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> triplet_loss_forward_kernel(
    const at::Tensor& x_in, const at::Tensor& labels_in, int64_t mining, int64_t loss_type, double alpha,
    double gamma, double margin, int64_t reduction) {
  check_common(x_in, loss_type, reduction);
  check_index("triplet_loss", "labels", labels_in, x_in);
  TORCH_CHECK(labels_in.size(0) == x_in.size(0), "triplet_loss: labels has ", labels_in.size(0),
              " entries but x has ", x_in.size(0), " rows");
  TORCH_CHECK(mining == kBatchHard || mining == kSemiHard || mining == kEasyPositive,
              "triplet_loss: mining must be 0 (batch_hard), 1 (semi_hard) or 2 (easy_positive), got ", mining);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t B = x.size(0);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = x.options().dtype(acc_type);
  at::Tensor loss_rows = at::empty({B}, acc_opts);
  at::Tensor pos = at::empty({B}, x.options().dtype(at::kLong));
  at::Tensor neg = at::empty({B}, x.options().dtype(at::kLong));
  at::Tensor r = at::empty({B}, acc_opts);
  at::Tensor valid = at::empty({B}, x.options().dtype(at::kBool));
  if (B == 0) {
    return {reduction == kNone ? loss_rows : at::zeros({}, acc_opts), pos, neg, r, valid};
  }
  // mean / sum: reduced by mine_finalize's last block (no separate launch)
  const bool fused_reduce = reduction != kNone && loss_fewer_launches();
  at::Tensor loss = reduction == kNone ? at::Tensor() : at::empty({}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dnnrl_triplet_loss_cuda", [&] {
    mine_dispatch<scalar_t>(x, labels, mining, loss_type, alpha, gamma, margin, loss_rows, pos, neg, r, valid,
                            reduction, fused_reduce ? &loss : nullptr);
  });
  if (reduction == kNone) return {loss_rows, pos, neg, r, valid};
  if (!fused_reduce) reduce_rows(loss_rows, &valid, reduction, loss);
  return {loss, pos, neg, r, valid};
}

std::tuple<at::Tensor, at::Tensor> triplet_loss_indexed_kernel(const at::Tensor& x_in, const at::Tensor& anchor_in,
                                                               const at::Tensor& positive_in,
                                                               const at::Tensor& negative_in, int64_t loss_type,
                                                               double alpha, double gamma, double margin,
                                                               int64_t reduction) {
  check_common(x_in, loss_type, reduction);
  check_index("triplet_loss_indexed", "anchor", anchor_in, x_in);
  check_index("triplet_loss_indexed", "positive", positive_in, x_in);
  check_index("triplet_loss_indexed", "negative", negative_in, x_in);
  const int64_t Tn = anchor_in.size(0);
  TORCH_CHECK(positive_in.size(0) == Tn && negative_in.size(0) == Tn,
              "triplet_loss_indexed: anchor, positive and negative must have the same length, got ", Tn, ", ",
              positive_in.size(0), ", ", negative_in.size(0));
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor anc = anchor_in.to(at::kLong).contiguous();
  const at::Tensor pos = positive_in.to(at::kLong).contiguous();
  const at::Tensor neg = negative_in.to(at::kLong).contiguous();
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = x.options().dtype(acc_type);
  at::Tensor loss_rows = at::empty({Tn}, acc_opts);
  at::Tensor r = at::empty({Tn}, acc_opts);
  if (Tn > 0) {
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const int D = static_cast<int>(x.size(1));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dnnrl_triplet_indexed_cuda", [&] {
      using T = typename Native<scalar_t>::type;
      using acc_t = typename Acc<scalar_t>::type;
      indexed_loss_kernel<T, acc_t><<<static_cast<unsigned>(ceil_div<int64_t>(Tn, 8)), 256, 0, stream>>>(
          reinterpret_cast<const T*>(x.data_ptr<scalar_t>()), anc.data_ptr<int64_t>(), pos.data_ptr<int64_t>(),
          neg.data_ptr<int64_t>(), Tn, x.size(0), D, loss_type, static_cast<acc_t>(alpha),
          static_cast<acc_t>(gamma), static_cast<acc_t>(margin), loss_rows.data_ptr<acc_t>(), r.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (reduction == kNone) return {loss_rows, r};
  if (Tn == 0) return {at::zeros({}, acc_opts), r};
  at::Tensor loss = at::empty({}, acc_opts);
  reduce_rows(loss_rows, nullptr, reduction, loss);
  return {loss, r};
}

}  // namespace
}  // namespace cuda
}  // namespace dnnrl

TORCH_LIBRARY_IMPL(dnnrl_ext, CUDA, m) {
  m.impl("triplet_loss", &dnnrl::cuda::triplet_loss_forward_kernel);
  m.impl("triplet_loss_indexed", &dnnrl::cuda::triplet_loss_indexed_kernel);
}
