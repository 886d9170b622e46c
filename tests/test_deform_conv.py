"""tur.deform_conv2d (DCNv2) on CPU against the float64 pure-PyTorch reference (tests/deform_conv_reference.py):
values and the five gradients over shapes, strides, dilations, groups, offset groups and far-out offsets;
gradcheck, opcheck, low-precision tolerances, thread-count independence, bad inputs, torch.compile and export."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

import tur_ext
from tur_ext import ops

sys.path.insert(0, os.path.dirname(__file__))
from deform_conv_reference import deform_conv2d as reference_dcn  # noqa: E402


def make_case(B=2, C=4, H=7, W=9, Cout=6, kh=3, kw=3, groups=1, og=1, stride=1, padding=1, dilation=1,
              offset_scale=1.5, with_mask=True, with_bias=True, dtype=torch.float64, seed=0):
    """Random inputs (never zeros); offsets of up to ~offset_scale pixels, a mask in (0.1, 1.1)."""
    g = torch.Generator().manual_seed(seed)
    s = (stride, stride) if isinstance(stride, int) else stride
    p = (padding, padding) if isinstance(padding, int) else padding
    d = (dilation, dilation) if isinstance(dilation, int) else dilation
    Ho = (H + 2 * p[0] - d[0] * (kh - 1) - 1) // s[0] + 1
    Wo = (W + 2 * p[1] - d[1] * (kw - 1) - 1) // s[1] + 1
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    off = (torch.rand(B, 2 * og * kh * kw, Ho, Wo, generator=g, dtype=torch.float64) * 2 - 1) * offset_scale
    w = torch.randn(Cout, C // groups, kh, kw, generator=g, dtype=torch.float64) / (C * kh * kw) ** 0.5
    b = torch.randn(Cout, generator=g, dtype=torch.float64) if with_bias else None
    m = torch.rand(B, og * kh * kw, Ho, Wo, generator=g, dtype=torch.float64) + 0.1 if with_mask else None
    conv = lambda t: None if t is None else t.to(dtype)
    return dict(input=conv(x), offset=conv(off), weight=conv(w), bias=conv(b), mask=conv(m),
                stride=stride, padding=padding, dilation=dilation)


TENSORS = ("input", "offset", "weight", "bias", "mask")


def run(fn, case, grad_seed=1):
    """Output and gradients of every tensor argument for a random upstream gradient."""
    leaves = {k: (case[k].detach().clone().requires_grad_() if case[k] is not None else None) for k in TENSORS}
    out = fn(leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"], case["stride"], case["padding"],
             case["dilation"], mask=leaves["mask"])
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(go.to(out.dtype))
    return out.detach(), {k: (v.grad if v is not None else None) for k, v in leaves.items()}


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


CASES = {
    "odd_sizes": dict(H=7, W=11),
    "stride2": dict(stride=2, H=9, W=8),
    "dilation2": dict(dilation=2, padding=2, H=8, W=9),
    "groups2": dict(groups=2, C=4, Cout=6),
    "offset_groups2": dict(og=2, C=4),
    "offset_groups4_groups2": dict(og=4, groups=2, C=8, Cout=4),
    "kernel3x5": dict(kh=3, kw=5, padding=(1, 2), H=6, W=10),
    "far_offsets": dict(offset_scale=6.0, H=5, W=6),
    "no_mask_no_bias": dict(with_mask=False, with_bias=False),
    "batch1": dict(B=1, H=5, W=5),
    "no_padding_pairs": dict(padding=0, stride=(2, 1), dilation=(1, 2), H=9, W=10),
    "kernel1x1": dict(kh=1, kw=1, padding=0),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_float64_against_reference(name):
    case = make_case(**CASES[name])
    out, grads = run(ops.deform_conv2d, case)
    ref_out, ref_grads = run(reference_dcn, case)
    assert out.shape == ref_out.shape
    assert rel_err(out, ref_out) < 1e-10
    for k in TENSORS:
        if case[k] is None:
            assert grads[k] is None
            continue
        assert grads[k].shape == case[k].shape, k
        assert rel_err(grads[k], ref_grads[k]) < 1e-10, (k, rel_err(grads[k], ref_grads[k]))


def test_far_offsets_leave_taps_outside():
    """The far-offset case really exercises out-of-range taps: many sampled positions fall outside the image and
    the op still matches the reference there (gradients of those taps are 0)."""
    case = make_case(offset_scale=6.0, H=5, W=6)
    Ho, Wo = case["offset"].shape[2:]
    base_h = torch.arange(Ho).double()[:, None] - 1
    dy = case["offset"][:, 0::2][:, :1]
    h = base_h + dy
    outside = ((h <= -1) | (h >= 5)).double().mean()
    assert outside > 0.3
    off = case["offset"].clone()
    off.fill_(100.0)  # every tap out of range: output is the bias alone, offset/mask gradients vanish
    case["offset"] = off
    out, grads = run(ops.deform_conv2d, case)
    assert torch.equal(out, case["bias"].view(1, -1, 1, 1).expand_as(out))
    assert torch.count_nonzero(grads["offset"]) == 0 and torch.count_nonzero(grads["mask"]) == 0
    assert torch.count_nonzero(grads["input"]) == 0


def _bilinear(plane, h, w):
    H, W = plane.shape
    if h <= -1 or h >= H or w <= -1 or w >= W:
        return 0.0
    h0, w0 = math.floor(h), math.floor(w)
    lh, lw = h - h0, w - w0
    v = 0.0
    for dy, dx, wt in ((0, 0, (1 - lh) * (1 - lw)), (0, 1, (1 - lh) * lw), (1, 0, lh * (1 - lw)), (1, 1, lh * lw)):
        y, x = h0 + dy, w0 + dx
        if 0 <= y < H and 0 <= x < W:
            v += wt * float(plane[y, x])
    return v


def test_reference_against_naive_loops():
    """The reference itself against the definition written out element by element (the issue's channel layout)."""
    case = make_case(B=1, C=4, Cout=4, groups=2, og=2, H=4, W=5, stride=(1, 2), dilation=(2, 1), padding=(2, 1),
                     offset_scale=2.0)
    x, o, w, b, m = (case[k] for k in TENSORS)
    out = reference_dcn(x, o, w, b, (1, 2), (2, 1), (2, 1), mask=m)
    Cout, cg, kh, kw = w.shape
    cpg = x.shape[1] // 2
    for co in range(Cout):
        g = co // (Cout // 2)
        for ho in range(out.shape[2]):
            for wo in range(out.shape[3]):
                acc = float(b[co])
                for ci in range(cg):
                    c = g * cg + ci
                    og = c // cpg
                    for i in range(kh):
                        for j in range(kw):
                            k = i * kw + j
                            dy = float(o[0, og * 2 * kh * kw + 2 * k, ho, wo])
                            dx = float(o[0, og * 2 * kh * kw + 2 * k + 1, ho, wo])
                            h = ho * 1 - 2 + i * 2 + dy
                            ww = wo * 2 - 1 + j * 1 + dx
                            acc += float(w[co, ci, i, j]) * float(m[0, og * kh * kw + k, ho, wo]) * _bilinear(
                                x[0, c], h, ww)
                assert abs(float(out[0, co, ho, wo]) - acc) < 1e-12


def test_matches_conv2d_with_zero_offsets():
    """Zero offsets, unit mask: an ordinary convolution (an independent oracle of the reference)."""
    case = make_case(groups=2, C=4, Cout=4, stride=2, dilation=1, padding=1, H=9, W=7)
    case["offset"] = torch.zeros_like(case["offset"])
    case["mask"] = None
    out = ops.deform_conv2d(case["input"], case["offset"], case["weight"], case["bias"], 2, 1, 1)
    expected = torch.nn.functional.conv2d(case["input"], case["weight"], case["bias"], 2, 1, 1, groups=2)
    assert rel_err(out, expected) < 1e-12


def test_gradcheck():
    case = make_case(B=1, C=2, Cout=2, H=4, W=5, og=2, groups=2)
    args = [case[k].detach().clone().requires_grad_() for k in ("input", "offset", "weight", "bias")]
    m = case["mask"].detach().clone().requires_grad_()
    fn = lambda x, o, w, b, mk: ops.deform_conv2d(x, o, w, b, 1, 1, 1, mk)
    assert torch.autograd.gradcheck(fn, (*args, m), eps=1e-6, atol=1e-7)


def opcheck_samples():
    a = make_case(B=1, C=2, Cout=2, H=4, W=5, dtype=torch.float32)
    yield (a["input"], a["offset"], a["weight"], a["bias"], [1, 1], [1, 1], [1, 1], a["mask"])
    b = make_case(B=2, C=4, Cout=2, H=5, W=4, og=2, groups=2, with_mask=False, with_bias=False, stride=2,
                  dtype=torch.float64)
    yield (b["input"], b["offset"], b["weight"], None, [2, 2], [1, 1], [1, 1], None)


def test_opcheck():
    for args in opcheck_samples():
        req = [t.requires_grad_() if isinstance(t, torch.Tensor) else t for t in args]
        torch.library.opcheck(torch.ops.tur.deform_conv2d.default, tuple(req))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_low_precision(dtype, tol):
    """Inputs rounded to dtype, computed in float32: compared with float64 on the same rounded inputs."""
    case = make_case(C=8, Cout=8, H=9, W=10, og=2, dtype=dtype)
    out, grads = run(ops.deform_conv2d, case)
    assert out.dtype == dtype and all(grads[k].dtype == dtype for k in TENSORS)
    case64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    ref_out, ref_grads = run(reference_dcn, case64)
    assert rel_err(out, ref_out) < tol
    for k in TENSORS:
        assert rel_err(grads[k], ref_grads[k]) < tol, (k, rel_err(grads[k], ref_grads[k]))


def test_thread_count_independent():
    case = make_case(B=2, C=16, Cout=16, H=23, W=29, og=2, dtype=torch.float32, offset_scale=3.0)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run(ops.deform_conv2d, case))
    finally:
        torch.set_num_threads(before)
    (o1, g1), *rest = results
    for o, g in rest:
        assert torch.equal(o, o1)
        for k in TENSORS:
            assert torch.equal(g[k], g1[k]), k


