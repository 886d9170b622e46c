"""Forward+backward of DCNv2 at AirNet's layer size (B=2, 64 -> 64 channels, 96x96, 3x3, stride 1, padding 1, one
group, one offset group, with mask), fp32, side by side in one run: tur.deform_conv2d, the pure-PyTorch reference
(tests/deform_conv_reference.py) and F.conv2d of the same shape. The last test prints the ratios (and writes
results/bench_dcn_<device>.md). Targets on CPU: >= 10x faster than the reference, <= 4x conv2d.

The work, per image: a column buffer of C*kh*kw x H_out*W_out = 576 x 9216 (5.3 M values, 21 MB in fp32), each
value 4 bilinear gathers; GEMMs of 2*64*576*9216 = 0.68 GFLOP forward and twice that backward, so 2 GFLOP per
image, 4.1 GFLOP per call. conv2d (oneDNN) does the same GEMM flops without the gathers or the 21 MB buffers.

    python -m pytest -q benchmarks/bench_dcn.py
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from tur_ext import ops

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from deform_conv_reference import deform_conv2d as reference_dcn  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, C, H, W, K = 2, 64, 96, 96, 3
RESULTS: dict[str, float] = {}


def make_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, W, generator=g)
    off = (torch.rand(B, 2 * K * K, H, W, generator=g) * 2 - 1) * 2.0
    mask = torch.rand(B, K * K, H, W, generator=g)
    w = torch.randn(C, C, K, K, generator=g) / (C * K * K) ** 0.5
    b = torch.randn(C, generator=g)
    conv = lambda t: t.to(DEVICE).requires_grad_()
    return conv(x), conv(off), conv(mask), conv(w), conv(b)


def _dcn(x, off, mask, w, b):
    return ops.deform_conv2d(x, off, w, b, 1, 1, 1, mask=mask)


def _reference(x, off, mask, w, b):
    return reference_dcn(x, off, w, b, 1, 1, 1, mask=mask)


def _conv2d(x, off, mask, w, b):
    return F.conv2d(x, w, b, 1, 1, 1)


VARIANTS = {"deform_conv2d": _dcn, "reference": _reference, "conv2d": _conv2d}


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dcn_forward_backward(benchmark, variant):
    x, off, mask, w, b = make_inputs()
    fn = VARIANTS[variant]
    go = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def step():
        for t in (x, off, mask, w, b):
            t.grad = None
        fn(x, off, mask, w, b).backward(go)
        sync()

    rounds = 3 if variant == "reference" else 10
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)
    RESULTS[variant] = benchmark.stats.stats.median


def _step(variant, inputs, go):
    for t in inputs:
        t.grad = None
    VARIANTS[variant](*inputs).backward(go)
    sync()


def test_ratios():
    """The ratios, from rounds of the three variants interleaved (op, reference, conv2d, op, ...), so that the
    load of a shared machine falls on all three alike; the pytest-benchmark medians above are printed beside."""
    if len(RESULTS) < len(VARIANTS):
        pytest.skip("run the whole file: the table needs every variant's pytest-benchmark time")
    inputs = make_inputs()
    go = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(5):
        for v in VARIANTS:
            t0 = time.perf_counter()
            _step(v, inputs, go)
            times[v].append(time.perf_counter() - t0)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    op, ref, conv = med["deform_conv2d"], med["reference"], med["conv2d"]
    lines = [
        f"DCNv2 forward+backward, {DEVICE}, B={B}, {C}->{C}, {H}x{W}, {K}x{K}, fp32, {torch.get_num_threads()} threads",
        "",
        "| variant | interleaved median ms | vs deform_conv2d | pytest-benchmark median ms |",
        "|---|---|---|---|",
    ]
    for name in VARIANTS:
        lines.append(f"| {name} | {med[name] * 1e3:.1f} | {med[name] / op:.2f}x | {RESULTS[name] * 1e3:.1f} |")
    lines += ["", f"reference / op = {ref / op:.1f}x (target >= 10x); op / conv2d = {op / conv:.2f}x (target <= 4x)"]
    text = "\n".join(lines)
    print("\n" + text)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"bench_dcn_{DEVICE}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text + "\n")
