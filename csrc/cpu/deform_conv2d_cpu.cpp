// CPU kernel of tur::deform_conv2d and its backward: per image, a table of the bilinear taps, im2col through it,
// then ATen GEMMs per group (at::mm, the BLAS ATen was built with).
//
// Work per image (C_in channels, K = kh*kw taps, P = H_out*W_out positions): the column buffer is C_in*K x P; the
// forward GEMM is 2*C_out*(C_in/groups)*K*P flops, the backward two more of the same size (grad columns =
// W^T grad_out, grad weight = grad_out columns^T). The sampling is 4 gathers + 4 multiply-adds per column element.
//
// Determinism: every output element is written by exactly one task, and sums run in a fixed order that does not
// depend on the thread count: the input gradient is parallel over input channels (a task owns its channel's
// plane and scatters into it in tap order), the offset/mask gradients over (offset group, tap, chunk of
// positions) with the channel sum sequential, the bias gradient over output channels, and the weight gradient is
// accumulated image after image. The GEMMs are ATen's (the tests check 1 vs 2 threads give the same bits).
// float16/bfloat16 run in float32 (inputs converted once, results rounded once at the end).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "deform_conv2d.h"

namespace tur {
namespace {

// Where tap k of offset group g samples at output position (ho, wo): the 4 corner indices into a channel plane
// and their bilinear weights (0, index 0, for a corner outside the image; all 0 for a tap out of range), plus what
// the offset gradient needs: the fractional parts, the mask and which corners exist.
template <typename T>
struct TapInfo {
  int32_t idx[4];
  T cw[4];
  T lh, lw, m;
  unsigned valid;  // bit q: corner q inside the image (and the tap in range)
};

template <typename T>
inline TapInfo<T> tap_info(const DcnShape& s, const T* offset, const T* mask, int64_t g, int64_t k, int64_t ho,
                           int64_t wo) {
  const int64_t kk = s.kh * s.kw, P = s.Ho * s.Wo, p = ho * s.Wo + wo, i = k / s.kw, j = k % s.kw;
  const T h = static_cast<T>(ho * s.sh - s.ph + i * s.dh) + offset[((g * kk + k) * 2) * P + p];
  const T w = static_cast<T>(wo * s.sw - s.pw + j * s.dw) + offset[((g * kk + k) * 2 + 1) * P + p];
  TapInfo<T> t;
  t.m = mask != nullptr ? mask[(g * kk + k) * P + p] : T(1);
  t.valid = 0;
  t.lh = t.lw = T(0);
  for (int q = 0; q < 4; ++q) {
    t.idx[q] = 0;
    t.cw[q] = T(0);
  }
  if (!(h > -1 && h < s.H && w > -1 && w < s.W)) return t;  // also false for NaN
  const T h0 = std::floor(h), w0 = std::floor(w);
  const int64_t y0 = static_cast<int64_t>(h0), x0 = static_cast<int64_t>(w0);
  const T lh = h - h0, lw = w - w0, hh = T(1) - lh, hw = T(1) - lw;
  t.lh = lh;
  t.lw = lw;
  const T wts[4] = {hh * hw, hh * lw, lh * hw, lh * lw};
  for (int q = 0; q < 4; ++q) {
    const int64_t y = y0 + (q >> 1), x = x0 + (q & 1);
    if (y >= 0 && y < s.H && x >= 0 && x < s.W) {
      t.valid |= 1u << q;
      t.idx[q] = static_cast<int32_t>(y * s.W + x);  // H*W < 2^31 is checked
      t.cw[q] = wts[q];
    }
  }
  return t;
}

// The compact form im2col and col2im stream through (32 bytes in float32): corner weights times the mask.
template <typename T>
struct Tap {
  int32_t idx[4];
  T w[4];
};

// Positions per task. Within a task the chunk's taps (8 KiB) stay in L1 while every channel of the offset group
// runs over them: the table is read once per group instead of once per channel.
constexpr int64_t kChunk = 256;

template <typename T>
void build_taps(const DcnShape& s, const T* offset, const T* mask, std::vector<Tap<T>>& taps) {
  const int64_t kk = s.kh * s.kw, P = s.Ho * s.Wo, OG = s.offset_groups;
  taps.resize(static_cast<size_t>(OG * kk * P));
  at::parallel_for(0, OG * kk * s.Ho, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t ho = r % s.Ho, gk = r / s.Ho;
      Tap<T>* t = taps.data() + gk * P + ho * s.Wo;
      for (int64_t wo = 0; wo < s.Wo; ++wo) {
        const TapInfo<T> info = tap_info(s, offset, mask, gk / kk, gk % kk, ho, wo);
        for (int q = 0; q < 4; ++q) {
          t[wo].idx[q] = info.idx[q];
          t[wo].w[q] = info.cw[q] * info.m;
        }
      }
    }
  });
}