def test_exported_names():
    assert tur_ext.deform_conv2d is ops.deform_conv2d
    assert torch.ops.tur.deform_conv2d.default is not None


# ------------------------------------------------------------------------------------------- bad inputs


def bad_inputs():
    c = make_case(dtype=torch.float32)
    x, o, w, b, m = c["input"], c["offset"], c["weight"], c["bias"], c["mask"]
    yield "input_rank", (x[0], o, w, b, 1, 1, 1, m), ValueError, "input: expected a 4-D"
    yield "offset_channels", (x, o[:, :17], w, b, 1, 1, 1, m), ValueError, "offset: expected 2 \\* offset_groups"
    yield "offset_spatial", (x, o[:, :, :5], w, b, 1, 1, 1, m), ValueError, "offset: expected shape"
    yield "offset_batch", (x, o[:1], w, b, 1, 1, 1, m), ValueError, "offset: expected shape"
    yield "offset_groups_divide", (x, torch.cat([o, o, o], 1), w, b, 1, 1, 1, None), ValueError, "offset_groups = 3"
    yield "mask_channels", (x, o, w, b, 1, 1, 1, m[:, :8]), ValueError, "mask: expected shape"
    yield "weight_groups", (x, o, w[:, :3], b, 1, 1, 1, m), ValueError, "weight: expected C_in / groups"
    yield "weight_cout_groups", (x[:, :4], o, w[:5, :2], None, 1, 1, 1, m), ValueError, "weight: expected C_out"
    yield "weight_rank", (x, o, w[0], b, 1, 1, 1, m), ValueError, "weight: expected a 4-D"
    yield "bias_size", (x, o, w, b[:4], 1, 1, 1, m), ValueError, "bias: expected shape"
    yield "mixed_dtype_weight", (x, o, w.double(), b, 1, 1, 1, m), TypeError, "weight: expected dtype"
    yield "mixed_dtype_offset", (x, o.half(), w, b, 1, 1, 1, m), TypeError, "offset: expected dtype"
    yield "mixed_dtype_mask", (x, o, w, b, 1, 1, 1, m.double()), TypeError, "mask: expected dtype"
    yield "mixed_dtype_bias", (x, o, w, b.double(), 1, 1, 1, m), TypeError, "bias: expected dtype"
    yield "int_input", (x.long(), o, w, b, 1, 1, 1, m), TypeError, "input: expected a float16"
    yield "stride_zero", (x, o, w, b, 0, 1, 1, m), ValueError, "stride: expected values >= 1"
    yield "dilation_zero", (x, o, w, b, 1, 1, (1, 0), m), ValueError, "dilation: expected values >= 1"
    yield "padding_negative", (x, o, w, b, 1, -1, 1, m), ValueError, "padding: expected values >= 0"
    yield "stride_float", (x, o, w, b, 1.5, 1, 1, m), TypeError, "stride: expected an int or a pair"
    yield "stride_triple", (x, o, w, b, (1, 1, 1), 1, 1, m), TypeError, "stride: expected an int or a pair"
    yield "too_small", (x[:, :, :1, :1], o, w, b, 1, 0, 1, m), ValueError, "input: spatial size"
    yield "offset_not_tensor", (x, 3.0, w, b, 1, 1, 1, m), TypeError, "offset: expected a tensor"


