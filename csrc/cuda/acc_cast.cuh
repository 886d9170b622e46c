// Conversions between a kernel's storage type and its accumulation type ("acc": float64 for float64, float32
// otherwise), shared by every .cu. Framework-free: nvcc alone and the CPU emulation (tests/cuda_emu) compile it.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace tur::cuda {

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round once, to nearest even, from float32 acc; float64 acc stores as is.
template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(double x) { return x; }

}  // namespace tur::cuda
