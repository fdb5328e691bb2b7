// CUDA kernel of dnnrl_ext::triplet_loss_backward (both the mined and the indexed form).
//
// Per valid triplet t with c_t = grad_t * dL/dr(r_t) (/ number of valid for mean):
//   grad[a] += 2c (x_p - x_n);  grad[p] += 2c (x_a - x_p);  grad[n] += 2c (x_n - x_a).
// Launches on the current stream:
//   either
//   triplet_gather (deterministic; also the default while B*T is small): one launch;
//                  warp per output row, scans the triplets in order and adds every role
//                  the row plays (anchor, positive, negative in that order) with its c_t
//                  formed on the spot, in registers, then writes the row once in x's
//                  dtype. No atomics, bitwise reproducible; O(B*T) index comparisons,
//                  O(T*D) arithmetic.
//   or
//   triplet_coef   one block: counts valid triplets (mean), writes c_t (T floats), then
//   triplet_scatter (default for large B*T): warp per triplet, float atomics into a
//                  float32 (float64 for float64) buffer, then cast_rows into x's dtype
//                  (no cast for float32/float64: the buffer is the output).
// Extra memory: O(T) coefficients (+ a B x D float32 buffer for 16-bit x, atomic path).
// Triplets with an index outside [0, B) or valid == false contribute nothing.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "utils.cuh"

