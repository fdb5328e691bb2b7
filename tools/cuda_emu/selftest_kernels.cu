// Kernels with planted faults, compiled only into the emulator (tests/test_cuda_emulated.py
// checks that each fault is reported, so that the emulator's checks can fail), plus the
// diagnostics op knn_candidate_stats of the emulated library.
//   case 0  correct: block sum through shared memory, a warp shuffle sum, cp.async and a
//           16x16x16 wmma product; out = [block sum, warp sum of lane ids, copied value,
//           product[0][0], product[15][15]]
//   case 1  __syncthreads in two branches that split the block       -> divergent barriers
//   case 2  a full-mask shuffle after half the warp has returned      -> lane has exited
//   case 3  reads a cp.async destination before waiting for it        -> the poison (NaN)
//   case 4  wmma load from a pointer 16 bytes past a 32-byte boundary -> not 256-bit aligned
//   case 5  a shared-memory write read by another thread, no barrier  -> depends on the schedule
//   case 6  64 KiB of dynamic shared memory without raising the limit -> launch refused
//   case 7  a warp collective while one of its lanes waits at a barrier -> deadlock
//   case 8  a shuffle that reads a lane outside its mask              -> not in the mask
//   case 9  reads one element past the end of its input tensor        -> memcheck.sh (ASan)
//   case 10 writes one byte past its dynamic shared memory            -> memcheck.sh (ASan)
#include <torch/library.h>

#include <mma.h>

#include "utils.cuh"

namespace dnnrl {
namespace cuda {
std::pair<int64_t, int64_t> knn_candidate_stats();  // knn_cuda.cu
namespace {

__global__ void good_kernel(const float* __restrict__ in, float* __restrict__ out) {
  __shared__ float part[64];
  extern __shared__ __align__(128) unsigned char smem[];
  const int t = threadIdx.x;
  part[t] = in[t];
  __syncthreads();
  if (t == 0) {
    float s = 0.f;
    for (int i = 0; i < 64; ++i) s += part[i];
    out[0] = s;
  }
  const float lane_sum = warp_sum<float>(static_cast<float>(t % 32));
  if (t == 0) out[1] = lane_sum;
  float* staged = reinterpret_cast<float*>(smem);
  if (t == 0) {
    cp_async16(staged, in, true);
    cp_async_commit();
    cp_async_wait<0>();
    out[2] = staged[3];
  }
  __syncthreads();
  __half* ha = reinterpret_cast<__half*>(smem + 1024);
  __half* hb = ha + 256;
  for (int e = t; e < 256; e += 64) {
    ha[e] = __float2half_rn(static_cast<float>(e % 7));
    hb[e] = __float2half_rn(static_cast<float>(e % 5));
  }
  __syncthreads();
  float* c = reinterpret_cast<float*>(smem + 4096);
  if (t < 32) {
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> a;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __half, nvcuda::wmma::col_major> b;
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc;
    nvcuda::wmma::fill_fragment(acc, 0.f);
    nvcuda::wmma::load_matrix_sync(a, ha, 16);
    nvcuda::wmma::load_matrix_sync(b, hb, 16);
    nvcuda::wmma::mma_sync(acc, a, b, acc);
    nvcuda::wmma::store_matrix_sync(c, acc, 16, nvcuda::wmma::mem_row_major);
  }
  __syncthreads();
  if (t == 0) {
    out[3] = c[0];
    out[4] = c[255];
  }
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[0] = 1.f;
}

__global__ void exited_lane_kernel(float* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[0] = warp_sum<float>(1.f);
}

__global__ void missing_wait_kernel(const float* __restrict__ in, float* __restrict__ out) {
  extern __shared__ __align__(128) unsigned char smem[];
  float* staged = reinterpret_cast<float*>(smem);
  if (threadIdx.x == 0) {
    cp_async16(staged, in, true);
    cp_async_commit();
    out[0] = staged[0];  // no cp_async_wait
    cp_async_wait<0>();
    out[1] = staged[0];
  }
}

__global__ void misaligned_wmma_kernel(float* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  __half* h = reinterpret_cast<__half*>(smem + 16);
  for (int e = threadIdx.x; e < 256; e += 32) h[e] = __float2half_rn(1.f);
  __syncwarp();
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> a;
  nvcuda::wmma::load_matrix_sync(a, h, 16);
  out[0] = 1.f;
}

__global__ void race_kernel(float* out) {
  __shared__ float v;
  if (threadIdx.x == 0) v = 1.f;
  if (threadIdx.x == 1) v = 2.f;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = v;
}

__global__ void big_smem_kernel(float* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  smem[0] = 1;
  out[0] = smem[0];
}

__global__ void deadlock_kernel(float* out) {
  if (threadIdx.x == 5) {
    __syncthreads();
    return;
  }
  out[0] = warp_sum<float>(1.f);
  __syncthreads();
}

__global__ void outside_mask_kernel(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.f, 16);
}

__global__ void global_oob_kernel(const float* __restrict__ in, int n, float* __restrict__ out) {
  if (threadIdx.x == 0) out[0] = in[n];
}

__global__ void shared_oob_kernel(float* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  if (threadIdx.x == 0) smem[1000] = 1;  // launched with 1000 bytes
  out[0] = 1.f;
}

at::Tensor selftest(int64_t which, const at::Tensor& in) {
  TORCH_CHECK(in.is_cpu() && in.scalar_type() == at::kFloat && in.numel() >= 64 && in.is_contiguous(),
              "selftest: in must be a contiguous float32 CPU tensor of at least 64 elements");
  at::Tensor out = at::zeros({16}, in.options());
  const float* ip = in.data_ptr<float>();
  float* op = out.data_ptr<float>();
  switch (which) {
    case 0: good_kernel<<<1, 64, 8192>>>(ip, op); break;
    case 1: divergent_barrier_kernel<<<1, 64>>>(op); break;
    case 2: exited_lane_kernel<<<1, 32>>>(op); break;
    case 3: missing_wait_kernel<<<1, 32, 128>>>(ip, op); break;
    case 4: misaligned_wmma_kernel<<<1, 32, 1024>>>(op); break;
    case 5: race_kernel<<<1, 32>>>(op); break;
    case 6: big_smem_kernel<<<1, 32, 64 * 1024>>>(op); break;
    case 7: deadlock_kernel<<<1, 64>>>(op); break;
    case 8: outside_mask_kernel<<<1, 32>>>(op); break;
    case 9: global_oob_kernel<<<1, 32>>>(ip, static_cast<int>(in.numel()), op); break;
    case 10: shared_oob_kernel<<<1, 32, 1000>>>(op); break;
    default: TORCH_CHECK(false, "selftest: no case ", which);
  }
  return out;
}

std::vector<int64_t> candidate_stats() {
  const auto s = knn_candidate_stats();
  return {s.first, s.second};
}

}  // namespace
}  // namespace cuda
}  // namespace dnnrl

TORCH_LIBRARY_FRAGMENT(dnnrl_emu, m) {
  m.def("selftest(int which, Tensor input) -> Tensor", &dnnrl::cuda::selftest);
  m.def("knn_candidate_stats() -> int[]", &dnnrl::cuda::candidate_stats);
}
