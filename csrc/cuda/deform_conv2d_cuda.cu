// CUDA kernels of tur::deform_conv2d (DCNv2), framework-free: raw pointers and the CUDA runtime only (see
// deform_conv2d_cuda.h). The GEMMs are cuBLAS through at::mm in the glue: a hand-written tiled GEMM here would be
// several times slower than cuBLAS on the C_out x (C_in*K) x P products, which are most of the op's flops, and
// would add nothing the emulator tests need (the GEMMs are ATen's on every device).
//
// Input gradient: atomics. The transpose of bilinear sampling sends each column element to 4 input pixels chosen
// by the learned offsets, so which taps reach a pixel is data-dependent and unbounded. A gather formulation
// (each thread owns an input pixel and sums its taps in a fixed order) needs the inverse map: a per-image sort
// of all C*K*P*4 (tap, corner) pairs by pixel, a stable one to fix the order, every backward. That costs more
// than the whole rest of the op, so, like torchvision and mmcv, col2im scatters with atomicAdd into an acc
// (float32 / float64) buffer: the input gradient's bits depend on the atomic order on a GPU (run-to-run
// differences of a few ulps of float32). Everything else is deterministic: the offset/mask gradients are a
// gather (one thread per (offset group, tap, position), the channel sum sequential), and the GEMMs and the bias
// reduction are ATen's. On CPU the op is bitwise deterministic (csrc/cpu/deform_conv2d_cpu.cpp).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/deform_conv2d_cuda.h"
#include "cuda/acc_cast.cuh"
#include "cuda/launch_error.cuh"

namespace tur::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535 * 8;  // grid-stride loops above this

__device__ __forceinline__ float floor_acc(float x) { return floorf(x); }
__device__ __forceinline__ double floor_acc(double x) { return floor(x); }

// Where tap k of offset group g samples at output position p: the corner indices into a channel plane and their
// bilinear weights (0 outside the image, all 0 when the tap is out of range), plus the mask and fractions.
template <typename acc_t>
struct Tap {
  int64_t idx[4];
  acc_t cw[4];
  acc_t lh, lw, m;
  unsigned valid;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ Tap<acc_t> make_tap(const DcnLaunch& a, const scalar_t* offset, const scalar_t* mask,
                                               int64_t g, int64_t k, int64_t p) {
  const int64_t kk = a.kh * a.kw, P = a.Ho * a.Wo;
  const int64_t ho = p / a.Wo, wo = p % a.Wo, i = k / a.kw, j = k % a.kw;
  const acc_t dy = to_acc(offset[((g * kk + k) * 2) * P + p]);
  const acc_t dx = to_acc(offset[((g * kk + k) * 2 + 1) * P + p]);
  const acc_t h = static_cast<acc_t>(ho * a.sh - a.ph + i * a.dh) + dy;
  const acc_t w = static_cast<acc_t>(wo * a.sw - a.pw + j * a.dw) + dx;
  Tap<acc_t> t;
  t.m = mask != nullptr ? to_acc(mask[(g * kk + k) * P + p]) : acc_t(1);
  t.valid = 0;
  t.lh = t.lw = acc_t(0);
  for (int q = 0; q < 4; ++q) {
    t.idx[q] = 0;
    t.cw[q] = acc_t(0);
  }
  if (!(h > acc_t(-1) && h < static_cast<acc_t>(a.H) && w > acc_t(-1) && w < static_cast<acc_t>(a.W))) return t;
  const acc_t h0 = floor_acc(h), w0 = floor_acc(w);
  const int64_t y0 = static_cast<int64_t>(h0), x0 = static_cast<int64_t>(w0);
  const acc_t lh = h - h0, lw = w - w0, hh = acc_t(1) - lh, hw = acc_t(1) - lw;
  t.lh = lh;
  t.lw = lw;
  const acc_t wts[4] = {hh * hw, hh * lw, lh * hw, lh * lw};
  for (int q = 0; q < 4; ++q) {
    const int64_t y = y0 + (q >> 1), x = x0 + (q & 1);
    if (y >= 0 && y < a.H && x >= 0 && x < a.W) {
      t.valid |= 1u << q;
      t.idx[q] = y * a.W + x;
      t.cw[q] = wts[q];
    }
  }
  return t;
}

int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 1 ? 1 : (b > kMaxBlocks ? kMaxBlocks : b));
}

