// CPU kernel of tur::task_uncertainty_loss: forward and gradients in two passes over the data (DESIGN.md §2).
//
// Work is split into fixed chunks of CHUNK uncertainty positions. Every partial sum belongs to one chunk and
// chunks are combined in index order, so the result does not depend on the number of threads or on how
// at::parallel_for hands out the chunks: same inputs, same bits, on any thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "tur_loss.h"
#include "tur_loss_math.h"

namespace tur {
namespace {

constexpr int64_t CHUNK = 1024;

template <typename scalar_t, typename acc_t>
struct CpuLoss {
  // Inputs.
  const scalar_t* pred;
  const scalar_t* target;
  const scalar_t* unc;
  int64_t B, G, Q, K;
  double eps, reg_weight;
  // Grouping of the batch by task.
  std::vector<int64_t> counts, offsets, order;
  // Outputs (grad_* are null when no gradient is wanted).
  scalar_t* grad_pred;
  scalar_t* grad_unc;

  int64_t num_chunks() const { return (Q + CHUNK - 1) / CHUNK; }

  // Pass A: U_k(q) for every present task into `task_unc` (K x Q), and per-chunk sums of U_k.
  void task_uncertainty(acc_t* task_unc, std::vector<double>& usum_part) const {
    const acc_t eps_a = static_cast<acc_t>(eps);
    at::parallel_for(0, num_chunks(), 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t q0 = c * CHUNK, len = std::min(CHUNK, Q - q0);
        for (int64_t k = 0; k < K; ++k) {
          if (counts[k] == 0) continue;
          acc_t* U = task_unc + k * Q + q0;
          const scalar_t* first = unc + order[offsets[k]] * Q + q0;
          for (int64_t q = 0; q < len; ++q) U[q] = static_cast<acc_t>(first[q]);
          for (int64_t j = offsets[k] + 1; j < offsets[k + 1]; ++j) {
            const scalar_t* u = unc + order[j] * Q + q0;
            for (int64_t q = 0; q < len; ++q) U[q] += static_cast<acc_t>(u[q]);
          }
          const acc_t inv_n = acc_t(1) / static_cast<acc_t>(counts[k]);
          double s = 0.0;
#pragma omp simd reduction(+ : s)
          for (int64_t q = 0; q < len; ++q) {
            U[q] = U[q] * inv_n + eps_a;
            s += static_cast<double>(U[q]);
          }
          usum_part[c * K + k] = s;
        }
      }
    });
  }

  // Pass B: E_k(q) per chunk, grad_pred on the way, then grad_unc for every sample of the task, and
  // per-chunk sums of E_k / U_k and E_k.
  void errors_and_grads(const acc_t* task_unc, const std::vector<TaskCoeffs<acc_t>>& coeffs,
                        std::vector<double>& wsum_part, std::vector<double>& esum_part) const {
    const bool want_grad = grad_pred != nullptr;
    at::parallel_for(0, num_chunks(), 1, [&](int64_t c0, int64_t c1) {
      acc_t E[CHUNK];
      acc_t R[CHUNK];
      acc_t V[CHUNK];  // 1 / U_k: one division per position, shared by every formula below
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t q0 = c * CHUNK, len = std::min(CHUNK, Q - q0);
        for (int64_t k = 0; k < K; ++k) {
          if (counts[k] == 0) continue;
          const acc_t* U = task_unc + k * Q + q0;
          const TaskCoeffs<acc_t> ck = coeffs[k];
          std::fill(E, E + len, acc_t(0));
          for (int64_t q = 0; q < len; ++q) V[q] = acc_t(1) / U[q];
          if (want_grad) {
            for (int64_t q = 0; q < len; ++q) R[q] = ck.grad_pred_scale * V[q];
          }
          for (int64_t j = offsets[k]; j < offsets[k + 1]; ++j) {
            const int64_t i = order[j];
            for (int64_t g = 0; g < G; ++g) {
              const int64_t base = (i * G + g) * Q + q0;
              const scalar_t* p = pred + base;
              const scalar_t* t = target + base;
              if (want_grad) {
                scalar_t* gp = grad_pred + base;
                for (int64_t q = 0; q < len; ++q) {
                  const acc_t d = static_cast<acc_t>(p[q]) - static_cast<acc_t>(t[q]);
                  E[q] += std::abs(d);
                  gp[q] = static_cast<scalar_t>(sign_of(d) * R[q]);
                }
              } else {
                for (int64_t q = 0; q < len; ++q) {
                  E[q] += std::abs(static_cast<acc_t>(p[q]) - static_cast<acc_t>(t[q]));
                }
              }
            }
          }
          double ws = 0.0, es = 0.0;
#pragma omp simd reduction(+ : ws, es)
          for (int64_t q = 0; q < len; ++q) {
            ws += static_cast<double>(E[q] * V[q]);
            es += static_cast<double>(E[q]);
          }
          wsum_part[c * K + k] = ws;
          esum_part[c * K + k] = es;
          if (!want_grad) continue;
          for (int64_t q = 0; q < len; ++q) R[q] = ck.grad_u_err * E[q] * V[q] * V[q] + ck.grad_u_reg;
          for (int64_t j = offsets[k]; j < offsets[k + 1]; ++j) {
            scalar_t* gu = grad_unc + order[j] * Q + q0;
            for (int64_t q = 0; q < len; ++q) gu[q] = static_cast<scalar_t>(R[q]);
          }
        }
      }
    });
  }

  // Sums of one task's chunk partials, in chunk order.
  double total(const std::vector<double>& part, int64_t k) const {
    double s = 0.0;
    for (int64_t c = 0; c < num_chunks(); ++c) s += part[c * K + k];
    return s;
  }
};

