// Host-side plumbing of tur::deform_conv2d (modulated deformable convolution, DCNv2) shared by every device:
// argument checks and the problem's sizes. Kernels live in cpu/ and cuda/.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace tur {

struct DcnShape {
  int64_t B = 0, C = 0, H = 0, W = 0;       // input
  int64_t Cout = 0, kh = 0, kw = 0;          // weight (Cout, C / groups, kh, kw)
  int64_t groups = 1, offset_groups = 1;
  int64_t sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  int64_t Ho = 0, Wo = 0;                    // output
  bool has_mask = false;
};

// Validates the op's arguments (ValueError/TypeError naming the argument) and derives groups, offset groups
// and the output size. `grad_out`, when given, must have the output's shape (the backward op).
DcnShape check_deform_conv2d(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                             c10::IntArrayRef padding, c10::IntArrayRef dilation,
                             const c10::optional<at::Tensor>& mask, const at::Tensor* grad_out = nullptr);

// grad_input, grad_offset, grad_weight, grad_bias, grad_mask (empty when there is no mask).
using DcnGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

}  // namespace tur