// columns (C*K, P): row c*K + k holds the masked samples of channel c at tap k. Tasks are (offset group, tap,
// chunk of positions); each writes its own part of the group's rows.
template <typename T>
void im2col(const DcnShape& s, const T* input, const std::vector<Tap<T>>& taps, T* cols) {
  const int64_t kk = s.kh * s.kw, P = s.Ho * s.Wo, cpg = s.C / s.offset_groups, HW = s.H * s.W;
  const int64_t nch = (P + kChunk - 1) / kChunk;
  at::parallel_for(0, s.offset_groups * kk * nch, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t ch = task % nch, gk = task / nch, k = gk % kk, g = gk / kk;
      const int64_t p0 = ch * kChunk, n = std::min(kChunk, P - p0);
      const Tap<T>* t = taps.data() + gk * P + p0;
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
        const T* plane = input + c * HW;
        T* out = cols + (c * kk + k) * P + p0;
        for (int64_t p = 0; p < n; ++p) {
          const Tap<T>& tp = t[p];
          out[p] = tp.w[0] * plane[tp.idx[0]] + tp.w[1] * plane[tp.idx[1]] + tp.w[2] * plane[tp.idx[2]] +
                   tp.w[3] * plane[tp.idx[3]];
        }
      }
    }
  });
}

// Input gradient of one image: each task owns a range of channel planes and scatters into them, every plane in
// the same order (tap, then position), whatever the range.
template <typename T>
void col2im(const DcnShape& s, const T* grad_cols, const std::vector<Tap<T>>& taps, T* grad_input) {
  const int64_t kk = s.kh * s.kw, P = s.Ho * s.Wo, cpg = s.C / s.offset_groups, HW = s.H * s.W;
  at::parallel_for(0, s.C, 1, [&](int64_t c0, int64_t c1) {
    std::fill(grad_input + c0 * HW, grad_input + c1 * HW, T(0));
    for (int64_t k = 0; k < kk; ++k) {
      for (int64_t p0 = 0; p0 < P; p0 += kChunk) {
        const int64_t n = std::min(kChunk, P - p0);
        for (int64_t c = c0; c < c1; ++c) {
          T* plane = grad_input + c * HW;
          const Tap<T>* t = taps.data() + ((c / cpg) * kk + k) * P + p0;
          const T* g = grad_cols + (c * kk + k) * P + p0;
          for (int64_t p = 0; p < n; ++p) {
            const Tap<T>& tp = t[p];
            const T gv = g[p];
            plane[tp.idx[0]] += tp.w[0] * gv;
            plane[tp.idx[1]] += tp.w[1] * gv;
            plane[tp.idx[2]] += tp.w[2] * gv;
            plane[tp.idx[3]] += tp.w[3] * gv;
          }
        }
      }
    }
  });
}