template <typename scalar_t>
void run(const LossProblem& p, LossBuffers& out, bool compute_grad) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  CpuLoss<scalar_t, acc_t> op{};
  op.pred = p.pred.const_data_ptr<scalar_t>();
  op.target = p.target.const_data_ptr<scalar_t>();
  op.unc = p.uncertainty.const_data_ptr<scalar_t>();
  op.B = p.B;
  op.G = p.G;
  op.Q = p.Q;
  op.K = p.K;
  op.eps = p.eps;
  op.reg_weight = p.reg_weight;
  op.grad_pred = compute_grad ? out.grad_pred_work.mutable_data_ptr<scalar_t>() : nullptr;
  op.grad_unc = compute_grad ? out.grad_uncertainty_work.mutable_data_ptr<scalar_t>() : nullptr;
  op.counts.resize(p.K);
  op.offsets.resize(p.K + 1);
  op.order.resize(p.B);
  const int64_t invalid = group_by_task(p.task_ids.const_data_ptr<int64_t>(), p.B, p.K, op.counts.data(),
                                        op.offsets.data(), op.order.data());
  TORCH_CHECK_VALUE(invalid == 0, "task_ids: expected every id in [0, ", p.K, ") (num_tasks = ", p.K, "), got ",
                    invalid, " id(s) outside it");
  const int64_t present = count_present(op.counts.data(), p.K);

  const int64_t nch = op.num_chunks();
  // Uninitialised on purpose: pass A writes every slot of every present task before anything reads it.
  at::Tensor task_unc_buf = at::empty({p.K, p.Q}, p.pred.options().dtype(accumulate_type(p.pred.scalar_type())));
  acc_t* task_unc = task_unc_buf.mutable_data_ptr<acc_t>();
  std::vector<double> usum_part(nch * p.K, 0.0), wsum_part(nch * p.K, 0.0), esum_part(nch * p.K, 0.0);
  op.task_uncertainty(task_unc, usum_part);

  std::vector<double> usum(p.K);
  std::vector<TaskCoeffs<acc_t>> coeffs(p.K);
  for (int64_t k = 0; k < p.K; ++k) {
    usum[k] = op.total(usum_part, k);
    if (op.counts[k] > 0) coeffs[k] = task_coeffs<acc_t>(op.counts[k], present, p.G, p.Q, usum[k], p.reg_weight,
                                                           p.grad_scale_pred, p.grad_scale_unc);
  }
  op.errors_and_grads(task_unc, coeffs, wsum_part, esum_part);

  using out_t = acc_t;
  out_t* loss_k = out.per_task_loss.mutable_data_ptr<out_t>();
  out_t* l1_k = out.per_task_l1.mutable_data_ptr<out_t>();
  out_t* wl1_k = out.per_task_wl1.mutable_data_ptr<out_t>();
  out_t* reg_k = out.per_task_reg.mutable_data_ptr<out_t>();
  int64_t* counts = out.counts.mutable_data_ptr<int64_t>();
  double total = 0.0;
  for (int64_t k = 0; k < p.K; ++k) {
    counts[k] = op.counts[k];
    total += task_outputs<out_t>(op.counts[k], p.G, p.Q, usum[k], op.total(wsum_part, k), op.total(esum_part, k),
                                 p.reg_weight, loss_k + k, l1_k + k, wl1_k + k, reg_k + k);
  }
  *out.loss.mutable_data_ptr<out_t>() = static_cast<out_t>(total / static_cast<double>(present));
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
