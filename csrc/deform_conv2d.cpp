#include "deform_conv2d.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace tur {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_pair(c10::IntArrayRef v, const char* name, int64_t min) {
  TORCH_CHECK_VALUE(v.size() == 2, name, ": expected two values (h, w), got ", v.size());
  TORCH_CHECK_VALUE(v[0] >= min && v[1] >= min, name, ": expected values >= ", min, ", got ", v);
}

void check_like_input(const at::Tensor& t, const at::Tensor& input, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type(), name, ": expected dtype ", input.scalar_type(),
                   " (the dtype of input), got dtype ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == input.device(), name, ": expected a tensor on ", input.device(), " (the device of input), got ",
                    t.device());
}

}  // namespace

DcnShape check_deform_conv2d(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                             c10::IntArrayRef padding, c10::IntArrayRef dilation,
                             const c10::optional<at::Tensor>& mask, const at::Tensor* grad_out) {
  TORCH_CHECK_TYPE(is_supported_float(input.scalar_type()),
                   "input: expected a float16, bfloat16, float32 or float64 tensor, got dtype ", input.scalar_type());
  TORCH_CHECK_VALUE(input.dim() == 4, "input: expected a 4-D tensor (B, C, H, W), got shape ", input.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 4, "weight: expected a 4-D tensor (C_out, C_in / groups, kh, kw), got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(offset.dim() == 4, "offset: expected a 4-D tensor (B, 2 * offset_groups * kh * kw, H_out, W_out), got shape ",
                    offset.sizes());
  check_like_input(offset, input, "offset");
  check_like_input(weight, input, "weight");
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);

  DcnShape s;
  s.B = input.size(0);
  s.C = input.size(1);
  s.H = input.size(2);
  s.W = input.size(3);
  s.Cout = weight.size(0);
  s.kh = weight.size(2);
  s.kw = weight.size(3);
  s.sh = stride[0];
  s.sw = stride[1];
  s.ph = padding[0];
  s.pw = padding[1];
  s.dh = dilation[0];
  s.dw = dilation[1];
  TORCH_CHECK_VALUE(s.C >= 1 && s.H >= 1 && s.W >= 1, "input: expected at least one channel and H, W >= 1, got shape ",
                    input.sizes());
  TORCH_CHECK_VALUE(s.kh >= 1 && s.kw >= 1 && s.Cout >= 1 && weight.size(1) >= 1,
                    "weight: expected non-empty dims (C_out, C_in / groups, kh, kw), got shape ", weight.sizes());
  TORCH_CHECK_VALUE(s.C % weight.size(1) == 0, "weight: expected C_in / groups channels with C_in = ", s.C,
                    " a multiple of them, got shape ", weight.sizes());
  s.groups = s.C / weight.size(1);
  TORCH_CHECK_VALUE(s.Cout % s.groups == 0, "weight: expected C_out a multiple of groups = ", s.groups,
                    " (C_in / weight.shape[1]), got shape ", weight.sizes());
  const int64_t eff_h = s.dh * (s.kh - 1) + 1, eff_w = s.dw * (s.kw - 1) + 1;
  TORCH_CHECK_VALUE(s.H + 2 * s.ph >= eff_h && s.W + 2 * s.pw >= eff_w, "input: spatial size ", s.H, "x", s.W,
                    " with padding ", padding, " is smaller than the dilated kernel ", eff_h, "x", eff_w);
  s.Ho = (s.H + 2 * s.ph - eff_h) / s.sh + 1;
  s.Wo = (s.W + 2 * s.pw - eff_w) / s.sw + 1;

  const int64_t kk = s.kh * s.kw;
  TORCH_CHECK_VALUE(offset.size(1) >= 2 * kk && offset.size(1) % (2 * kk) == 0,
                    "offset: expected 2 * offset_groups * kh * kw channels (a positive multiple of ", 2 * kk,
                    "), got shape ", offset.sizes());
  s.offset_groups = offset.size(1) / (2 * kk);
  TORCH_CHECK_VALUE(s.C % s.offset_groups == 0, "offset: expected offset_groups = ", s.offset_groups,
                    " to divide C_in = ", s.C, ", got shape ", offset.sizes());
  TORCH_CHECK_VALUE(offset.size(0) == s.B && offset.size(2) == s.Ho && offset.size(3) == s.Wo,
                    "offset: expected shape (", s.B, ", ", offset.size(1), ", ", s.Ho, ", ", s.Wo,
                    ") (batch and output size), got ", offset.sizes());
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    check_like_input(m, input, "mask");
    TORCH_CHECK_VALUE(m.dim() == 4 && m.size(0) == s.B && m.size(1) == s.offset_groups * kk && m.size(2) == s.Ho &&
                          m.size(3) == s.Wo,
                      "mask: expected shape (", s.B, ", ", s.offset_groups * kk, ", ", s.Ho, ", ", s.Wo,
                      ") (offset_groups * kh * kw channels), got ", m.sizes());
    s.has_mask = true;
  }
  if (bias.has_value()) {
    check_like_input(*bias, input, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.Cout, "bias: expected shape (", s.Cout,
                      ",) (C_out), got ", bias->sizes());
  }
  if (grad_out != nullptr) {
    check_like_input(*grad_out, input, "grad_out");
    TORCH_CHECK_VALUE(grad_out->dim() == 4 && grad_out->size(0) == s.B && grad_out->size(1) == s.Cout &&
                          grad_out->size(2) == s.Ho && grad_out->size(3) == s.Wo,
                      "grad_out: expected shape (", s.B, ", ", s.Cout, ", ", s.Ho, ", ", s.Wo, "), got ",
                      grad_out->sizes());
  }
  TORCH_CHECK_VALUE(s.H * s.W < (int64_t(1) << 31), "input: expected H * W < 2^31, got shape ", input.sizes());
  return s;
}

}  // namespace tur