// Offset and mask gradients of one image. With the corner values v_q of a channel and its column gradient g:
//   d/dy = m * sum_c g (hw (v2 - v0) + lw (v3 - v1)),  d/dx = m * sum_c g (hh (v1 - v0) + lh (v3 - v2)),
//   d/dm = sum_c g * bilinear(v),
// so per position it is enough to sum s_q = sum_c g v_q over the group's channels (sequentially, in order).
// The same corner reads also give the columns (cols, as im2col writes them) that the weight gradient needs.
template <typename T>
void offset_mask_grad(const DcnShape& s, const T* input, const T* offset, const T* mask, const T* grad_cols,
                      T* grad_offset, T* grad_mask, T* cols) {
  const int64_t kk = s.kh * s.kw, P = s.Ho * s.Wo, OG = s.offset_groups, cpg = s.C / OG, HW = s.H * s.W;
  const int64_t nch = (P + kChunk - 1) / kChunk;
  at::parallel_for(0, OG * kk * nch, 1, [&](int64_t t0, int64_t t1) {
    std::vector<TapInfo<T>> info(kChunk);
    std::vector<T> acc(4 * kChunk), wm(4 * kChunk), vf(4 * kChunk);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t ch = task % nch, gk = task / nch, k = gk % kk, g = gk / kk;
      const int64_t p0 = ch * kChunk, n = std::min(kChunk, P - p0);
      for (int64_t p = 0; p < n; ++p) {
        info[p] = tap_info(s, offset, mask, g, k, (p0 + p) / s.Wo, (p0 + p) % s.Wo);
        for (int q = 0; q < 4; ++q) {
          wm[4 * p + q] = info[p].cw[q] * info[p].m;  // as build_taps, so the columns match the forward's bits
          vf[4 * p + q] = (info[p].valid >> q) & 1u ? T(1) : T(0);
        }
      }
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
        const T* plane = input + c * HW;
        const T* gc = grad_cols + (c * kk + k) * P + p0;
        T* col = cols + (c * kk + k) * P + p0;
        for (int64_t p = 0; p < n; ++p) {
          const TapInfo<T>& tp = info[p];
          const T gv = gc[p];
          const T r[4] = {plane[tp.idx[0]], plane[tp.idx[1]], plane[tp.idx[2]], plane[tp.idx[3]]};
          const T* w = wm.data() + 4 * p;
          const T* f = vf.data() + 4 * p;
          col[p] = w[0] * r[0] + w[1] * r[1] + w[2] * r[2] + w[3] * r[3];
          T* a = acc.data() + 4 * p;
          for (int q = 0; q < 4; ++q) a[q] += gv * (f[q] * r[q]);
        }
      }
      T* gy = grad_offset + ((g * kk + k) * 2) * P + p0;
      T* gx = gy + P;
      T* gm = grad_mask != nullptr ? grad_mask + (g * kk + k) * P + p0 : nullptr;
      // A tap out of range has lh = lw = 0 and no valid corner, so all three gradients come out 0.
      for (int64_t p = 0; p < n; ++p) {
        const TapInfo<T>& tp = info[p];
        const T lh = tp.lh, lw = tp.lw, hh = T(1) - lh, hw = T(1) - lw;
        const T* a = acc.data() + 4 * p;
        gy[p] = tp.m * (hw * (a[2] - a[0]) + lw * (a[3] - a[1]));
        gx[p] = tp.m * (hh * (a[1] - a[0]) + lh * (a[3] - a[2]));
        if (gm != nullptr) gm[p] = hh * hw * a[0] + hh * lw * a[1] + lh * hw * a[2] + lh * lw * a[3];
      }
    }
  });
}

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor as_compute(const at::Tensor& t) { return t.to(compute_type(t.scalar_type())).contiguous(); }

at::Tensor deform_conv2d_cpu(const at::Tensor& input_, const at::Tensor& offset_, const at::Tensor& weight_,
                             const c10::optional<at::Tensor>& bias_, c10::IntArrayRef stride,
                             c10::IntArrayRef padding, c10::IntArrayRef dilation,
                             const c10::optional<at::Tensor>& mask_) {
  const DcnShape s = check_deform_conv2d(input_, offset_, weight_, bias_, stride, padding, dilation, mask_);
  const at::ScalarType out_type = input_.scalar_type();
  const at::Tensor input = as_compute(input_), offset = as_compute(offset_), weight = as_compute(weight_);
  const at::Tensor mask = s.has_mask ? as_compute(*mask_) : at::Tensor();
  const int64_t kk = s.kh * s.kw, P = s.Ho * s.Wo, G = s.groups;
  const int64_t cg_rows = s.C / G * kk, og = s.Cout / G;
  at::Tensor out = at::empty({s.B, s.Cout, s.Ho, s.Wo}, input.options());
  if (s.B > 0) {
    at::Tensor cols = at::empty({s.C * kk, P}, input.options());
    const at::Tensor w2 = weight.reshape({G, og, cg_rows});
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_cpu", [&] {
      std::vector<Tap<scalar_t>> taps;
      for (int64_t b = 0; b < s.B; ++b) {
        build_taps(s, offset[b].const_data_ptr<scalar_t>(), s.has_mask ? mask[b].const_data_ptr<scalar_t>() : nullptr,
                   taps);
        im2col(s, input[b].const_data_ptr<scalar_t>(), taps, cols.mutable_data_ptr<scalar_t>());
        at::Tensor ob = out[b].view({G, og, P});
        for (int64_t g = 0; g < G; ++g) {
          at::Tensor og_out = ob[g];
          at::mm_out(og_out, w2[g], cols.narrow(0, g * cg_rows, cg_rows));
        }
      }
    });
    if (bias_.has_value()) out.add_(as_compute(*bias_).view({1, s.Cout, 1, 1}));
  }
  return out_type == out.scalar_type() ? out : out.to(out_type);
}