@pytest.mark.parametrize("name,args,exc,match", list(bad_inputs()), ids=[c[0] for c in bad_inputs()])
def test_bad_input(name, args, exc, match):
    with pytest.raises(exc, match=match):
        ops.deform_conv2d(*args[:7], mask=args[7])


def test_bad_input_direct_op():
    """The op itself checks too (a caller of torch.ops.tur.* gets the same errors, never a crash)."""
    c = make_case(dtype=torch.float32)
    with pytest.raises(ValueError, match="offset: expected shape"):
        torch.ops.tur.deform_conv2d(c["input"], c["offset"][:, :, :3], c["weight"], None, [1, 1], [1, 1], [1, 1],
                                    None)
    with pytest.raises(ValueError, match="grad_out: expected shape"):
        torch.ops.tur.deform_conv2d_backward(c["input"], c["input"], c["offset"], c["weight"], None, [1, 1],
                                             [1, 1], [1, 1])


# ------------------------------------------------------------------------------------- compile, export


class _DCN(torch.nn.Module):
    def __init__(self, C=4):
        super().__init__()
        self.offset_mask = torch.nn.Conv2d(C, 27, 3, padding=1)
        self.weight = torch.nn.Parameter(torch.randn(C, C, 3, 3) * 0.1)

    def forward(self, x):
        om = self.offset_mask(x)
        return ops.deform_conv2d(x, om[:, :18], self.weight, None, 1, 1, 1, mask=torch.sigmoid(om[:, 18:]))


def test_compile_fullgraph():
    torch.manual_seed(0)
    m = _DCN()
    x = torch.randn(2, 4, 7, 9, requires_grad=True)
    eager = m(x)
    (ge,) = torch.autograd.grad(eager.square().sum(), x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (gc,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(gc, ge)


def test_export_dynamic_hw():
    torch.manual_seed(0)
    m = _DCN().eval()
    x = torch.randn(1, 4, 8, 10)
    H = torch.export.Dim("H", min=2, max=512)
    W = torch.export.Dim("W", min=2, max=512)
    ep = torch.export.export(m, (x,), dynamic_shapes={"x": {2: H, 3: W}})
    assert any("tur.deform_conv2d" in str(n.target) for n in ep.graph.nodes)
    for shape in ((1, 4, 8, 10), (1, 4, 13, 5)):
        y = torch.randn(shape)
        torch.testing.assert_close(ep.module()(y), m(y))
