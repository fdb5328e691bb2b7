// Emulator stand-in for <ATen/cuda/CUDAContext.h>: the current stream and device.
#pragma once
#include <cuda_runtime.h>

namespace at {
namespace cuda {
inline cudaStream_t getCurrentCUDAStream(int = -1) { return nullptr; }
inline const cudaDeviceProp* getCurrentDeviceProperties() { return ::dnnrl_emu::device_properties(); }
}  // namespace cuda
}  // namespace at
