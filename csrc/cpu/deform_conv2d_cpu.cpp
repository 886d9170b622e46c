// CPU kernel of tur::deform_conv2d and its backward: per image, a table of the bilinear taps, im2col through it
// over a channels-last copy of the image, then ATen GEMMs per group (at::mm, the BLAS ATen was built with).
//
// Work per image (C_in channels, K = kh*kw taps, P = H_out*W_out positions): the column buffer is C_in*K x P; the
// forward GEMM is 2*C_out*(C_in/groups)*K*P flops, the backward two more of the same size (grad columns =
// W^T grad_out, grad weight = grad_out columns^T). The sampling is 4 row reads + 4 multiply-adds per column value.
//
// Determinism: every output element is written by exactly one task, and every sum runs in an order that does not
// depend on the thread count: im2col and the offset/mask gradients are parallel over positions (channel sums in
// 8 fixed lanes), the input gradient over blocks of channels (each element's contributions in one fixed tap
// order), the bias gradient over output channels, and the weight gradient accumulates image after image. The
// GEMMs are ATen's (MKL here; the tests check 1, 2 and 3 threads give the same bits).
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

// The compact form im2col and col2im read (32 bytes in float32): corner indices and weights times the mask.
template <typename T>
struct Tap {
  int32_t idx[4];
  T w[4];
};

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

// Layouts. The input is read channels-last, xt (H*W, C), so the 4 corners of a tap are 4 contiguous rows of
// channels, and the columns are position-major, cols (P, K*C): row p, column g*K*Cg + k*Cg + ci for channel
// c = g*Cg + ci of conv group g. Every gather, scatter and channel sum is then a contiguous vector loop, and
// each conv group's block of columns is a strided (P, K*Cg) matrix for the GEMM (the weight permuted to
// (C_out, K, Cg) to match).

// f(c_begin, c_end, col): the channels [lo, hi) split at conv-group boundaries, col the column of c_begin at tap k.
template <typename F>
inline void for_segments(const DcnShape& s, int64_t k, int64_t lo, int64_t hi, F&& f) {
  const int64_t cg = s.C / s.groups, kk = s.kh * s.kw;
  for (int64_t c = lo; c < hi;) {
    const int64_t g = c / cg, end = std::min(hi, (g + 1) * cg);
    f(c, end, g * kk * cg + k * cg + (c - g * cg));
    c = end;
  }
}

constexpr int64_t kPosGrain = 16;

// cols (P, K*C): masked samples; a task owns whole rows (positions).
template <typename T>
void im2col(const DcnShape& s, const T* xt, const std::vector<Tap<T>>& taps, T* cols) {
  const int64_t kk = s.kh * s.kw, P = s.Ho * s.Wo, cpg = s.C / s.offset_groups, row = kk * s.C;
  at::parallel_for(0, P, kPosGrain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t o = 0; o < s.offset_groups; ++o) {
        for (int64_t k = 0; k < kk; ++k) {
          const Tap<T>& t = taps[(o * kk + k) * P + p];
          const T *r0 = xt + t.idx[0] * s.C, *r1 = xt + t.idx[1] * s.C, *r2 = xt + t.idx[2] * s.C,
                  *r3 = xt + t.idx[3] * s.C;
          const T w0 = t.w[0], w1 = t.w[1], w2 = t.w[2], w3 = t.w[3];
          for_segments(s, k, o * cpg, (o + 1) * cpg, [&](int64_t cb, int64_t ce, int64_t col) {
            T* __restrict d = cols + p * row + col - cb;
            for (int64_t c = cb; c < ce; ++c) d[c] = w0 * r0[c] + w1 * r1[c] + w2 * r2[c] + w3 * r3[c];
          });
        }
      }
    }
  });
}

// Input gradient, channels-last gt (H*W, C). Tasks own blocks of channels (for every pixel) and visit the taps
// in one fixed order (position, offset group, tap, corner), so each element's sum has the same order whatever the
// blocks and threads.
constexpr int64_t kChannelBlock = 16;

