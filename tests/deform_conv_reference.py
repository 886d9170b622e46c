"""Pure-PyTorch modulated deformable convolution (DCNv2, torchvision/mmcv semantics), the oracle of the op's tests
and the baseline of benchmarks/bench_dcn.py. Written from the definition with explicit gathers of the four
bilinear corners, so autograd differentiates it (floor() has zero gradient; the fractional parts carry the offset
gradient), in whatever dtype it is given (the tests use float64).
"""
from __future__ import annotations

import torch


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def sample_columns(input, offset, mask, kh, kw, stride, padding, dilation):
    """The sampled, masked columns (B, C, kh*kw, H_out, W_out) of the deformable convolution."""
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    B, C, H, W = input.shape
    Ho, Wo = offset.shape[2], offset.shape[3]
    kk = kh * kw
    og = offset.shape[1] // (2 * kk)
    cpg = C // og
    dev, dt = input.device, input.dtype
    # Base position of tap k = i*kw + j at output (ho, wo): (ho*sh - ph + i*dh, wo*sw - pw + j*dw).
    ki = torch.arange(kh, device=dev).repeat_interleave(kw)
    kj = torch.arange(kw, device=dev).repeat(kh)
    base_h = (torch.arange(Ho, device=dev) * sh - ph)[None, :, None] + (ki * dh)[:, None, None]  # (kk, Ho, 1)
    base_w = (torch.arange(Wo, device=dev) * sw - pw)[None, None, :] + (kj * dw)[:, None, None]  # (kk, 1, Wo)
    off = offset.reshape(B, og, kk, 2, Ho, Wo)
    h = base_h.to(dt) + off[:, :, :, 0]  # (B, og, kk, Ho, Wo)
    w = base_w.to(dt) + off[:, :, :, 1]
    inside = (h > -1) & (h < H) & (w > -1) & (w < W)
    h0 = torch.floor(h)
    w0 = torch.floor(w)
    lh, lw = h - h0, w - w0
    hh, hw = 1 - lh, 1 - lw
    h0i, w0i = h0.long(), w0.long()
    planes = input.reshape(B, og, cpg, H * W)
    val = torch.zeros((B, og, cpg, kk, Ho, Wo), dtype=dt, device=dev)
    for dy, dx, wt in ((0, 0, hh * hw), (0, 1, hh * lw), (1, 0, lh * hw), (1, 1, lh * lw)):
        yy, xx = h0i + dy, w0i + dx
        ok = inside & (yy >= 0) & (yy <= H - 1) & (xx >= 0) & (xx <= W - 1)
        idx = torch.where(ok, yy * W + xx, torch.zeros_like(yy))  # (B, og, kk, Ho, Wo)
        gathered = torch.gather(planes, 3, idx.reshape(B, og, 1, kk * Ho * Wo).expand(B, og, cpg, kk * Ho * Wo))
        corner = gathered.reshape(B, og, cpg, kk, Ho, Wo) * torch.where(ok, wt, torch.zeros_like(wt))[:, :, None]
        val = val + corner
    if mask is not None:
        val = val * mask.reshape(B, og, 1, kk, Ho, Wo)
    return val.reshape(B, C, kk, Ho, Wo)


def deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """Reference DCNv2: sampled columns, then a grouped convolution of them (groups = C_in / weight.shape[1])."""
    B, C = input.shape[:2]
    Cout, cg, kh, kw = weight.shape
    groups = C // cg
    cols = sample_columns(input, offset, mask, kh, kw, stride, padding, dilation)
    Ho, Wo = cols.shape[3], cols.shape[4]
    cols = cols.reshape(B, groups, cg * kh * kw, Ho * Wo)
    wg = weight.reshape(groups, Cout // groups, cg * kh * kw)
    out = torch.einsum("gok,bgkp->bgop", wg, cols).reshape(B, Cout, Ho, Wo)
    if bias is not None:
        out = out + bias.reshape(1, Cout, 1, 1)
    return out