DcnGrads deform_conv2d_backward_cpu(const at::Tensor& grad_out_, const at::Tensor& input_, const at::Tensor& offset_,
                                    const at::Tensor& weight_, const c10::optional<at::Tensor>& mask_,
                                    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  const DcnShape s =
      check_deform_conv2d(input_, offset_, weight_, c10::nullopt, stride, padding, dilation, mask_, &grad_out_);
  const at::ScalarType out_type = input_.scalar_type();
  const at::Tensor input = as_compute(input_), offset = as_compute(offset_), weight = as_compute(weight_);
  const at::Tensor grad_out = as_compute(grad_out_);
  const at::Tensor mask = s.has_mask ? as_compute(*mask_) : at::Tensor();
  const int64_t kk = s.kh * s.kw, P = s.Ho * s.Wo, G = s.groups;
  const int64_t cg_rows = s.C / G * kk, og = s.Cout / G;
  const auto opts = input.options();
  at::Tensor grad_input = at::empty_like(input);
  at::Tensor grad_offset = at::empty_like(offset);
  at::Tensor grad_mask = s.has_mask ? at::empty_like(mask) : at::empty({0}, opts);
  at::Tensor grad_weight = at::zeros({G, og, cg_rows}, opts);
  at::Tensor grad_bias = at::empty({s.Cout}, opts);
  if (s.B > 0) {
    at::Tensor cols = at::empty({s.C * kk, P}, opts);
    at::Tensor grad_cols = at::empty({s.C * kk, P}, opts);
    const at::Tensor w2 = weight.reshape({G, og, cg_rows});
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_backward_cpu", [&] {
      std::vector<Tap<scalar_t>> taps;
      for (int64_t b = 0; b < s.B; ++b) {
        build_taps(s, offset[b].const_data_ptr<scalar_t>(), s.has_mask ? mask[b].const_data_ptr<scalar_t>() : nullptr,
                   taps);
        const at::Tensor gb = grad_out[b].view({G, og, P});
        for (int64_t g = 0; g < G; ++g) {
          at::Tensor gc = grad_cols.narrow(0, g * cg_rows, cg_rows);
          at::mm_out(gc, w2[g].t(), gb[g]);
        }
        // One pass over the corners gives both the columns (again, bit-identical to the forward's) and the
        // offset/mask gradients; the weight gradient needs the columns, so it comes after.
        offset_mask_grad(s, input[b].const_data_ptr<scalar_t>(), offset[b].const_data_ptr<scalar_t>(),
                         s.has_mask ? mask[b].const_data_ptr<scalar_t>() : nullptr, grad_cols.const_data_ptr<scalar_t>(),
                         grad_offset[b].mutable_data_ptr<scalar_t>(),
                         s.has_mask ? grad_mask[b].mutable_data_ptr<scalar_t>() : nullptr,
                         cols.mutable_data_ptr<scalar_t>());
        for (int64_t g = 0; g < G; ++g) {
          grad_weight[g].addmm_(gb[g], cols.narrow(0, g * cg_rows, cg_rows).t());
        }
        col2im(s, grad_cols.const_data_ptr<scalar_t>(), taps, grad_input[b].mutable_data_ptr<scalar_t>());
      }
      // Bias gradient: per output channel, images then positions in order, accumulated in double.
      const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
      scalar_t* gbias = grad_bias.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, s.Cout, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t co = c0; co < c1; ++co) {
          double acc = 0.0;
          for (int64_t b = 0; b < s.B; ++b) {
            const scalar_t* row = go + (b * s.Cout + co) * P;
            for (int64_t p = 0; p < P; ++p) acc += static_cast<double>(row[p]);
          }
          gbias[co] = static_cast<scalar_t>(acc);
        }
      });
    });
  } else {
    grad_bias.zero_();
  }
  at::Tensor gw = grad_weight.view({s.Cout, s.C / G, s.kh, s.kw});
  auto cast = [&](const at::Tensor& t) { return t.scalar_type() == out_type ? t : t.to(out_type); };
  return {cast(grad_input), cast(grad_offset), cast(gw), cast(grad_bias), cast(grad_mask)};
}

}  // namespace

TORCH_LIBRARY_IMPL(tur, CPU, m) {
  m.impl("deform_conv2d", &deform_conv2d_cpu);
  m.impl("deform_conv2d_backward", &deform_conv2d_backward_cpu);
}

}  // namespace tur