template <typename T>
void col2im(const DcnShape& s, const T* grad_cols, const std::vector<Tap<T>>& taps, T* gt) {
  const int64_t kk = s.kh * s.kw, P = s.Ho * s.Wo, cpg = s.C / s.offset_groups, row = kk * s.C, HW = s.H * s.W;
  const int64_t nblk = (s.C + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    const int64_t lo = b0 * kChannelBlock, hi = std::min(s.C, b1 * kChannelBlock);
    for (int64_t i = 0; i < HW; ++i) std::fill(gt + i * s.C + lo, gt + i * s.C + hi, T(0));
    for (int64_t p = 0; p < P; ++p) {
      const T* g = grad_cols + p * row;
      for (int64_t o = 0; o < s.offset_groups; ++o) {
        const int64_t a = std::max(lo, o * cpg), e = std::min(hi, (o + 1) * cpg);
        if (a >= e) continue;
        for (int64_t k = 0; k < kk; ++k) {
          const Tap<T>& t = taps[(o * kk + k) * P + p];
          for_segments(s, k, a, e, [&](int64_t cb, int64_t ce, int64_t col) {
            const T* gs = g + col - cb;
            for (int q = 0; q < 4; ++q) {
              const T w = t.w[q];
              if (w == T(0)) continue;  // a corner outside the image (or a zero mask): nothing to add
              T* __restrict dst = gt + t.idx[q] * s.C;
              for (int64_t c = cb; c < ce; ++c) dst[c] += w * gs[c];
            }
          });
        }
      }
    }
  });
}

// Offset and mask gradients of one image, and the columns again (bit-identical to im2col's) for the weight
// gradient, in one pass over the corners. With the corner values v_q of a channel and its column gradient g:
//   d/dy = m * sum_c g (hw (v2 - v0) + lw (v3 - v1)),  d/dx = m * sum_c g (hh (v1 - v0) + lh (v3 - v2)),
//   d/dm = sum_c g * bilinear(v),
// so per (offset group, tap, position) it is enough to form s_q = sum_c g v_q over the group's channels: a dot
// product of contiguous vectors, summed in 8 lanes combined in a fixed order (thread-count independent).
template <typename T>
inline void dot8(const T* a, const T* b, int64_t n, T* lanes) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int l = 0; l < 8; ++l) lanes[l] += a[j + l] * b[j + l];
  }
  for (int l = 0; j < n; ++j, ++l) lanes[l] += a[j] * b[j];
}

template <typename T>
void offset_mask_grad(const DcnShape& s, const T* xt, const T* offset, const T* mask, const T* grad_cols,
                      T* grad_offset, T* grad_mask, T* cols) {
  const int64_t kk = s.kh * s.kw, P = s.Ho * s.Wo, cpg = s.C / s.offset_groups, row = kk * s.C;
  at::parallel_for(0, P, kPosGrain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t ho = p / s.Wo, wo = p % s.Wo;
      for (int64_t o = 0; o < s.offset_groups; ++o) {
        for (int64_t k = 0; k < kk; ++k) {
          const TapInfo<T> t = tap_info(s, offset, mask, o, k, ho, wo);
          const T* r[4] = {xt + t.idx[0] * s.C, xt + t.idx[1] * s.C, xt + t.idx[2] * s.C, xt + t.idx[3] * s.C};
          const T w[4] = {t.cw[0] * t.m, t.cw[1] * t.m, t.cw[2] * t.m, t.cw[3] * t.m};  // as build_taps
          T lanes[4][8] = {};
          for_segments(s, k, o * cpg, (o + 1) * cpg, [&](int64_t cb, int64_t ce, int64_t col) {
            T* __restrict d = cols + p * row + col - cb;
            for (int64_t c = cb; c < ce; ++c) d[c] = w[0] * r[0][c] + w[1] * r[1][c] + w[2] * r[2][c] + w[3] * r[3][c];
            const T* g = grad_cols + p * row + col;
            for (int q = 0; q < 4; ++q) {
              if ((t.valid >> q) & 1u) dot8(g, r[q] + cb, ce - cb, lanes[q]);
            }
          });
          T sq[4];
          for (int q = 0; q < 4; ++q) {
            sq[q] = ((lanes[q][0] + lanes[q][1]) + (lanes[q][2] + lanes[q][3])) +
                    ((lanes[q][4] + lanes[q][5]) + (lanes[q][6] + lanes[q][7]));
          }
          // A tap out of range has lh = lw = 0 and no valid corner, so all three gradients come out 0.
          const T lh = t.lh, lw = t.lw, hh = T(1) - lh, hw = T(1) - lw;
          const int64_t gk = o * kk + k;
          grad_offset[(gk * 2) * P + p] = t.m * (hw * (sq[2] - sq[0]) + lw * (sq[3] - sq[1]));
          grad_offset[(gk * 2 + 1) * P + p] = t.m * (hh * (sq[1] - sq[0]) + lh * (sq[3] - sq[2]));
          if (grad_mask != nullptr) {
            grad_mask[gk * P + p] = hh * hw * sq[0] + hh * lw * sq[1] + lh * hw * sq[2] + lh * lw * sq[3];
          }
        }
      }
    }
  });
}

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor as_compute(const at::Tensor& t) { return t.to(compute_type(t.scalar_type())).contiguous(); }

