// A CPU emulator for the CUDA kernels of dnnrl_ext: the kernels' own source, compiled by
// the host compiler with this header forced in front (tools/cuda_emu/emulated_ops.py),
// runs every CUDA thread of a block as a fiber on one OS thread.
//
// What it models: the thread/block/grid indices; __syncthreads (and _or) as a barrier
// of every thread that has not exited, with a check that all of them wait at the same
// barrier; warp collectives (__shfl*_sync, __ballot_sync, __all_sync, __syncwarp, wmma
// mma_sync) that wait for every lane named in the mask, with a check that those lanes
// run the same collective with the same mask; cp.async copies that land only when the
// thread waits for their group (the latest moment the hardware allows); shared memory
// filled with 0xFF bytes (NaN, -1) at the start of every block; wmma fragments spread
// over the 32 lanes (each lane holds num_elements elements, in a mapping of our own);
// the launch limits (threads per block, dynamic shared memory above 48 KiB only after
// cudaFuncSetAttribute). Between two of those points a thread runs without
// interruption; DNNRL_EMU_SCHEDULE=forward|reverse|random:SEED picks the order the
// threads of a block take turns in, so that results which depend on it show a race.
//
// What it cannot find: anything about timing, the memory model between blocks (blocks
// run one after another), register or shared-memory limits of the real compiler, and
// out-of-bounds global accesses (tensors are plain CPU memory). It is a test of the
// kernels' logic, not a stand-in for running them on a GPU.
#pragma once

#define DNNRL_CUDA_EMU 1

// Before cuda_runtime_api.h's host_defines.h, which would give these attribute meanings.
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __launch_bounds__(...)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <math.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace dnnrl_emu {

// ---------------------------------------------------------------- runtime (emu_runtime.cpp)
[[noreturn]] void fail(const std::string& what);
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();
int lane_id();
void syncthreads(const char* file, int line);
int syncthreads_or(int pred, const char* file, int line);

// A warp collective: the calling lane waits until every lane in `mask` has called one
// with the same `kind` and mask, then `complete` runs once with every lane's `arg`
// (indexed by lane; nullptr for lanes outside the mask), and all of them go on.
using CompleteFn = void (*)(void* const* lane_args, unsigned mask);
void warp_collective(unsigned mask, CompleteFn complete, void* arg, const char* kind, const char* file, int line);

void cp_async16(void* dst, const void* src, bool valid);
void cp_async_commit();
void cp_async_wait(int newest_left);
void* dynamic_smem();
void shared_decl(void* p, size_t bytes);  // a static __shared__ variable: poisoned once per block

// Runs `body` as every thread of every block of the grid (blocks one after another).
void run_grid(dim3 grid, dim3 block, size_t smem, const void* kernel, const std::function<void()>& body);
void launch_check();

// ---------------------------------------------------------------- launches
// `kern<<<grid, block, smem, stream>>>(args)` becomes `Launch(grid, block, smem, stream).go(kern, args)`.
struct Launch {
  dim3 grid, block;
  size_t smem;
  Launch(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}
  template <typename... P, typename... A>
  void go(void (*kernel)(P...), A&&... args) const {
    static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
    // Arguments are converted to the parameter types at the launch, as CUDA copies them.
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    run_grid(grid, block, smem, reinterpret_cast<const void*>(kernel), [&] { std::apply(kernel, params); });
  }
};

// ---------------------------------------------------------------- shuffles
template <typename T>
struct ShuffleArg {
  T in, out;
  int src;    // lane to read from (already resolved for xor / index)
};

template <typename T>
void shuffle_complete(void* const* args, unsigned mask) {
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    auto* a = static_cast<ShuffleArg<T>*>(args[l]);
    if (a->src < 0 || a->src > 31 || !(mask >> a->src & 1u))
      fail("warp shuffle: lane " + std::to_string(l) + " reads lane " + std::to_string(a->src) +
           ", which is not in the mask (undefined on the GPU)");
    a->out = static_cast<ShuffleArg<T>*>(args[a->src])->in;
  }
}

template <typename T>
T shfl(unsigned mask, T v, int src, const char* kind, const char* file, int line) {
  ShuffleArg<T> a{v, v, src};
  warp_collective(mask, &shuffle_complete<T>, &a, kind, file, line);
  return a.out;
}

