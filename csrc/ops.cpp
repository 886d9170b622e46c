// The op schema, in one place. Kernels register per device in cpu/ and cuda/; autograd and the fake (meta)
// kernel are registered from Python (tur_ext/ops.py), which set_python_module points at.
#include <torch/library.h>

TORCH_LIBRARY(tur, m) {
  m.set_python_module("tur_ext.ops");
  m.def(
      "task_uncertainty_loss(Tensor pred, Tensor target, Tensor uncertainty, Tensor task_ids, int num_tasks, "
      "float eps, float reg_weight, bool compute_grad) -> (Tensor loss, Tensor per_task_loss, Tensor per_task_l1, "
      "Tensor per_task_weighted_l1, Tensor per_task_reg, Tensor counts, Tensor grad_pred, Tensor grad_uncertainty)");
}

// Modulated deformable convolution (DCNv2, torchvision/mmcv semantics): groups = C_in / weight.size(1), offset
// groups = offset.size(1) / (2 * kh * kw). The backward op returns grad_mask empty when mask is None.
TORCH_LIBRARY_FRAGMENT(tur, m) {
  m.def(
      "deform_conv2d(Tensor input, Tensor offset, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, Tensor? mask) -> Tensor");
  m.def(
      "deform_conv2d_backward(Tensor grad_out, Tensor input, Tensor offset, Tensor weight, Tensor? mask, "
      "int[2] stride, int[2] padding, int[2] dilation) -> (Tensor grad_input, Tensor grad_offset, "
      "Tensor grad_weight, Tensor grad_bias, Tensor grad_mask)");
}
