// CUDA kernels of tur::task_uncertainty_loss (DESIGN.md §2), framework-free: raw pointers and the CUDA
// runtime only, so that this file compiles with nvcc on machines whose torch has no CUDA headers.
//
// Five launches on one stream, no host synchronisation and no float atomics:
//   group     (1 thread)        batch grouped by the tasks present (<= min(K, B)): counts, task list, order
//   pass A    (grid over Q)     U_k(q) = mean of the task's maps + eps, per-block sums of U_k
//   coeffs    (1 warp)          m_k and the per-task gradient constants
//   pass B    (grid over Q)     E_k(q), grad_pred, grad_uncertainty, per-block sums of E_k/U_k and E_k
//   finalize  (1 warp)          K-long outputs and the loss
// Block sums use a fixed reduction tree and are combined in block order, so results are bitwise repeatable
// for a given device (the grid size depends only on the device's SM count).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/acc_cast.cuh"
#include "cuda/launch_error.cuh"
#include "cuda/tur_loss_cuda.h"
#include "tur_loss_math.h"

namespace tur::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;

// Sum over the block, valid in thread 0. Fixed tree: warp shuffles, then the first warp over warp sums.
__device__ __forceinline__ double block_sum(double v, double* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? smem[lane] : 0.0;
  if (warp == 0) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  __syncthreads();  // smem is reused by the next call
  return v;
}

// Scratch, sized by the tasks that can be present (at most min(K, B)), never by K: a valid call with K = 5000
// tasks and a batch of 16 needs 16 task maps. "slot" p in [0, present) is task tasks[p].
struct Workspace {
  int64_t* tasks;     // slots: the present task ids, ascending
  int64_t* offsets;   // slots + 1
  int64_t* order;     // B: samples by slot, then the samples whose id is out of range
  int64_t* meta;      // [0] ids out of range, [1] tasks present
  double* usum;       // slots
  double* loss_k;     // slots
  double* usum_part;  // blocks x slots
  double* wsum_part;  // blocks x slots
  double* esum_part;  // blocks x slots
  void* coeffs;       // slots x TaskCoeffs<acc_t>
  void* task_unc;     // slots x Q acc_t
  int64_t slots;
};

size_t align_up(size_t n) { return (n + 255) & ~size_t(255); }

int64_t max_slots(const LossLaunch& a) { return a.K < a.B ? a.K : a.B; }

int grid_blocks(const LossLaunch& a) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, a.device) != cudaSuccess || sms <= 0) {
    (void)cudaGetLastError();  // handled here: a fallback grid; must not be reported by a later launch check
    sms = 80;
  }
  const int64_t needed = (a.Q + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms) * kBlocksPerSm;
  return static_cast<int>(needed < cap ? (needed > 0 ? needed : 1) : cap);
}

size_t acc_size(DType d) { return d == DType::kFloat64 ? sizeof(double) : sizeof(float); }

// Lays the workspace out; with base == nullptr it only measures.
size_t carve(const LossLaunch& a, int blocks, char* base, Workspace* ws) {
  const size_t S = static_cast<size_t>(max_slots(a)), B = static_cast<size_t>(a.B), Q = static_cast<size_t>(a.Q);
  const size_t acc = acc_size(a.dtype);
  size_t off = 0;
  auto take = [&](size_t bytes) {
    char* p = base ? base + off : nullptr;
    off += align_up(bytes);
    return static_cast<void*>(p);
  };
  Workspace w;
  w.slots = static_cast<int64_t>(S);
  w.tasks = static_cast<int64_t*>(take(S * sizeof(int64_t)));
  w.offsets = static_cast<int64_t*>(take((S + 1) * sizeof(int64_t)));
  w.order = static_cast<int64_t*>(take(B * sizeof(int64_t)));
  w.meta = static_cast<int64_t*>(take(2 * sizeof(int64_t)));
  w.usum = static_cast<double*>(take(S * sizeof(double)));
  w.loss_k = static_cast<double*>(take(S * sizeof(double)));
  w.usum_part = static_cast<double*>(take(blocks * S * sizeof(double)));
  w.wsum_part = static_cast<double*>(take(blocks * S * sizeof(double)));
  w.esum_part = static_cast<double*>(take(blocks * S * sizeof(double)));
  w.coeffs = take(S * 3 * acc);
  w.task_unc = take(S * Q * acc);
  if (ws) *ws = w;
  return off;
}

