// Emulator stand-in for <c10/cuda/CUDAException.h>: errors surface at the launch itself.
#pragma once
#include <cuda_runtime.h>

#define C10_CUDA_CHECK(expr)                                                                   \
  do {                                                                                         \
    const cudaError_t dnnrl_emu_err = (expr);                                                  \
    if (dnnrl_emu_err != cudaSuccess) ::dnnrl_emu::fail(std::string("CUDA call failed: ") + #expr); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::dnnrl_emu::launch_check()
