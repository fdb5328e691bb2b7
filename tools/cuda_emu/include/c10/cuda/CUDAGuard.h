// Emulator stand-in for <c10/cuda/CUDAGuard.h>: there is one (emulated) device.
#pragma once
#include <c10/core/Device.h>

#include <optional>

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct OptionalCUDAGuard {
  explicit OptionalCUDAGuard(std::optional<c10::Device> = std::nullopt) {}
};
}  // namespace cuda
}  // namespace c10
