// The per-chunk loops of the CPU kernel of tur::task_uncertainty_loss, compiled once per SIMD level (see
// tur_loss_cpu_kernels.cpp) and picked at run time; the op around them (threads, per-task totals, outputs) is
// csrc/cpu/tur_loss_cpu.cpp. Framework-free on purpose: the SIMD variants must not compile ATen's inline code
// with wider instructions than the rest of the library.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tur_loss_math.h"

namespace c10 {
struct Half;
}

namespace tur::cpu {

// The type gradients are stored in: the input dtype, except float32 for float16 (see grad_dtype in tur_loss.h).
template <typename scalar_t>
struct GradStorage {
  using type = scalar_t;
};
template <>
struct GradStorage<c10::Half> {
  using type = float;
};
template <typename scalar_t>
using grad_t = typename GradStorage<scalar_t>::type;

// Uncertainty positions per unit of work. Every partial sum belongs to one chunk and chunks are combined in
// index order, so results do not depend on the thread count.
constexpr int64_t CHUNK = 1024;

// One call's data in kernel layout (see LossProblem): G x Q elements of pred/target and Q of uncertainty per
// sample, and the batch grouped by task (members of task k: order[offsets[k] .. offsets[k + 1])).
template <typename scalar_t, typename acc_t>
struct ChunkProblem {
  const scalar_t* pred;
  const scalar_t* target;
  const scalar_t* unc;
  int64_t G, Q, K;
  acc_t eps;
  const int64_t* counts;
  const int64_t* offsets;
  const int64_t* order;
  grad_t<scalar_t>* grad_pred;  // null when no gradient is wanted
  grad_t<scalar_t>* grad_unc;   // null when no gradient is wanted
};

template <typename scalar_t, typename acc_t>
struct ChunkKernels {
  // Pass A over chunk c: usum[k] = sum over the chunk of U_k, for every present task.
  void (*task_uncertainty)(const ChunkProblem<scalar_t, acc_t>& p, int64_t c, double* usum);
  // Pass B over chunk c: E_k and grad_pred, then grad_unc of every member of the task;
  // wsum[k] = sum over the chunk of E_k / U_k, esum[k] = sum of E_k.
  void (*errors_and_grads)(const ChunkProblem<scalar_t, acc_t>& p, int64_t c, const TaskCoeffs<acc_t>* coeffs,
                           double* wsum, double* esum);
};

// SIMD levels the kernels are compiled for, lowest first. Every level gives the same bits: sums go through a
// fixed number of lanes (see tur_loss_cpu_chunk.inc) and floating-point contraction is off.
enum class Capability : int { Default = 0, AVX2 = 1, AVX512 = 2 };

const char* capability_name(Capability c);

// The levels compiled into this library that this CPU can run, lowest first.
std::vector<Capability> supported_capabilities();

// The level the op uses: the best supported one, or TUR_CPU_CAPABILITY (default|avx2|avx512) when set,
// lowered to the best supported level when the CPU lacks the one asked for.
Capability active_capability();

// Switches the level for this process (tests and benchmarks compare levels). Throws ValueError when `name` is
// unknown or not supported here; returns the previous level's name.
std::string set_active_capability(const std::string& name);

template <typename scalar_t, typename acc_t>
ChunkKernels<scalar_t, acc_t> chunk_kernels(Capability c);

}  // namespace tur::cpu
