// CPU kernel of tur::task_uncertainty_loss: forward and gradients in two passes over the data (DESIGN.md §2).
// Pass A reads `uncertainty` for the per-task sums of U_k; pass B reads it again with pred and target, rebuilding
// U_k chunk by chunk in L1, and writes both gradients. That is Nu element reads above DESIGN §2's floor where
// its plan writes and re-reads the K task maps instead: measured, the maps' round trip through memory (write
// misses included) cost more than the second read, and no K x Q scratch is allocated.
// The loops over one chunk of positions are in tur_loss_cpu_chunk.inc, compiled per SIMD level; this file
// spreads the chunks over threads and turns the per-chunk sums into the outputs.
//
// Every partial sum belongs to one chunk and chunks are combined in index order, so the result does not
// depend on the number of threads, on how at::parallel_for hands out the chunks, or on the SIMD level.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "cpu/tur_loss_cpu_kernels.h"
#include "tur_loss.h"
#include "tur_loss_math.h"

namespace tur {
namespace {

using cpu::CHUNK;

// Sum of one task's chunk partials (part is num_chunks x K), in chunk order.
double total(const std::vector<double>& part, int64_t num_chunks, int64_t K, int64_t k) {
  double s = 0.0;
  for (int64_t c = 0; c < num_chunks; ++c) s += part[c * K + k];
  return s;
}

template <typename scalar_t>
void run(const LossProblem& p, LossBuffers& out, bool compute_grad) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  std::vector<int64_t> counts(p.K), offsets(p.K + 1), order(p.B);
  const int64_t invalid = group_by_task(p.task_ids.const_data_ptr<int64_t>(), p.B, p.K, counts.data(),
                                        offsets.data(), order.data());
  TORCH_CHECK_VALUE(invalid == 0, "task_ids: expected every id in [0, ", p.K, ") (num_tasks = ", p.K, "), got ",
                    invalid, " id(s) outside it");
  const int64_t present = count_present(counts.data(), p.K);

  cpu::ChunkProblem<scalar_t, acc_t> cp{};
  cp.pred = p.pred.const_data_ptr<scalar_t>();
  cp.target = p.target.const_data_ptr<scalar_t>();
  cp.unc = p.uncertainty.const_data_ptr<scalar_t>();
  cp.G = p.G;
  cp.Q = p.Q;
  cp.K = p.K;
  cp.eps = static_cast<acc_t>(p.eps);
  cp.counts = counts.data();
  cp.offsets = offsets.data();
  cp.order = order.data();
  cp.grad_pred = compute_grad ? out.grad_pred_work.mutable_data_ptr<cpu::grad_t<scalar_t>>() : nullptr;
  cp.grad_unc = compute_grad ? out.grad_uncertainty_work.mutable_data_ptr<cpu::grad_t<scalar_t>>() : nullptr;
  const cpu::ChunkKernels<scalar_t, acc_t> kernels = cpu::chunk_kernels<scalar_t, acc_t>(cpu::active_capability());

  const int64_t nch = (p.Q + CHUNK - 1) / CHUNK;
  std::vector<double> usum_part(nch * p.K, 0.0), wsum_part(nch * p.K, 0.0), esum_part(nch * p.K, 0.0);
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) kernels.task_uncertainty(cp, c, usum_part.data() + c * p.K);
  });

  std::vector<double> usum(p.K);
  std::vector<TaskCoeffs<acc_t>> coeffs(p.K);
  for (int64_t k = 0; k < p.K; ++k) {
    usum[k] = total(usum_part, nch, p.K, k);
    if (counts[k] > 0) coeffs[k] = task_coeffs<acc_t>(counts[k], present, p.G, p.Q, usum[k], p.reg_weight);
  }
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      kernels.errors_and_grads(cp, c, coeffs.data(), wsum_part.data() + c * p.K, esum_part.data() + c * p.K);
    }
  });

  acc_t* loss_k = out.per_task_loss.mutable_data_ptr<acc_t>();
  acc_t* l1_k = out.per_task_l1.mutable_data_ptr<acc_t>();
  acc_t* wl1_k = out.per_task_wl1.mutable_data_ptr<acc_t>();
  acc_t* reg_k = out.per_task_reg.mutable_data_ptr<acc_t>();
  int64_t* counts_out = out.counts.mutable_data_ptr<int64_t>();
  double sum = 0.0;
  for (int64_t k = 0; k < p.K; ++k) {
    counts_out[k] = counts[k];
    sum += task_outputs<acc_t>(counts[k], p.G, p.Q, usum[k], total(wsum_part, nch, p.K, k),
                               total(esum_part, nch, p.K, k), p.reg_weight, loss_k + k, l1_k + k, wl1_k + k,
                               reg_k + k);
  }
  *out.loss.mutable_data_ptr<acc_t>() = static_cast<acc_t>(sum / static_cast<double>(present));
}

LossResult task_uncertainty_loss_cpu(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& uncertainty,
                                     const at::Tensor& task_ids, int64_t num_tasks, double eps, double reg_weight,
                                     bool compute_grad) {
  LossProblem problem = make_problem(pred, target, uncertainty, task_ids, num_tasks, eps, reg_weight);
  LossBuffers buffers = make_buffers(problem, pred, uncertainty, compute_grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, problem.pred.scalar_type(), "task_uncertainty_loss_cpu",
                                  [&] { run<scalar_t>(problem, buffers, compute_grad); });
  return finish(buffers);
}

}  // namespace

TORCH_LIBRARY_IMPL(tur, CPU, m) { m.impl("task_uncertainty_loss", &task_uncertainty_loss_cpu); }

}  // namespace tur
