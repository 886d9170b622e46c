// The launch check every .cu shares: nullptr, or a message naming the kernel whose launch failed (each launch is
// checked on its own, so an error is reported by the launch that caused it). Framework-free: nvcc alone and the
// CPU emulation (tests/cuda_emu) compile it.
#pragma once
#include <cstdio>

#include <cuda_runtime.h>

namespace tur::cuda {

inline const char* launch_error(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return nullptr;
  static thread_local char msg[160];
  snprintf(msg, sizeof(msg), "%s: %s", kernel, cudaGetErrorString(err));
  return msg;
}

}  // namespace tur::cuda
