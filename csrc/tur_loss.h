// Host-side plumbing of the tur::task_uncertainty_loss op shared by every device: argument checks, the
// G x Q view of the inputs (see tur_loss_math.h), and output allocation. Kernels live in cpu/ and cuda/.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace tur {

// The op's return value: loss, per_task_loss, per_task_l1, per_task_weighted_l1, per_task_reg, counts,
// grad_pred, grad_uncertainty (the two gradients are empty when compute_grad is false).
using LossResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                              at::Tensor, at::Tensor>;

// Inputs as the kernels read them: sample i of pred/target is the G*Q elements at [i*G*Q, (i+1)*G*Q),
// its uncertainty the Q elements at [i*Q, (i+1)*Q).
struct LossProblem {
  at::Tensor pred, target, uncertainty, task_ids;  // in kernel layout; task_ids int64
  int64_t B = 0, G = 0, Q = 0, K = 0;
  double eps = 0.0, reg_weight = 0.0;
};

struct LossBuffers {
  at::Tensor loss, per_task_loss, per_task_l1, per_task_wl1, per_task_reg, counts;
  at::Tensor grad_pred, grad_uncertainty;            // returned: laid out like the op's inputs
  at::Tensor grad_pred_work, grad_uncertainty_work;  // written by the kernel: laid out like LossProblem
};

// Validates the arguments (ValueError/TypeError naming the argument) and picks the kernel layout: the inputs
// as they are when their memory is already in that order (contiguous, or channels_last with Cu == C),
// otherwise contiguous copies.
LossProblem make_problem(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& uncertainty,
                         const at::Tensor& task_ids, int64_t num_tasks, double eps, double reg_weight);

LossBuffers make_buffers(const LossProblem& problem, const at::Tensor& pred, const at::Tensor& uncertainty,
                         bool compute_grad);

// Copies kernel-layout gradients into the returned ones where the two differ, and packs the result.
LossResult finish(LossBuffers& buffers);

// The dtype of the loss and per-task statistics: float64 for float64 inputs, float32 otherwise.
at::ScalarType accumulate_type(at::ScalarType input);

// The dtype the op returns gradients in: the input's, except float32 for float16. Gradients of a per-pixel mean
// are of order 1/(C*P), deep in float16's subnormal range, while small uncertainties (1e-3) make them large, so
// no single power-of-two scale keeps every float16 value both normal and finite; in float32 both fit, and the
// autograd formula rounds grad * grad_output to float16 once (tur_ext/ops).
at::ScalarType grad_dtype(at::ScalarType input);

}  // namespace tur
