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
