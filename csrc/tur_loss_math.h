// Formulas of the TUR loss (DESIGN.md §1) shared by the CPU and CUDA kernels. Framework-free on purpose:
// nvcc compiles this header without torch (see csrc/cuda/), and both devices must agree to the bit on the
// small per-task arithmetic.
//
// Both kernels see a sample as G x Q elements of pred/target and Q elements of uncertainty:
//   Cu == C : G = 1, Q = C * P   (one uncertainty value per element)
//   Cu == 1 : G = C, Q = P       (one uncertainty value shared by the C channels of a pixel)
// With that view the contract's normalisers are n_k * G * Q (= n_k * C * P) for the L1 terms and Q (= Cu * P)
// for the mean uncertainty, so one kernel covers both cases.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TUR_HD __host__ __device__ __forceinline__
#else
#define TUR_HD inline
#endif

namespace tur {

// Per-task constants of the gradient formulas, fixed once the task's mean uncertainty m_k is known:
//   dL/dp      = sign(p - t) * grad_pred_scale / U_k
//   dL/du      = grad_u_err * E_k / U_k^2 + grad_u_reg
template <typename acc_t>
struct TaskCoeffs {
  acc_t grad_pred_scale;  // 1 / (M n_k G Q)
  acc_t grad_u_err;       // -1 / (M n_k * n_k G Q)
  acc_t grad_u_reg;       // lambda / (M n_k Q m_k)
};

// Groups the batch by task: counts[k], offsets[k..k+1) into order[] (sample indices, stable by index).
// Returns how many ids fall outside [0, K); those samples are left out of every group.
// O(K * B) on purpose: K and B are small and this needs no scratch memory (it also runs as one CUDA thread).
TUR_HD int64_t group_by_task(const int64_t* ids, int64_t B, int64_t K, int64_t* counts, int64_t* offsets,
                             int64_t* order) {
  int64_t invalid = 0;
  int64_t pos = 0;
  for (int64_t k = 0; k < K; ++k) {
    offsets[k] = pos;
    for (int64_t i = 0; i < B; ++i) {
      if (ids[i] == k) order[pos++] = i;
    }
    counts[k] = pos - offsets[k];
  }
  offsets[K] = pos;
  invalid = B - pos;
  return invalid;
}

// Groups the batch by the tasks present, compactly (the CUDA kernels size their scratch by this, not by K):
// counts[k] for every k < K; tasks[0..present) the present task ids, ascending; offsets[p..p+1) the range of
// task tasks[p]'s samples in order[] (stable by index), and order[offsets[present] .. B) the samples whose id is
// outside [0, K), which belong to no task. tasks and offsets need min(K, B) (+ 1) entries. Returns the number
// of those out-of-range ids; *present gets the number of tasks present. O(K + B^2): one CUDA thread runs it.
TUR_HD int64_t group_present_tasks(const int64_t* ids, int64_t B, int64_t K, int64_t* counts, int64_t* tasks,
                                   int64_t* offsets, int64_t* order, int64_t* present) {
  for (int64_t k = 0; k < K; ++k) counts[k] = 0;
  int64_t m = 0;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t id = ids[i];
    if (id < 0 || id >= K) continue;
    if (counts[id]++ > 0) continue;
    int64_t p = m++;  // insertion into the ascending list of tasks seen so far
    for (; p > 0 && tasks[p - 1] > id; --p) tasks[p] = tasks[p - 1];
    tasks[p] = id;
  }
  int64_t pos = 0;
  for (int64_t p = 0; p < m; ++p) {
    offsets[p] = pos;
    for (int64_t i = 0; i < B; ++i) {
      if (ids[i] == tasks[p]) order[pos++] = i;
    }
  }
  offsets[m] = pos;
  const int64_t valid = pos;
  for (int64_t i = 0; i < B; ++i) {
    if (ids[i] < 0 || ids[i] >= K) order[pos++] = i;
  }
  *present = m;
  return B - valid;
}

TUR_HD int64_t count_present(const int64_t* counts, int64_t K) {
  int64_t m = 0;
  for (int64_t k = 0; k < K; ++k) m += counts[k] > 0 ? 1 : 0;
  return m;
}

// usum_k is sum over positions of U_k (eps included).
template <typename acc_t>
TUR_HD TaskCoeffs<acc_t> task_coeffs(int64_t n_k, int64_t present, int64_t G, int64_t Q, double usum_k,
                                     double reg_weight) {
  const double n = static_cast<double>(n_k);
  const double m = static_cast<double>(present);
  const double gq = static_cast<double>(G) * static_cast<double>(Q);
  const double mean_u = usum_k / static_cast<double>(Q);
  TaskCoeffs<acc_t> c;
  c.grad_pred_scale = static_cast<acc_t>(1.0 / (m * n * gq));
  c.grad_u_err = static_cast<acc_t>(-1.0 / (m * n * n * gq));
  c.grad_u_reg = static_cast<acc_t>(reg_weight / (m * n * static_cast<double>(Q) * mean_u));
  return c;
}

template <typename acc_t>
TUR_HD acc_t sign_of(acc_t d) {
  return static_cast<acc_t>((d > acc_t(0)) - (d < acc_t(0)));
}

// The K-long outputs of one task from its three sums (usum = sum U_k, wsum = sum E_k / U_k, esum = sum E_k, all
// over the Q positions). Returns loss_k in double so that the batch mean is taken before rounding to out_t.
template <typename out_t>
TUR_HD double task_outputs(int64_t n_k, int64_t G, int64_t Q, double usum, double wsum, double esum,
                         double reg_weight, out_t* loss_k, out_t* l1_k, out_t* wl1_k, out_t* reg_k) {
  if (n_k == 0) {
    *loss_k = *l1_k = *wl1_k = *reg_k = out_t(0);
    return 0.0;
  }
  const double norm = static_cast<double>(n_k) * static_cast<double>(G) * static_cast<double>(Q);
  const double wl1 = wsum / norm;
  const double reg = reg_weight * log(usum / static_cast<double>(Q));
  *wl1_k = static_cast<out_t>(wl1);
  *l1_k = static_cast<out_t>(esum / norm);
  *reg_k = static_cast<out_t>(reg);
  *loss_k = static_cast<out_t>(wl1 + reg);
  return wl1 + reg;
}

}  // namespace tur
