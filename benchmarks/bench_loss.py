"""Forward+backward of the TUR loss, side by side in one run: the fused op (and, on CPU, the fused op held at the
portable SSE2 kernel), the reference, the seed-style loop, torch.compile of the reference, and plain F.l1_loss;
plus a copy of the same bytes for the bandwidth ceiling.

`make bench` runs the target configurations (B=16, 3x128x128, K=5, Cu in {1,3}) and a few around them;
TUR_BENCH_FULL=1 runs the whole grid B in {8,16,32} x {128,256}^2 x K in {3,5,7} x Cu in {1,3}.
benchmarks/summarize.py turns the JSON into the ratio table.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

from loss_variants import VARIANTS, seed_style_loop_loss, fused_loss
from tur_ext import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if os.environ.get("TUR_BENCH_FULL") == "1":
    CONFIGS = list(itertools.product([8, 16, 32], [128, 256], [3, 5, 7], [1, 3]))
elif DEVICE == "cuda":
    CONFIGS = [(16, 128, 5, 1), (16, 128, 5, 3), (32, 256, 5, 1), (32, 256, 5, 3), (32, 256, 7, 3)]
else:
    CONFIGS = [(16, 128, 5, 1), (16, 128, 5, 3), (8, 128, 3, 3), (32, 128, 7, 1), (8, 256, 5, 3)]
# torch.compile costs tens of seconds per shape on 2 CPU cores: only the target shapes get it.
COMPILE_CONFIGS = {(16, 128, 5, 1), (16, 128, 5, 3), (32, 256, 5, 3)}


def make_batch(B, S, K, Cu, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(B, 3, S, S, generator=g).to(DEVICE, dtype)
    target = torch.randn(B, 3, S, S, generator=g).to(DEVICE, dtype)
    unc = (torch.rand(B, Cu, S, S, generator=g) + 0.05).to(DEVICE, dtype)
    ids = torch.arange(B) % K  # every task present, as the task-balanced sampler guarantees
    return pred.requires_grad_(), target, unc.requires_grad_(), ids.to(DEVICE)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def config_id(c):
    B, S, K, Cu = c
    return f"B{B}-{S}px-K{K}-Cu{Cu}"


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_loss_forward_backward(benchmark, config, variant):
    if variant == "compiled_reference" and tuple(config) not in COMPILE_CONFIGS:
        pytest.skip("torch.compile only on the target shapes")
    if variant == "fused_default_simd" and (DEVICE != "cpu" or ops.backend() != "compiled"):
        pytest.skip("SIMD levels are a property of the compiled CPU kernel")
    B, S, K, Cu = config
    pred, target, unc, ids = make_batch(B, S, K, Cu)
    fn = VARIANTS[variant]

    def step():
        loss = fn(pred, target, unc, ids, K)
        loss.backward()
        pred.grad = None
        unc.grad = None
        sync()

    step()  # warm-up (and compilation)
    n = pred.numel()
    nu = unc.numel()
    benchmark.group = config_id(config)
    benchmark.extra_info.update(
        variant=variant, B=B, size=S, K=K, Cu=Cu, device=DEVICE, elements=n, unc_elements=nu,
        # DESIGN.md §2 floor: read pred, target, uncertainty once, write grad_pred and grad_uncertainty once.
        min_bytes=(3 * n + 2 * nu) * pred.element_size(),
    )
    benchmark.pedantic(step, rounds=100 if DEVICE == "cpu" else 50, iterations=1, warmup_rounds=5)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_copy_bandwidth(benchmark, config):
    """The bandwidth ceiling measured in the same run: a plain tensor copy of pred + uncertainty's size."""
    B, S, K, Cu = config
    count = B * 3 * S * S + B * Cu * S * S
    src = torch.rand(count, device=DEVICE)
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)
        sync()

    benchmark.group = config_id(config)
    benchmark.extra_info.update(
        variant="copy", B=B, size=S, K=K, Cu=Cu, device=DEVICE, copy_bytes=2 * count * src.element_size()
    )
    benchmark.pedantic(copy, rounds=100 if DEVICE == "cpu" else 50, iterations=1, warmup_rounds=5)


def test_baselines_agree_with_fused():
    """The loop baseline computes the same loss as the fused op (so the race is between equals)."""
    pred, target, unc, ids = make_batch(6, 32, 3, 1)
    a = fused_loss(pred, target, unc, ids, 3)
    b = seed_style_loop_loss(pred, target, unc, ids, 3)
    assert torch.allclose(a, b, rtol=1e-5)