// The weight as (G, C_out/G, K*Cg) with column k*Cg + ci, the order of a conv group's block of columns.
at::Tensor permuted_weight(const at::Tensor& weight, const DcnShape& s) {
  const int64_t G = s.groups, cg = s.C / G, kk = s.kh * s.kw;
  return weight.reshape({G, s.Cout / G, cg, kk}).permute({0, 1, 3, 2}).contiguous().view({G, s.Cout / G, kk * cg});
}

// One image (C, H, W) as (H*W, C).
at::Tensor channels_last(const at::Tensor& image, const DcnShape& s) {
  return image.reshape({s.C, s.H * s.W}).t().contiguous();
}

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
    at::Tensor cols = at::empty({P, s.C * kk}, input.options());
    const at::Tensor w2 = permuted_weight(weight, s);
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_cpu", [&] {
      std::vector<Tap<scalar_t>> taps;
      for (int64_t b = 0; b < s.B; ++b) {
        build_taps(s, offset[b].const_data_ptr<scalar_t>(), s.has_mask ? mask[b].const_data_ptr<scalar_t>() : nullptr,
                   taps);
        const at::Tensor xt = channels_last(input[b], s);
        im2col(s, xt.const_data_ptr<scalar_t>(), taps, cols.mutable_data_ptr<scalar_t>());
        at::Tensor ob = out[b].view({G, og, P});
        for (int64_t g = 0; g < G; ++g) {
          at::Tensor og_out = ob[g];
          at::mm_out(og_out, w2[g], cols.narrow(1, g * cg_rows, cg_rows).t());
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
    at::Tensor cols = at::empty({P, s.C * kk}, opts);
    at::Tensor grad_cols = at::empty({P, s.C * kk}, opts);
    at::Tensor gt = at::empty({s.H * s.W, s.C}, opts);
    const at::Tensor w2 = permuted_weight(weight, s);
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_backward_cpu", [&] {
      std::vector<Tap<scalar_t>> taps;
      for (int64_t b = 0; b < s.B; ++b) {
        build_taps(s, offset[b].const_data_ptr<scalar_t>(), s.has_mask ? mask[b].const_data_ptr<scalar_t>() : nullptr,
                   taps);
        const at::Tensor xt = channels_last(input[b], s);
        const at::Tensor gb = grad_out[b].view({G, og, P});
        for (int64_t g = 0; g < G; ++g) {
          at::Tensor gc = grad_cols.narrow(1, g * cg_rows, cg_rows);
          if (G == 1) {
            at::mm_out(gc, gb[g].t(), w2[g]);
          } else {
            gc.copy_(at::mm(gb[g].t(), w2[g]));
          }
        }
        offset_mask_grad(s, xt.const_data_ptr<scalar_t>(), offset[b].const_data_ptr<scalar_t>(),
                         s.has_mask ? mask[b].const_data_ptr<scalar_t>() : nullptr, grad_cols.const_data_ptr<scalar_t>(),
                         grad_offset[b].mutable_data_ptr<scalar_t>(),
                         s.has_mask ? grad_mask[b].mutable_data_ptr<scalar_t>() : nullptr,
                         cols.mutable_data_ptr<scalar_t>());
        for (int64_t g = 0; g < G; ++g) {
          grad_weight[g].addmm_(gb[g], cols.narrow(1, g * cg_rows, cg_rows));
        }
        col2im(s, grad_cols.const_data_ptr<scalar_t>(), taps, gt.mutable_data_ptr<scalar_t>());
        grad_input[b].view({s.C, s.H * s.W}).copy_(gt.t());
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
  // (G, og, K, Cg) back to the weight's (C_out, Cg, kh, kw).
  at::Tensor gw = grad_weight.view({G, og, kk, s.C / G}).permute({0, 1, 3, 2}).reshape({s.Cout, s.C / G, s.kh, s.kw});
  auto cast = [&](const at::Tensor& t) { return t.scalar_type() == out_type ? t : t.to(out_type); };
  return {cast(grad_input), cast(grad_offset), cast(gw), cast(grad_bias), cast(grad_mask)};
}

}  // namespace

TORCH_LIBRARY_IMPL(tur, CPU, m) {
  m.impl("deform_conv2d", &deform_conv2d_cpu);
  m.impl("deform_conv2d_backward", &deform_conv2d_backward_cpu);
}

}  // namespace tur