struct PredArg {
  int in;
  unsigned out;
};
inline void ballot_complete(void* const* args, unsigned mask) {
  unsigned b = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && static_cast<PredArg*>(args[l])->in) b |= 1u << l;
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1u) static_cast<PredArg*>(args[l])->out = b;
}
inline void syncwarp_complete(void* const*, unsigned) {}

}  // namespace dnnrl_emu

// ---------------------------------------------------------------- built-in variables
#define threadIdx (::dnnrl_emu::thread_idx())
#define blockIdx (::dnnrl_emu::block_idx())
#define blockDim (::dnnrl_emu::block_dim())
#define gridDim (::dnnrl_emu::grid_dim())

// ---------------------------------------------------------------- intrinsics
#define __syncthreads() ::dnnrl_emu::syncthreads(__FILE__, __LINE__)
#define __syncthreads_or(p) ::dnnrl_emu::syncthreads_or((p) ? 1 : 0, __FILE__, __LINE__)
#define __syncwarp(...) ::dnnrl_emu::syncwarp_at(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(mask, v, src, ...) \
  ::dnnrl_emu::shfl_idx_at(__FILE__, __LINE__, mask, v, src __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_xor_sync(mask, v, lm, ...) \
  ::dnnrl_emu::shfl_xor_at(__FILE__, __LINE__, mask, v, lm __VA_OPT__(, ) __VA_ARGS__)
#define __ballot_sync(mask, p) ::dnnrl_emu::ballot_at(__FILE__, __LINE__, mask, (p) ? 1 : 0)
#define __all_sync(mask, p) (::dnnrl_emu::ballot_at(__FILE__, __LINE__, mask, (p) ? 1 : 0) == (mask))
#define __any_sync(mask, p) (::dnnrl_emu::ballot_at(__FILE__, __LINE__, mask, (p) ? 1 : 0) != 0u)

namespace dnnrl_emu {
inline void syncwarp_at(const char* file, int line, unsigned mask = 0xffffffffu) {
  warp_collective(mask, &syncwarp_complete, nullptr, "__syncwarp", file, line);
}
// width: lanes are grouped in segments of `width`; a source outside the caller's segment
// reads the caller's own value (the hardware's clamp for xor, wrap for an index).
template <typename T>
T shfl_idx_at(const char* file, int line, unsigned mask, T v, int src, int width = 32) {
  const int lane = lane_id();
  const int base = lane & ~(width - 1);
  return shfl(mask, v, base + (src & (width - 1)), "__shfl_sync", file, line);
}
template <typename T>
T shfl_xor_at(const char* file, int line, unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = lane_id();
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  return shfl(mask, v, src, "__shfl_xor_sync", file, line);
}
inline unsigned ballot_at(const char* file, int line, unsigned mask, int pred) {
  PredArg a{pred, 0u};
  warp_collective(mask, &ballot_complete, &a, "__ballot_sync", file, line);
  return a.out;
}
}  // namespace dnnrl_emu

// CUDA's global min / max overloads of the device math library.
#define DNNRL_EMU_MINMAX(T)                          \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
DNNRL_EMU_MINMAX(int)
DNNRL_EMU_MINMAX(unsigned)
DNNRL_EMU_MINMAX(long)
DNNRL_EMU_MINMAX(unsigned long)
DNNRL_EMU_MINMAX(long long)
DNNRL_EMU_MINMAX(unsigned long long)
#undef DNNRL_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned v; std::memcpy(&v, &f, 4); return v; }
inline int __float_as_int(float f) { int v; std::memcpy(&v, &f, 4); return v; }
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline void __threadfence() {}
inline void __threadfence_block() {}
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline T __ldg(const T* p) { return *p; }

// Atomics: a fiber is never interrupted between two collectives, so plain read-modify-write is atomic here.
template <typename T, typename V>
inline T atomicAdd(T* p, V v) {
  T old = *p;
  *p = static_cast<T>(old + v);
  return old;
}
template <typename T, typename V>
inline T atomicOr(T* p, V v) {
  T old = *p;
  *p = static_cast<T>(old | v);
  return old;
}
template <typename T, typename V>
inline T atomicMax(T* p, V v) {
  T old = *p;
  *p = old < static_cast<T>(v) ? static_cast<T>(v) : old;
  return old;
}
template <typename T, typename V>
inline T atomicMin(T* p, V v) {
  T old = *p;
  *p = static_cast<T>(v) < old ? static_cast<T>(v) : old;
  return old;
}
template <typename T, typename V>
inline T atomicExch(T* p, V v) {
  T old = *p;
  *p = static_cast<T>(v);
  return old;
}
