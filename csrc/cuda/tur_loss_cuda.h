// Plain C++ launch interface of the CUDA kernels (no torch types), so tur_loss_cuda.cu compiles with nvcc
// alone and the torch glue (tur_loss_cuda_glue.cpp) needs no CUDA compiler.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tur::cuda {

enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

struct LossLaunch {
  DType dtype = DType::kFloat32;
  // Inputs in the G x Q layout of tur_loss_math.h; task_ids is int64 on the device.
  const void* pred = nullptr;
  const void* target = nullptr;
  const void* uncertainty = nullptr;
  const int64_t* task_ids = nullptr;
  int64_t B = 0, G = 0, Q = 0, K = 0;
  double eps = 0.0, reg_weight = 0.0;
  // Outputs: gradients in the input dtype, float32 for float16 (both null when no gradient is wanted; see
  // grad_dtype in tur_loss.h); statistics in float32, or float64 for float64 inputs; counts int64.
  void* grad_pred = nullptr;
  void* grad_uncertainty = nullptr;
  void* loss = nullptr;
  void* per_task_loss = nullptr;
  void* per_task_l1 = nullptr;
  void* per_task_wl1 = nullptr;
  void* per_task_reg = nullptr;
  int64_t* counts = nullptr;
  // Scratch of workspace_bytes(...) bytes, 256-byte aligned.
  void* workspace = nullptr;
  int device = 0;
};

// Scratch the launch needs (task maps U_k, per-block partial sums, the task grouping).
size_t workspace_bytes(const LossLaunch& args);

// Enqueues the whole forward (and gradients) on `stream` (a cudaStream_t). Returns nullptr, or a static
// message naming the CUDA error. Out-of-range task ids make the loss NaN (no host synchronisation here).
const char* launch_loss(const LossLaunch& args, void* stream);

}  // namespace tur::cuda
