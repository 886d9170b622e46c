// Plain C++ launch interface of the DCNv2 (tur::deform_conv2d) CUDA kernels, no torch types: the .cu compiles with
// nvcc alone (and under tests/cuda_emu), the torch glue (deform_conv2d_cuda_glue.cpp) needs no CUDA compiler.
//
// The kernels do the sampling parts of the op for one image; the GEMMs of the grouped convolution over the
// columns (forward, grad columns = W^T grad_out, grad weight) are ATen's at::mm (cuBLAS) in the glue.
#pragma once

#include <cstdint>

#include "cuda/tur_loss_cuda.h"  // DType

namespace tur::cuda {

// One image of the op. "acc" below is float64 for float64 inputs and float32 otherwise.
struct DcnLaunch {
  DType dtype = DType::kFloat32;  // of input, offset, mask and of the offset/mask gradients
  const void* input = nullptr;    // (C, H, W)
  const void* offset = nullptr;   // (2 * offset_groups * kh * kw, Ho, Wo)
  const void* mask = nullptr;     // (offset_groups * kh * kw, Ho, Wo), or nullptr for all ones
  int64_t C = 0, H = 0, W = 0, kh = 0, kw = 0, offset_groups = 1;
  int64_t sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1, Ho = 0, Wo = 0;
};

// cols (acc, C*kh*kw x Ho*Wo; row c*kh*kw + k): the masked bilinear samples.
const char* launch_dcn_im2col(const DcnLaunch& a, void* cols, void* stream);

// grad_input (acc, C x H x W) = the transpose of the sampling applied to grad_cols (acc, like cols). Zeroes
// grad_input first, then scatters with atomicAdd (see the .cu for why; the bits depend on the schedule).
const char* launch_dcn_col2im(const DcnLaunch& a, const void* grad_cols, void* grad_input, void* stream);

// grad_offset (dtype, like offset) and grad_mask (dtype, like mask; skipped when nullptr) from grad_cols:
// one thread per (offset group, tap, position) sums over the group's channels in order (deterministic).
const char* launch_dcn_offset_mask_grad(const DcnLaunch& a, const void* grad_cols, void* grad_offset,
                                        void* grad_mask, void* stream);

}  // namespace tur::cuda
