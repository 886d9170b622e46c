#include "tur_loss.h"

#include "tur_loss_math.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace tur {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// True when the kernel can read `t` in place as B consecutive samples of `per_sample` elements each, the
// elements of a sample in the same order as those of `like` (so element j of pred and of target match).
bool dense_batch_major(const at::Tensor& t, const at::Tensor& like, int64_t per_sample) {
  return t.is_non_overlapping_and_dense() && t.strides() == like.strides() &&
         (t.size(0) == 1 || t.stride(0) == per_sample);
}

}  // namespace

at::ScalarType accumulate_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

at::ScalarType grad_dtype(at::ScalarType input) { return input == at::kHalf ? at::kFloat : input; }

LossProblem make_problem(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& uncertainty,
                         const at::Tensor& task_ids, int64_t num_tasks, double eps, double reg_weight) {
  TORCH_CHECK_TYPE(is_supported_float(pred.scalar_type()),
                   "pred: expected a float16, bfloat16, float32 or float64 tensor, got dtype ", pred.scalar_type());
  TORCH_CHECK_VALUE(target.scalar_type() == pred.scalar_type(), "target: expected dtype ", pred.scalar_type(),
                    " (the dtype of pred), got dtype ", target.scalar_type());
  TORCH_CHECK_VALUE(uncertainty.scalar_type() == pred.scalar_type(), "uncertainty: expected dtype ",
                    pred.scalar_type(), " (the dtype of pred), got dtype ", uncertainty.scalar_type());
  TORCH_CHECK_VALUE(pred.dim() >= 3, "pred: expected shape (B, C, *spatial) with at least one spatial dim, got ",
                    pred.sizes());
  TORCH_CHECK_VALUE(target.sizes() == pred.sizes(), "target: expected the shape of pred ", pred.sizes(), ", got ",
                    target.sizes());
  TORCH_CHECK_VALUE(uncertainty.dim() == pred.dim(), "uncertainty: expected ", pred.dim(), " dims like pred, got ",
                    uncertainty.sizes());
  const int64_t B = pred.size(0), C = pred.size(1), Cu = uncertainty.size(1);
  TORCH_CHECK_VALUE(B >= 1, "pred: expected a non-empty batch, got shape ", pred.sizes());
  TORCH_CHECK_VALUE(C >= 1, "pred: expected at least one channel, got shape ", pred.sizes());
  TORCH_CHECK_VALUE(pred.numel() > 0, "pred: expected non-empty spatial dims, got shape ", pred.sizes());
  TORCH_CHECK_VALUE(uncertainty.size(0) == B, "uncertainty: expected batch size ", B, ", got shape ",
                    uncertainty.sizes());
  TORCH_CHECK_VALUE(Cu == C || Cu == 1, "uncertainty: expected 1 or ", C, " channels (pred has ", C,
                    "), got shape ", uncertainty.sizes());
  TORCH_CHECK_VALUE(uncertainty.sizes().slice(2) == pred.sizes().slice(2), "uncertainty: expected spatial dims ",
                    pred.sizes().slice(2), " like pred, got shape ", uncertainty.sizes());
  TORCH_CHECK_VALUE(target.device() == pred.device() && uncertainty.device() == pred.device(),
                    "target, uncertainty: expected tensors on the device of pred (", pred.device(), "), got ",
                    target.device(), " and ", uncertainty.device());
  TORCH_CHECK_TYPE(task_ids.scalar_type() == at::kLong || task_ids.scalar_type() == at::kInt,
                   "task_ids: expected an int64 or int32 tensor, got dtype ", task_ids.scalar_type());
  TORCH_CHECK_VALUE(task_ids.dim() == 1 && task_ids.size(0) == B, "task_ids: expected shape (", B,
                    ",) (one id per sample), got ", task_ids.sizes());
  TORCH_CHECK_VALUE(task_ids.device() == pred.device(), "task_ids: expected a tensor on ", pred.device(), ", got ",
                    task_ids.device());
  TORCH_CHECK_VALUE(num_tasks >= 1, "num_tasks: expected >= 1, got ", num_tasks);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, "eps: expected a finite value >= 0, got ", eps);
  TORCH_CHECK_VALUE(std::isfinite(reg_weight), "reg_weight: expected a finite value, got ", reg_weight);

  LossProblem p;
  p.B = B;
  p.K = num_tasks;
  p.eps = eps;
  p.reg_weight = reg_weight;
  p.task_ids = task_ids.to(at::kLong).contiguous();
  const int64_t per_sample = pred.numel() / B;
  if (Cu == C && dense_batch_major(pred, pred, per_sample) && dense_batch_major(target, pred, per_sample) &&
      dense_batch_major(uncertainty, pred, per_sample)) {
    // Elementwise pairing: any common dense order (contiguous, channels_last, ...) works without copies.
    p.pred = pred;
    p.target = target;
    p.uncertainty = uncertainty;
    p.G = 1;
    p.Q = per_sample;
  } else {
    p.pred = pred.contiguous();
    p.target = target.contiguous();
    p.uncertainty = uncertainty.contiguous();
    p.G = C / Cu;
    p.Q = per_sample / p.G;
  }
  return p;
}

LossBuffers make_buffers(const LossProblem& problem, const at::Tensor& pred, const at::Tensor& uncertainty,
                         bool compute_grad) {
  const auto stat_options = pred.options().dtype(accumulate_type(pred.scalar_type()));
  LossBuffers b;
  b.loss = at::empty({}, stat_options);
  b.per_task_loss = at::empty({problem.K}, stat_options);
  b.per_task_l1 = at::empty({problem.K}, stat_options);
  b.per_task_wl1 = at::empty({problem.K}, stat_options);
  b.per_task_reg = at::empty({problem.K}, stat_options);
  b.counts = at::empty({problem.K}, pred.options().dtype(at::kLong));
  if (!compute_grad) {
    b.grad_pred = b.grad_pred_work = at::empty({0}, pred.options());
    b.grad_uncertainty = b.grad_uncertainty_work = at::empty({0}, pred.options());
    return b;
  }
  // Returned gradients follow the inputs' memory format (what empty_like gives, so fake tensors agree).
  const auto grad_options = pred.options().dtype(grad_dtype(pred.scalar_type()));
  b.grad_pred = at::empty_like(pred, grad_options);
  b.grad_uncertainty = at::empty_like(uncertainty, grad_options);
  b.grad_pred_work = b.grad_pred.strides() == problem.pred.strides() ? b.grad_pred
                                                                     : at::empty_like(problem.pred, grad_options);
  b.grad_uncertainty_work = b.grad_uncertainty.strides() == problem.uncertainty.strides()
                                ? b.grad_uncertainty
                                : at::empty_like(problem.uncertainty, grad_options);
  return b;
}

LossResult finish(LossBuffers& b) {
  if (!b.grad_pred_work.is_same(b.grad_pred)) b.grad_pred.copy_(b.grad_pred_work);
  if (!b.grad_uncertainty_work.is_same(b.grad_uncertainty)) b.grad_uncertainty.copy_(b.grad_uncertainty_work);
  return {b.loss, b.per_task_loss, b.per_task_l1, b.per_task_wl1, b.per_task_reg, b.counts, b.grad_pred,
          b.grad_uncertainty};
}

}  // namespace tur
