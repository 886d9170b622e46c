// Torch glue of the CUDA kernels: tensors, device guard, current stream, registration for the CUDA key.
// Compiled only in CUDA builds (setup.py adds csrc/cuda/*.cpp when it builds CUDA).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/glue_common.h"
#include "cuda/tur_loss_cuda.h"
#include "tur_loss.h"

namespace tur {
namespace {

LossResult task_uncertainty_loss_cuda(const at::Tensor& pred, const at::Tensor& target,
                                      const at::Tensor& uncertainty, const at::Tensor& task_ids, int64_t num_tasks,
                                      double eps, double reg_weight, bool compute_grad) {
  const c10::cuda::CUDAGuard guard(pred.device());
  LossProblem p = make_problem(pred, target, uncertainty, task_ids, num_tasks, eps, reg_weight);
  LossBuffers out = make_buffers(p, pred, uncertainty, compute_grad);

  cuda::LossLaunch a;
  a.dtype = cuda::launch_dtype(p.pred.scalar_type(), "pred");
  a.pred = p.pred.const_data_ptr();
  a.target = p.target.const_data_ptr();
  a.uncertainty = p.uncertainty.const_data_ptr();
  a.task_ids = p.task_ids.const_data_ptr<int64_t>();
  a.B = p.B;
  a.G = p.G;
  a.Q = p.Q;
  a.K = p.K;
  a.eps = p.eps;
  a.reg_weight = p.reg_weight;
  a.grad_pred = compute_grad ? out.grad_pred_work.mutable_data_ptr() : nullptr;
  a.grad_uncertainty = compute_grad ? out.grad_uncertainty_work.mutable_data_ptr() : nullptr;
  a.loss = out.loss.mutable_data_ptr();
  a.per_task_loss = out.per_task_loss.mutable_data_ptr();
  a.per_task_l1 = out.per_task_l1.mutable_data_ptr();
  a.per_task_wl1 = out.per_task_wl1.mutable_data_ptr();
  a.per_task_reg = out.per_task_reg.mutable_data_ptr();
  a.counts = out.counts.mutable_data_ptr<int64_t>();
  a.device = pred.get_device();
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(cuda::workspace_bytes(a))}, pred.options().dtype(at::kByte));
  a.workspace = workspace.mutable_data_ptr();
  const char* err = cuda::launch_loss(a, at::cuda::getCurrentCUDAStream().stream());
  cuda::check_launch(err, "tur.task_uncertainty_loss", "the loss kernels");
  return finish(out);
}

}  // namespace

TORCH_LIBRARY_IMPL(tur, CUDA, m) { m.impl("task_uncertainty_loss", &task_uncertainty_loss_cuda); }

}  // namespace tur