// One thread per column element (c, k, p).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) im2col_kernel(DcnLaunch a, acc_t* __restrict__ cols) {
  const auto* input = static_cast<const scalar_t*>(a.input);
  const auto* offset = static_cast<const scalar_t*>(a.offset);
  const auto* mask = static_cast<const scalar_t*>(a.mask);
  const int64_t kk = a.kh * a.kw, P = a.Ho * a.Wo, n = a.C * kk * P, cpg = a.C / a.offset_groups;
  const int64_t HW = a.H * a.W;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = e % P, ck = e / P, k = ck % kk, c = ck / kk;
    const Tap<acc_t> t = make_tap<scalar_t, acc_t>(a, offset, mask, c / cpg, k, p);
    const scalar_t* plane = input + c * HW;
    acc_t v = acc_t(0);
    for (int q = 0; q < 4; ++q) {
      if ((t.valid >> q) & 1u) v += t.cw[q] * to_acc(plane[t.idx[q]]);
    }
    cols[e] = t.m * v;
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) fill_zero_kernel(acc_t* __restrict__ out, int64_t n) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[e] = acc_t(0);
  }
}

// One thread per column element, scattering into the 4 corners it was sampled from (atomics: see the top).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) col2im_kernel(DcnLaunch a, const acc_t* __restrict__ grad_cols,
                                                          acc_t* __restrict__ grad_input) {
  const auto* offset = static_cast<const scalar_t*>(a.offset);
  const auto* mask = static_cast<const scalar_t*>(a.mask);
  const int64_t kk = a.kh * a.kw, P = a.Ho * a.Wo, n = a.C * kk * P, cpg = a.C / a.offset_groups;
  const int64_t HW = a.H * a.W;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = e % P, ck = e / P, k = ck % kk, c = ck / kk;
    const Tap<acc_t> t = make_tap<scalar_t, acc_t>(a, offset, mask, c / cpg, k, p);
    if (t.valid == 0) continue;
    const acc_t gm = grad_cols[e] * t.m;
    acc_t* plane = grad_input + c * HW;
    for (int q = 0; q < 4; ++q) {
      if ((t.valid >> q) & 1u) atomicAdd(plane + t.idx[q], t.cw[q] * gm);
    }
  }
}

// One thread per (offset group, tap, position): s_q = sum over the group's channels of grad_col * v_q, then
//   d/dy = m (hw (s2 - s0) + lw (s3 - s1)),  d/dx = m (hh (s1 - s0) + lh (s3 - s2)),  d/dm = bilinear(s).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) offset_mask_grad_kernel(DcnLaunch a, const acc_t* __restrict__ grad_cols,
                                                                    scalar_t* __restrict__ grad_offset,
                                                                    scalar_t* __restrict__ grad_mask) {
  const auto* input = static_cast<const scalar_t*>(a.input);
  const auto* offset = static_cast<const scalar_t*>(a.offset);
  const auto* mask = static_cast<const scalar_t*>(a.mask);
  const int64_t kk = a.kh * a.kw, P = a.Ho * a.Wo, n = a.offset_groups * kk * P, cpg = a.C / a.offset_groups;
  const int64_t HW = a.H * a.W;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = e % P, gk = e / P, k = gk % kk, g = gk / kk;
    const Tap<acc_t> t = make_tap<scalar_t, acc_t>(a, offset, mask, g, k, p);
    acc_t s[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    if (t.valid != 0) {
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
        const scalar_t* plane = input + c * HW;
        const acc_t gv = grad_cols[(c * kk + k) * P + p];
        for (int q = 0; q < 4; ++q) {
          if ((t.valid >> q) & 1u) s[q] += gv * to_acc(plane[t.idx[q]]);
        }
      }
    }
    const acc_t lh = t.lh, lw = t.lw, hh = acc_t(1) - lh, hw = acc_t(1) - lw;
    grad_offset[(gk * 2) * P + p] = from_acc<scalar_t>(t.m * (hw * (s[2] - s[0]) + lw * (s[3] - s[1])));
    grad_offset[(gk * 2 + 1) * P + p] = from_acc<scalar_t>(t.m * (hh * (s[1] - s[0]) + lh * (s[3] - s[2])));
    if (grad_mask != nullptr) {
      grad_mask[gk * P + p] = from_acc<scalar_t>(hh * hw * s[0] + hh * lw * s[1] + lh * hw * s[2] + lh * lw * s[3]);
    }
  }
}

