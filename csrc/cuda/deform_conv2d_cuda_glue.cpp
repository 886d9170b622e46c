// Torch glue of the DCNv2 CUDA kernels: checks, buffers, the per-image loop, the GEMMs (at::mm, i.e. cuBLAS) and
// the registration for the CUDA key. Compiled only in CUDA builds (setup.py adds csrc/cuda/*.cpp then).
//
// Per image: im2col (kernel) -> out = W_g cols_g per group (cuBLAS). Backward per image: im2col again,
// grad_cols = W_g^T grad_out_g, grad_weight += grad_out_g cols_g^T (cuBLAS), col2im (kernel, atomics: input
// gradient bits depend on the schedule, see deform_conv2d_cuda.cu), offset/mask gradients (kernel, deterministic).
// float16/bfloat16: columns, GEMMs and the input gradient in float32, rounded once.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/deform_conv2d_cuda.h"
#include "cuda/glue_common.h"
#include "deform_conv2d.h"

namespace tur {
namespace {

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

cuda::DcnLaunch make_launch(const DcnShape& s, at::ScalarType dtype) {
  cuda::DcnLaunch a;
  a.dtype = cuda::launch_dtype(dtype, "input");
  a.C = s.C;
  a.H = s.H;
  a.W = s.W;
  a.kh = s.kh;
  a.kw = s.kw;
  a.offset_groups = s.offset_groups;
  a.sh = s.sh;
  a.sw = s.sw;
  a.ph = s.ph;
  a.pw = s.pw;
  a.dh = s.dh;
  a.dw = s.dw;
  a.Ho = s.Ho;
  a.Wo = s.Wo;
  return a;
}

void point_at_image(cuda::DcnLaunch& a, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& mask,
                    int64_t b) {
  a.input = input[b].const_data_ptr();
  a.offset = offset[b].const_data_ptr();
  a.mask = mask.defined() ? mask[b].const_data_ptr() : nullptr;
}

void check_launch(const char* err, const char* what) { cuda::check_launch(err, "tur.deform_conv2d", what); }

at::Tensor deform_conv2d_cuda(const at::Tensor& input_, const at::Tensor& offset_, const at::Tensor& weight_,
                              const c10::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                              c10::IntArrayRef padding, c10::IntArrayRef dilation,
                              const c10::optional<at::Tensor>& mask_) {
  const c10::cuda::CUDAGuard guard(input_.device());
  const DcnShape s = check_deform_conv2d(input_, offset_, weight_, bias, stride, padding, dilation, mask_);
  const at::ScalarType dtype = input_.scalar_type(), acc = acc_type(dtype);
  const at::Tensor input = input_.contiguous(), offset = offset_.contiguous();
  const at::Tensor mask = s.has_mask ? mask_->contiguous() : at::Tensor();
  const int64_t kk = s.kh * s.kw, P = s.Ho * s.Wo, G = s.groups, cg_rows = s.C / G * kk, og = s.Cout / G;
  const at::Tensor w2 = weight_.to(acc).contiguous().view({G, og, cg_rows});
  at::Tensor out = at::empty({s.B, s.Cout, s.Ho, s.Wo}, input.options().dtype(acc));
  at::Tensor cols = at::empty({s.C * kk, P}, input.options().dtype(acc));
  cuda::DcnLaunch a = make_launch(s, dtype);
  void* stream = at::cuda::getCurrentCUDAStream().stream();
  for (int64_t b = 0; b < s.B; ++b) {
    point_at_image(a, input, offset, mask, b);
    check_launch(cuda::launch_dcn_im2col(a, cols.mutable_data_ptr(), stream), "im2col");
    at::Tensor ob = out[b].view({G, og, P});
    for (int64_t g = 0; g < G; ++g) {
      at::Tensor og_out = ob[g];
      at::mm_out(og_out, w2[g], cols.narrow(0, g * cg_rows, cg_rows));
    }
  }
  if (bias.has_value()) out.add_(bias->to(acc).view({1, s.Cout, 1, 1}));
  return acc == dtype ? out : out.to(dtype);
}

DcnGrads deform_conv2d_backward_cuda(const at::Tensor& grad_out_, const at::Tensor& input_,
                                     const at::Tensor& offset_, const at::Tensor& weight_,
                                     const c10::optional<at::Tensor>& mask_, c10::IntArrayRef stride,
                                     c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  const c10::cuda::CUDAGuard guard(input_.device());
  const DcnShape s =
      check_deform_conv2d(input_, offset_, weight_, c10::nullopt, stride, padding, dilation, mask_, &grad_out_);
  const at::ScalarType dtype = input_.scalar_type(), acc = acc_type(dtype);
  const at::Tensor input = input_.contiguous(), offset = offset_.contiguous();
  const at::Tensor mask = s.has_mask ? mask_->contiguous() : at::Tensor();
  const at::Tensor grad_out = grad_out_.to(acc).contiguous();
  const int64_t kk = s.kh * s.kw, P = s.Ho * s.Wo, G = s.groups, cg_rows = s.C / G * kk, og = s.Cout / G;
  const at::Tensor w2 = weight_.to(acc).contiguous().view({G, og, cg_rows});
  const auto acc_opts = input.options().dtype(acc);
  at::Tensor grad_input_acc = at::empty({s.B, s.C, s.H, s.W}, acc_opts);
  at::Tensor grad_offset = at::empty_like(offset);
  at::Tensor grad_mask = s.has_mask ? at::empty_like(mask) : at::empty({0}, input.options());
  at::Tensor grad_weight = at::zeros({G, og, cg_rows}, acc_opts);
  at::Tensor cols = at::empty({s.C * kk, P}, acc_opts);
  at::Tensor grad_cols = at::empty({s.C * kk, P}, acc_opts);
  cuda::DcnLaunch a = make_launch(s, dtype);
  void* stream = at::cuda::getCurrentCUDAStream().stream();
  for (int64_t b = 0; b < s.B; ++b) {
    point_at_image(a, input, offset, mask, b);
    check_launch(cuda::launch_dcn_im2col(a, cols.mutable_data_ptr(), stream), "im2col");
    const at::Tensor gb = grad_out[b].view({G, og, P});
    for (int64_t g = 0; g < G; ++g) {
      at::Tensor gc = grad_cols.narrow(0, g * cg_rows, cg_rows);
      at::mm_out(gc, w2[g].t(), gb[g]);
      grad_weight[g].addmm_(gb[g], cols.narrow(0, g * cg_rows, cg_rows).t());
    }
    check_launch(cuda::launch_dcn_col2im(a, grad_cols.const_data_ptr(), grad_input_acc[b].mutable_data_ptr(), stream),
                 "col2im");
    check_launch(cuda::launch_dcn_offset_mask_grad(a, grad_cols.const_data_ptr(), grad_offset[b].mutable_data_ptr(),
                                                   s.has_mask ? grad_mask[b].mutable_data_ptr() : nullptr, stream),
                 "offset/mask gradient");
  }
  at::Tensor grad_bias = grad_out.sum({0, 2, 3});
  auto cast = [&](const at::Tensor& t) { return t.scalar_type() == dtype ? t : t.to(dtype); };
  return {cast(grad_input_acc), grad_offset, cast(grad_weight.view({s.Cout, s.C / G, s.kh, s.kw})), cast(grad_bias),
          grad_mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(tur, CUDA, m) {
  m.impl("deform_conv2d", &deform_conv2d_cuda);
  m.impl("deform_conv2d_backward", &deform_conv2d_backward_cuda);
}

}  // namespace tur