__global__ void group_kernel(const int64_t* ids, int64_t B, int64_t K, int64_t* counts, Workspace w) {
  w.meta[0] = group_present_tasks(ids, B, K, counts, w.tasks, w.offsets, w.order, &w.meta[1]);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) task_unc_kernel(const scalar_t* __restrict__ unc,
                                                            const int64_t* __restrict__ counts, Workspace w,
                                                            int64_t Q, acc_t eps) {
  __shared__ double smem[kThreads / 32];
  acc_t* U = static_cast<acc_t*>(w.task_unc);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t present = w.meta[1];  // the same for every thread, so every thread reaches each block_sum
  for (int64_t p = 0; p < present; ++p) {
    const int64_t n = counts[w.tasks[p]];
    const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
    const int64_t j0 = w.offsets[p], j1 = w.offsets[p + 1];
    double s = 0.0;
    for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < Q; q += stride) {
      acc_t a = acc_t(0);
      for (int64_t j = j0; j < j1; ++j) a += to_acc(unc[w.order[j] * Q + q]);
      a = a * inv_n + eps;
      U[p * Q + q] = a;
      s += static_cast<double>(a);
    }
    s = block_sum(s, smem);
    if (threadIdx.x == 0) w.usum_part[blockIdx.x * w.slots + p] = s;
  }
}

template <typename acc_t>
__global__ void coeffs_kernel(const int64_t* counts, Workspace w, int blocks, int64_t G, int64_t Q,
                              double reg_weight) {
  TaskCoeffs<acc_t>* coeffs = static_cast<TaskCoeffs<acc_t>*>(w.coeffs);
  const int64_t present = w.meta[1];
  for (int64_t p = threadIdx.x; p < present; p += blockDim.x) {
    double s = 0.0;
    for (int b = 0; b < blocks; ++b) s += w.usum_part[b * w.slots + p];
    w.usum[p] = s;
    coeffs[p] = task_coeffs<acc_t>(counts[w.tasks[p]], present, G, Q, s, reg_weight);
  }
}

// grad_t: the input type, float for __half (see grad_dtype in tur_loss.h).
template <typename scalar_t, typename acc_t, typename grad_t>
__global__ void __launch_bounds__(kThreads) error_grad_kernel(const scalar_t* __restrict__ pred,
                                                              const scalar_t* __restrict__ target, Workspace w,
                                                              int64_t B, int64_t G, int64_t Q,
                                                              grad_t* __restrict__ grad_pred,
                                                              grad_t* __restrict__ grad_unc) {
  __shared__ double smem[kThreads / 32];
  const acc_t* U = static_cast<const acc_t*>(w.task_unc);
  const TaskCoeffs<acc_t>* coeffs = static_cast<const TaskCoeffs<acc_t>*>(w.coeffs);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t q_first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t present = w.meta[1];
  for (int64_t p = 0; p < present; ++p) {
    double ws = 0.0, es = 0.0;
    const TaskCoeffs<acc_t> c = coeffs[p];
    const int64_t j0 = w.offsets[p], j1 = w.offsets[p + 1];
    for (int64_t q = q_first; q < Q; q += stride) {
      const acc_t u = U[p * Q + q];
      const acc_t r = c.grad_pred_scale / u;
      acc_t e = acc_t(0);
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t base = w.order[j] * G * Q + q;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t idx = base + g * Q;
          const acc_t d = to_acc(pred[idx]) - to_acc(target[idx]);
          e += d < acc_t(0) ? -d : d;
          if (grad_pred) grad_pred[idx] = from_acc<grad_t>(sign_of(d) * r);
        }
      }
      ws += static_cast<double>(e / u);
      es += static_cast<double>(e);
      if (grad_unc) {
        const grad_t v = from_acc<grad_t>(c.grad_u_err * e / (u * u) + c.grad_u_reg);
        for (int64_t j = j0; j < j1; ++j) grad_unc[w.order[j] * Q + q] = v;
      }
    }
    ws = block_sum(ws, smem);
    es = block_sum(es, smem);
    if (threadIdx.x == 0) {
      w.wsum_part[blockIdx.x * w.slots + p] = ws;
      w.esum_part[blockIdx.x * w.slots + p] = es;
    }
  }
  // Samples whose id is out of range belong to no task: their gradient rows are NaN (the loss is NaN too), so
  // that no element keeps what the allocator left there when the caller skips the finiteness check.
  if (grad_pred) {
    const grad_t nan_v = from_acc<grad_t>(static_cast<acc_t>(nan("")));
    for (int64_t j = w.offsets[present]; j < B; ++j) {
      for (int64_t q = q_first; q < Q; q += stride) {
        for (int64_t g = 0; g < G; ++g) grad_pred[(w.order[j] * G + g) * Q + q] = nan_v;
        grad_unc[w.order[j] * Q + q] = nan_v;
      }
    }
  }
}

