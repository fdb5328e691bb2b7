// Shared definitions of the dnnrl_ext operators: enums that the Python layer
// passes as plain ints, and small helpers used by both the CPU and CUDA kernels.
#pragma once

#include <cstdint>
#include <cmath>
#include <limits>

#if defined(__CUDACC__)
#define DNNRL_HD __host__ __device__
#else
#define DNNRL_HD
#endif

namespace dnnrl {

// Mining strategies (SPEC section 2; easy_positive: the nearest positive instead of the
// farthest, with batch_hard's negative, Xuan et al. 2020).
enum Mining : int64_t { kBatchHard = 0, kSemiHard = 1, kEasyPositive = 2 };
// Per-triplet loss: the paper's exponential loss or the hinge (T-DNN) baseline.
enum LossType : int64_t { kExp = 0, kHinge = 1 };
// Reductions, numbered like torch's legacy Reduction enum.
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// Loss of one triplet from its relative distance r = d(a,n) - d(a,p).
// NaN r gives NaN (never a finite value), r <= gamma gives exactly 1 for exp.
template <typename acc_t>
inline DNNRL_HD acc_t triplet_value(acc_t r, int64_t loss_type, acc_t alpha,
                                               acc_t gamma, acc_t margin) {
  if (r != r) return r;  // NaN propagates
  if (loss_type == kExp) {
    return r > gamma ? exp(-alpha * (r - gamma)) : acc_t(1);
  }
  acc_t h = margin - r;
  return h > acc_t(0) ? h : acc_t(0);
}

// dL/dr of one triplet (0 where the loss is flat; NaN where r is NaN).
template <typename acc_t>
inline DNNRL_HD acc_t triplet_dloss_dr(acc_t r, int64_t loss_type, acc_t alpha,
                                                  acc_t gamma, acc_t margin) {
  if (r != r) return r;
  if (loss_type == kExp) {
    return r > gamma ? -alpha * exp(-alpha * (r - gamma)) : acc_t(0);
  }
  return (margin - r) > acc_t(0) ? acc_t(-1) : acc_t(0);
}

// Mining comparisons. NaN wins every comparison (so a NaN embedding yields a NaN
// loss instead of silently being skipped); among equals, the smaller index wins.
template <typename acc_t>
inline DNNRL_HD bool better_max(acc_t d, int64_t j, acc_t best, int64_t best_j) {
  bool dn = d != d, bn = best != best;
  if (best_j < 0) return true;
  if (dn || bn) return dn && (!bn || j < best_j);
  return d > best || (d == best && j < best_j);
}

template <typename acc_t>
inline DNNRL_HD bool better_min(acc_t d, int64_t j, acc_t best, int64_t best_j) {
  bool dn = d != d, bn = best != best;
  if (best_j < 0) return true;
  if (dn || bn) return dn && (!bn || j < best_j);
  return d < best || (d == best && j < best_j);
}

}  // namespace dnnrl