namespace dnnrl {
namespace cuda {
namespace {

// Rows of at most this many elements are accumulated per pass of triplet_gather.
constexpr int kGatherPerLane = 16;  // 16 x 32 lanes = 512 elements per pass

template <typename acc_t>
__global__ void __launch_bounds__(512) triplet_coef_kernel(const acc_t* __restrict__ grad, bool grad_per_row,
                                                           const acc_t* __restrict__ r,
                                                           const bool* __restrict__ valid, int64_t Tn,
                                                           int64_t loss_type, acc_t alpha, acc_t gamma,
                                                           acc_t margin, int64_t reduction,
                                                           acc_t* __restrict__ coef) {
  __shared__ int64_t sc[512];
  __shared__ acc_t count;
  int64_t c = 0;
  if (reduction == kMean) {
    for (int64_t t = threadIdx.x; t < Tn; t += 512) c += valid == nullptr ? 1 : (valid[t] ? 1 : 0);
  }
  sc[threadIdx.x] = c;
  __syncthreads();
  for (int w = 256; w > 0; w >>= 1) {
    if (threadIdx.x < w) sc[threadIdx.x] += sc[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) count = static_cast<acc_t>(sc[0] > 0 ? sc[0] : 1);
  __syncthreads();
  for (int64_t t = threadIdx.x; t < Tn; t += 512) {
    const acc_t g = grad_per_row ? grad[t] : grad[0];
    const acc_t gr = reduction == kMean ? g / count : g;  // as autograd of total / count
    coef[t] = acc_t(2) * gr * triplet_dloss_dr<acc_t>(r[t], loss_type, alpha, gamma, margin);
  }
}

// Indices of triplet t, and whether it contributes (valid and in range).
__device__ __forceinline__ bool triplet_indices(const int64_t* anc, const int64_t* pos, const int64_t* neg,
                                                const bool* valid, int64_t t, int64_t B, int64_t& a,
                                                int64_t& p, int64_t& n) {
  a = anc == nullptr ? t : anc[t];
  p = pos[t];
  n = neg[t];
  const bool ok = valid == nullptr || valid[t];
  return ok && a >= 0 && a < B && p >= 0 && p < B && n >= 0 && n < B;
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(256) triplet_gather_kernel(
    const T* __restrict__ x, const int64_t* __restrict__ anc, const int64_t* __restrict__ pos,
    const int64_t* __restrict__ neg, const bool* __restrict__ valid, const acc_t* __restrict__ grad,
    bool grad_per_row, const acc_t* __restrict__ r, int64_t loss_type, acc_t alpha, acc_t gamma, acc_t margin,
    int64_t reduction, const acc_t* __restrict__ coef, int64_t Tn, int64_t B, int D, T* __restrict__ out) {
  // Without coef the coefficients are formed on the spot (no separate launch):
  // 2 g_t dL/dr(r_t) per matching triplet; for mean the row is divided once at the end
  // by the number of valid triplets, which the same scan counts (every warp alike).
  // With coef (triplet_coef's c_t, mean already applied) they are read.
  if (coef != nullptr) reduction = kSum;  // (no division at the end)
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * 8;
  const acc_t g0 = grad_per_row || coef != nullptr ? acc_t(0) : grad[0];
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32; b < B; b += warps) {
    for (int d0 = 0; d0 < D; d0 += 32 * kGatherPerLane) {
      acc_t acc[kGatherPerLane];
#pragma unroll
      for (int i = 0; i < kGatherPerLane; ++i) acc[i] = 0;
      int64_t count = 0;
      for (int64_t t0 = 0; t0 < Tn; t0 += 32) {
        const int64_t t = t0 + lane;
        int64_t a = -1, p = -1, n = -1;
        int roles = 0;
        if (t < Tn && triplet_indices(anc, pos, neg, valid, t, B, a, p, n)) {
          roles = (a == b ? 1 : 0) | (p == b ? 2 : 0) | (n == b ? 4 : 0);
        }
        count += __popc(__ballot_sync(0xffffffffu, t < Tn && (valid == nullptr || valid[t])));
        unsigned m = __ballot_sync(0xffffffffu, roles != 0);
        while (m) {  // matching triplets in increasing t: a fixed order
          const int src = __ffs(m) - 1;
          m &= m - 1;
          const int rl = __shfl_sync(0xffffffffu, roles, src);
          const int64_t ta = __shfl_sync(0xffffffffu, a, src);
          const int64_t tp = __shfl_sync(0xffffffffu, p, src);
          const int64_t tn = __shfl_sync(0xffffffffu, n, src);
          const int64_t tt = t0 + src;
          const acc_t c = coef != nullptr
                              ? coef[tt]
                              : acc_t(2) * (grad_per_row ? grad[tt] : g0) *
                                    triplet_dloss_dr<acc_t>(r[tt], loss_type, alpha, gamma, margin);
          const T* xa = x + ta * D;
          const T* xp = x + tp * D;
          const T* xn = x + tn * D;
#pragma unroll
          for (int i = 0; i < kGatherPerLane; ++i) {
            const int e = d0 + lane + 32 * i;
            if (e < D) {
              const acc_t va = load_acc<acc_t>(xa + e), vp = load_acc<acc_t>(xp + e),
                          vn = load_acc<acc_t>(xn + e);
              if (rl & 1) acc[i] += c * (vp - vn);
              if (rl & 2) acc[i] += c * (va - vp);
              if (rl & 4) acc[i] += c * (vn - va);
            }
          }
        }
      }
      const acc_t div = reduction == kMean ? static_cast<acc_t>(count > 0 ? count : 1) : acc_t(1);
#pragma unroll
      for (int i = 0; i < kGatherPerLane; ++i) {
        const int e = d0 + lane + 32 * i;
        if (e < D) store_as(out + b * D + e, reduction == kMean ? acc[i] / div : acc[i]);
      }
    }
  }
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(256) triplet_scatter_kernel(
    const T* __restrict__ x, const int64_t* __restrict__ anc, const int64_t* __restrict__ pos,
    const int64_t* __restrict__ neg, const bool* __restrict__ valid, const acc_t* __restrict__ coef, int64_t Tn,
    int64_t B, int D, acc_t* __restrict__ buf) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * 8;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32; t < Tn; t += warps) {
    int64_t a, p, n;
    if (!triplet_indices(anc, pos, neg, valid, t, B, a, p, n)) continue;  // warp-uniform
    const acc_t c = coef[t];
    for (int e = lane; e < D; e += 32) {
      const acc_t va = load_acc<acc_t>(x + a * D + e), vp = load_acc<acc_t>(x + p * D + e),
                  vn = load_acc<acc_t>(x + n * D + e);
      atomicAdd(buf + a * D + e, c * (vp - vn));
      atomicAdd(buf + p * D + e, c * (va - vp));
      atomicAdd(buf + n * D + e, c * (vn - va));
    }
  }
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(256) cast_rows_kernel(const acc_t* __restrict__ buf, int64_t n, T* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * 256) {
    store_as(out + i, buf[i]);
  }
}

void check_vec(const char* name, const at::Tensor& t, const at::Tensor& x, int64_t n, bool integer) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "triplet_loss_backward: ", name, " must have shape (", n,
              "), got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), "triplet_loss_backward: ", name, " is on ", t.device(),
              " but x is on ", x.device());
  if (integer) {
    TORCH_CHECK(at::isIntegralType(t.scalar_type(), false), "triplet_loss_backward: ", name,
                " must be an integer tensor, got ", t.scalar_type());
  }
}

at::Tensor triplet_loss_backward_kernel(const at::Tensor& grad_in, const at::Tensor& x_in,
                                        const c10::optional<at::Tensor>& anchor_in, const at::Tensor& pos_in,
                                        const at::Tensor& neg_in, const at::Tensor& r_in,
                                        const c10::optional<at::Tensor>& valid_in, int64_t loss_type, double alpha,
                                        double gamma, double margin, int64_t reduction) {
  TORCH_CHECK(x_in.is_cuda(), "triplet_loss_backward: x must be a CUDA tensor");
  TORCH_CHECK(x_in.dim() == 2, "triplet_loss_backward: x must be 2-D (B, D), got ", x_in.dim(), " dims");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble ||
                  x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16,
              "triplet_loss_backward: x must be float16, bfloat16, float32 or float64, got ", x_in.scalar_type());
  TORCH_CHECK(loss_type == kExp || loss_type == kHinge,
              "triplet_loss_backward: loss_type must be 0 (exp) or 1 (hinge), got ", loss_type);
  TORCH_CHECK(reduction == kNone || reduction == kMean || reduction == kSum,
              "triplet_loss_backward: reduction must be 0, 1 or 2, got ", reduction);
  const int64_t B = x_in.size(0);
  const int64_t Tn = pos_in.dim() == 1 ? pos_in.size(0) : -1;
  check_vec("pos", pos_in, x_in, Tn, true);
  check_vec("neg", neg_in, x_in, Tn, true);
  check_vec("r", r_in, x_in, Tn, false);
  if (anchor_in.has_value()) {
    check_vec("anchor", *anchor_in, x_in, Tn, true);
  } else {
    TORCH_CHECK(Tn == B, "triplet_loss_backward: without anchor (mined form) pos must have one entry per row of x (",
                B, "), got ", Tn);
  }
  if (valid_in.has_value()) {
    check_vec("valid", *valid_in, x_in, Tn, false);
    TORCH_CHECK(valid_in->scalar_type() == at::kBool, "triplet_loss_backward: valid must be bool, got ",
                valid_in->scalar_type());
  }
  TORCH_CHECK(grad_in.device() == x_in.device(), "triplet_loss_backward: grad_loss is on ", grad_in.device(),
              " but x is on ", x_in.device());
  if (reduction == kNone) {
    TORCH_CHECK(grad_in.numel() == Tn, "triplet_loss_backward: grad_loss must have ", Tn,
                " elements for reduction none, got ", grad_in.numel());
  } else {
    TORCH_CHECK(grad_in.numel() == 1, "triplet_loss_backward: grad_loss must be a scalar for mean/sum, got ",
                grad_in.sizes());
  }
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return out;
  if (Tn == 0) return out.zero_();
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor grad = grad_in.to(acc_type).contiguous();
  const at::Tensor r = r_in.to(acc_type).contiguous();
  const at::Tensor pos = pos_in.to(at::kLong).contiguous();
  const at::Tensor neg = neg_in.to(at::kLong).contiguous();
  at::Tensor anc;
  if (anchor_in.has_value()) anc = anchor_in->to(at::kLong).contiguous();
  at::Tensor valid;
  if (valid_in.has_value()) valid = valid_in->contiguous();
  const int D = static_cast<int>(x.size(1));
  TORCH_CHECK(x.size(1) < (int64_t(1) << 31), "triplet_loss_backward: D too large");
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t* ap = anc.defined() ? anc.data_ptr<int64_t>() : nullptr;
  const bool* vp = valid.defined() ? valid.data_ptr<bool>() : nullptr;
  // Gather is deterministic and, while B*T is small, also the cheaper path.
  const bool gather = at::globalContext().deterministicAlgorithms() || B * Tn <= (int64_t(1) << 24);
  const int64_t sm_blocks = static_cast<int64_t>(num_sms()) * 8;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dnnrl_triplet_backward_cuda", [&] {
    using T = typename Native<scalar_t>::type;
    using acc_t = typename Acc<scalar_t>::type;
    const T* xp = reinterpret_cast<const T*>(x.data_ptr<scalar_t>());
    T* op = reinterpret_cast<T*>(out.data_ptr<scalar_t>());
    if (gather) {
      at::Tensor coef;  // DNNRL_LOSS_FEWER_LAUNCHES=0: the coefficients in a launch of their own
      if (!loss_fewer_launches()) {
        coef = at::empty({Tn}, x.options().dtype(acc_type));
        triplet_coef_kernel<acc_t><<<1, 512, 0, stream>>>(
            grad.data_ptr<acc_t>(), reduction == kNone, r.data_ptr<acc_t>(), vp, Tn, loss_type,
            static_cast<acc_t>(alpha), static_cast<acc_t>(gamma), static_cast<acc_t>(margin), reduction,
            coef.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div<int64_t>(B, 8), sm_blocks));
      triplet_gather_kernel<T, acc_t><<<blocks, 256, 0, stream>>>(
          xp, ap, pos.data_ptr<int64_t>(), neg.data_ptr<int64_t>(), vp, grad.data_ptr<acc_t>(), reduction == kNone,
          r.data_ptr<acc_t>(), loss_type, static_cast<acc_t>(alpha), static_cast<acc_t>(gamma),
          static_cast<acc_t>(margin), reduction, coef.defined() ? coef.data_ptr<acc_t>() : nullptr, Tn, B, D, op);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      at::Tensor coef = at::empty({Tn}, x.options().dtype(acc_type));
      triplet_coef_kernel<acc_t><<<1, 512, 0, stream>>>(
          grad.data_ptr<acc_t>(), reduction == kNone, r.data_ptr<acc_t>(), vp, Tn, loss_type,
          static_cast<acc_t>(alpha), static_cast<acc_t>(gamma), static_cast<acc_t>(margin), reduction,
          coef.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      constexpr bool direct = std::is_same<T, acc_t>::value;  // float32 / float64: accumulate into out
      at::Tensor buf = direct ? out.zero_() : at::zeros({B, D}, x.options().dtype(acc_type));
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div<int64_t>(Tn, 8), sm_blocks));
      triplet_scatter_kernel<T, acc_t><<<blocks, 256, 0, stream>>>(xp, ap, pos.data_ptr<int64_t>(),
                                                                   neg.data_ptr<int64_t>(), vp,
                                                                   coef.data_ptr<acc_t>(), Tn, B, D,
                                                                   buf.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (!direct) {
        const int64_t n = B * D;
        const unsigned cblocks = static_cast<unsigned>(std::min<int64_t>(ceil_div<int64_t>(n, 256), sm_blocks));
        cast_rows_kernel<T, acc_t><<<cblocks, 256, 0, stream>>>(buf.data_ptr<acc_t>(), n, op);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace dnnrl

TORCH_LIBRARY_IMPL(dnnrl_ext, CUDA, m) {
  m.impl("triplet_loss_backward", &dnnrl::cuda::triplet_loss_backward_kernel);
}