template <typename out_t>
__global__ void finalize_kernel(const int64_t* counts, Workspace w, int blocks, int64_t G, int64_t Q, int64_t K,
                                double reg_weight, out_t* loss, out_t* per_task_loss, out_t* per_task_l1,
                                out_t* per_task_wl1, out_t* per_task_reg) {
  const int64_t present = w.meta[1];
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {  // absent tasks: zeros
    if (counts[k] == 0) task_outputs<out_t>(0, G, Q, 0.0, 0.0, 0.0, reg_weight, per_task_loss + k, per_task_l1 + k,
                                            per_task_wl1 + k, per_task_reg + k);
  }
  for (int64_t p = threadIdx.x; p < present; p += blockDim.x) {
    double ws = 0.0, es = 0.0;
    for (int b = 0; b < blocks; ++b) {
      ws += w.wsum_part[b * w.slots + p];
      es += w.esum_part[b * w.slots + p];
    }
    const int64_t k = w.tasks[p];
    w.loss_k[p] = task_outputs<out_t>(counts[k], G, Q, w.usum[p], ws, es, reg_weight, per_task_loss + k,
                                      per_task_l1 + k, per_task_wl1 + k, per_task_reg + k);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int64_t p = 0; p < present; ++p) total += w.loss_k[p];  // ascending task order, as on the CPU
    // Ids outside [0, K) were left out of every task; report them as a NaN loss rather than a silent value.
    *loss = static_cast<out_t>(w.meta[0] == 0 ? total / static_cast<double>(present) : nan(""));
  }
}

template <typename scalar_t, typename acc_t, typename grad_t = scalar_t>
const char* launch_typed(const LossLaunch& a, cudaStream_t stream) {
  // An error left pending by an earlier runtime call (ours or the caller's) is not this launch's to report.
  (void)cudaGetLastError();
  const int blocks = grid_blocks(a);
  Workspace w;
  carve(a, blocks, static_cast<char*>(a.workspace), &w);
  const auto* pred = static_cast<const scalar_t*>(a.pred);
  const auto* target = static_cast<const scalar_t*>(a.target);
  const auto* unc = static_cast<const scalar_t*>(a.uncertainty);
  auto* gp = static_cast<grad_t*>(a.grad_pred);
  auto* gu = static_cast<grad_t*>(a.grad_uncertainty);
  const char* err = nullptr;
  group_kernel<<<1, 1, 0, stream>>>(a.task_ids, a.B, a.K, a.counts, w);
  if ((err = launch_error("group_kernel"))) return err;
  task_unc_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(unc, a.counts, w, a.Q,
                                                                    static_cast<acc_t>(a.eps));
  if ((err = launch_error("task_unc_kernel"))) return err;
  coeffs_kernel<acc_t><<<1, 32, 0, stream>>>(a.counts, w, blocks, a.G, a.Q, a.reg_weight);
  if ((err = launch_error("coeffs_kernel"))) return err;
  error_grad_kernel<scalar_t, acc_t, grad_t><<<blocks, kThreads, 0, stream>>>(pred, target, w, a.B, a.G, a.Q, gp,
                                                                              gu);
  if ((err = launch_error("error_grad_kernel"))) return err;
  finalize_kernel<acc_t><<<1, 32, 0, stream>>>(
      a.counts, w, blocks, a.G, a.Q, a.K, a.reg_weight, static_cast<acc_t*>(a.loss),
      static_cast<acc_t*>(a.per_task_loss), static_cast<acc_t*>(a.per_task_l1), static_cast<acc_t*>(a.per_task_wl1),
      static_cast<acc_t*>(a.per_task_reg));
  return launch_error("finalize_kernel");
}

}  // namespace

size_t workspace_bytes(const LossLaunch& args) { return carve(args, grid_blocks(args), nullptr, nullptr); }

const char* launch_loss(const LossLaunch& args, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (args.dtype) {
    case DType::kFloat32:
      return launch_typed<float, float>(args, s);
    case DType::kFloat64:
      return launch_typed<double, double>(args, s);
    case DType::kFloat16:
      return launch_typed<__half, float, float>(args, s);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16, float>(args, s);
  }
  return "unsupported dtype";
}

}  // namespace tur::cuda