template <typename scalar_t, typename acc_t>
const char* im2col_typed(const DcnLaunch& a, void* cols, cudaStream_t s) {
  const int64_t n = a.C * a.kh * a.kw * a.Ho * a.Wo;
  im2col_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, s>>>(a, static_cast<acc_t*>(cols));
  return launch_error("im2col_kernel");
}

template <typename scalar_t, typename acc_t>
const char* col2im_typed(const DcnLaunch& a, const void* grad_cols, void* grad_input, cudaStream_t s) {
  const int64_t n = a.C * a.kh * a.kw * a.Ho * a.Wo, HW = a.C * a.H * a.W;
  fill_zero_kernel<acc_t><<<blocks_for(HW), kThreads, 0, s>>>(static_cast<acc_t*>(grad_input), HW);
  if (const char* err = launch_error("fill_zero_kernel")) return err;
  col2im_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, s>>>(a, static_cast<const acc_t*>(grad_cols),
                                                                    static_cast<acc_t*>(grad_input));
  return launch_error("col2im_kernel");
}

template <typename scalar_t, typename acc_t>
const char* offset_mask_grad_typed(const DcnLaunch& a, const void* grad_cols, void* grad_offset, void* grad_mask,
                                   cudaStream_t s) {
  const int64_t n = a.offset_groups * a.kh * a.kw * a.Ho * a.Wo;
  offset_mask_grad_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, s>>>(
      a, static_cast<const acc_t*>(grad_cols), static_cast<scalar_t*>(grad_offset), static_cast<scalar_t*>(grad_mask));
  return launch_error("offset_mask_grad_kernel");
}

}  // namespace

// TUR_DCN_DISPATCH(d, fn, args...) returns fn<scalar_t, acc_t>(args...) for the dtype `d`.
#define TUR_DCN_DISPATCH(d, fn, ...)                                  \
  switch (d) {                                                        \
    case DType::kFloat32:                                             \
      return fn<float, float>(__VA_ARGS__);                           \
    case DType::kFloat64:                                             \
      return fn<double, double>(__VA_ARGS__);                         \
    case DType::kFloat16:                                             \
      return fn<__half, float>(__VA_ARGS__);                          \
    case DType::kBFloat16:                                            \
      return fn<__nv_bfloat16, float>(__VA_ARGS__);                   \
  }                                                                   \
  return "unsupported dtype"

const char* launch_dcn_im2col(const DcnLaunch& a, void* cols, void* stream) {
  TUR_DCN_DISPATCH(a.dtype, im2col_typed, a, cols, static_cast<cudaStream_t>(stream));
}

const char* launch_dcn_col2im(const DcnLaunch& a, const void* grad_cols, void* grad_input, void* stream) {
  TUR_DCN_DISPATCH(a.dtype, col2im_typed, a, grad_cols, grad_input, static_cast<cudaStream_t>(stream));
}

const char* launch_dcn_offset_mask_grad(const DcnLaunch& a, const void* grad_cols, void* grad_offset,
                                        void* grad_mask, void* stream) {
  TUR_DCN_DISPATCH(a.dtype, offset_mask_grad_typed, a, grad_cols, grad_offset, grad_mask,
                   static_cast<cudaStream_t>(stream));
}

#undef TUR_DCN_DISPATCH

}  // namespace tur::cuda
