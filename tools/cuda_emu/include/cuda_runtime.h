// Emulator stand-in for <cuda_runtime.h>: the real API's types (cuda_runtime_api.h,
// declarations only) and the few calls the kernels' host code makes, answered on the CPU.
// emulated_ops.py rewrites those calls to the dnnrl_emu:: names below.
#pragma once
#include "dnnrl_cuda_emu.h"

namespace dnnrl_emu {

// The emulated card: an H100 SXM's numbers; DNNRL_EMU_SMS overrides the SM count so that
// tests can reach other grid shapes (splits) of the same kernels.
const cudaDeviceProp* device_properties();
size_t dynamic_smem_limit(const void* kernel);
void set_dynamic_smem_limit(const void* kernel, int bytes);

inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) {
  std::memset(p, v, n);
  return cudaSuccess;
}
template <typename K>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, K kernel) {
  std::memset(a, 0, sizeof(*a));
  a->maxThreadsPerBlock = 1024;
  a->maxDynamicSharedSizeBytes = static_cast<int>(dynamic_smem_limit(reinterpret_cast<const void*>(kernel)));
  return cudaSuccess;
}
template <typename K>
cudaError_t cudaFuncSetAttribute(K kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > device_properties()->sharedMemPerBlockOptin)
      fail("cudaFuncSetAttribute: a dynamic shared-memory limit of " + std::to_string(value) +
           " bytes is beyond the device's opt-in maximum");
    set_dynamic_smem_limit(reinterpret_cast<const void*>(kernel), value);
  }
  return cudaSuccess;
}
// Blocks per SM by threads and shared memory alone (the emulator knows no register counts).
template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int threads, size_t smem) {
  const cudaDeviceProp* p = device_properties();
  int by_threads = p->maxThreadsPerMultiProcessor / std::max(threads, 1);
  int by_smem = smem == 0 ? 32 : static_cast<int>(p->sharedMemPerMultiprocessor / (smem + 1024));
  *n = std::max(0, std::min({by_threads, by_smem, 32}));
  return cudaSuccess;
}

}  // namespace dnnrl_emu
