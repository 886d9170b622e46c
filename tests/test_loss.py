"""The fused TUR loss against float64 references: values, per-task outputs and gradients, over shapes, dtypes,
layouts and devices; opcheck, gradcheck, determinism, compile, TorchScript and every bad input."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tur_ext
from tur_ext import ops, reference

# ---------------------------------------------------------------------------------------------- helpers


def make_inputs(shape, cu, ids, *, dtype=torch.float32, device="cpu", seed=0):
    """Random pred/target (never zeros) and a positive uncertainty map in [0.05, 1.05)."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=g, dtype=torch.float64)
    target = torch.randn(shape, generator=g, dtype=torch.float64)
    unc = torch.rand((shape[0], cu) + tuple(shape[2:]), generator=g, dtype=torch.float64) + 0.05
    conv = lambda t: t.to(dtype=dtype, device=device)
    return conv(pred), conv(target), conv(unc), torch.tensor(ids, dtype=torch.long, device=device)


def naive_loss(pred, target, unc, ids, K, eps=1e-6, lam=2.0):
    """DESIGN.md §1 written out task by task with Python loops (float64): the oracle of the reference."""
    B, C = pred.shape[:2]
    Cu = unc.shape[1]
    P = pred[0, 0].numel()
    present = [k for k in range(K) if int((ids == k).sum()) > 0]
    total = 0.0
    per_task = {}
    for k in present:
        idx = [i for i in range(B) if int(ids[i]) == k]
        n = len(idx)
        U = sum(unc[i] for i in idx) / n + eps  # (Cu, *S)
        err = sum((pred[i] - target[i]).abs() for i in idx)  # (C, *S)
        E = err.sum(0, keepdim=True) if Cu == 1 else err
        wl1 = (E / U).sum() / (n * C * P)
        m = U.sum() / (Cu * P)
        reg = lam * torch.log(m)
        l1 = err.sum() / (n * C * P)
        per_task[k] = (wl1 + reg, l1, wl1, reg)
        total = total + wl1 + reg
    return total / len(present), per_task


def reference64(pred, target, unc, ids, K, **kw):
    """Float64 reference result and gradients (for pred, target, uncertainty), computed on the CPU whatever the
    inputs' device, so that results from any device compare with it (PyTorch refuses mixed-device ops)."""
    p, t, u = (x.detach().cpu().double().requires_grad_() for x in (pred, target, unc))
    ids = ids.cpu() if isinstance(ids, torch.Tensor) else ids
    out = reference.task_uncertainty_loss(p, t, u, ids, K, **kw)
    out.loss.backward()
    return out, p.grad, t.grad, u.grad


def fused(pred, target, unc, ids, K, grad_target=False, **kw):
    p = pred.detach().clone().requires_grad_()
    t = target.detach().clone().requires_grad_(grad_target)
    u = unc.detach().clone().requires_grad_()
    out = tur_ext.task_uncertainty_loss(p, t, u, ids, K, **kw)
    out.loss.backward()
    return out, p.grad, t.grad, u.grad


TOL = {  # (rtol for values, atol relative to the largest gradient)
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (1e-2, 2e-2),
    torch.float16: (2e-3, 4e-3),
}


def compare_with_reference(out, grads, pred, target, unc, ids, K, **kw):
    """Asserts that a result (a TURLossOutput and the gradients for pred, target, uncertainty, on any device)
    matches the float64 reference within TOL; every comparison is made on the CPU in float64."""
    dtype = pred.dtype
    rtol, gtol = TOL[dtype]
    ref, *ref_grads = reference64(pred, target, unc, ids, K, **kw)
    cpu64 = lambda t: t.detach().cpu().double()
    assert out.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.allclose(cpu64(out.loss), ref.loss.detach(), rtol=rtol, atol=rtol)
    for name in ("per_task_loss", "per_task_l1", "per_task_weighted_l1", "per_task_reg"):
        got, want = cpu64(getattr(out, name)), getattr(ref, name)
        assert torch.allclose(got, want, rtol=rtol, atol=rtol), (name, got, want)
        assert not getattr(out, name).requires_grad
    assert torch.equal(out.counts.cpu(), ref.counts)
    assert out.counts.dtype == torch.long
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype and got.shape == want.shape
        err = (cpu64(got) - want).abs().max().item()
        assert err <= gtol * want.abs().max().item(), (err, want.abs().max().item())


def assert_matches_reference(pred, target, unc, ids, K, **kw):
    out, gp, gt, gu = fused(pred, target, unc, ids, K, grad_target=True, **kw)
    compare_with_reference(out, (gp, gt, gu), pred, target, unc, ids, K, **kw)
    return out


# ------------------------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("cu", [1, 3])
def test_reference_matches_naive_formula(cu):
    pred, target, unc, ids = make_inputs((7, 3, 5, 6), cu, [0, 2, 2, 4, 0, 2, 4], dtype=torch.float64)
    kw = dict(eps=1e-3, reg_weight=1.5)
    ref = reference.task_uncertainty_loss(pred, target, unc, ids, 5, **kw)
    want, per_task = naive_loss(pred, target, unc, ids, 5, eps=1e-3, lam=1.5)
    assert torch.allclose(ref.loss, want, rtol=1e-12)
    for k in range(5):
        expect = per_task.get(k, (0.0, 0.0, 0.0, 0.0))
        got = (ref.per_task_loss[k], ref.per_task_l1[k], ref.per_task_weighted_l1[k], ref.per_task_reg[k])
        for g, e in zip(got, expect):
            assert math.isclose(float(g), float(e), rel_tol=1e-12, abs_tol=1e-14)


def test_reference_gradient_matches_design_formula():
    """DESIGN.md §1's closed-form gradients against autograd through the reference."""
    pred, target, unc, ids = make_inputs((5, 2, 4, 3), 2, [1, 1, 0, 3, 1], dtype=torch.float64)
    K, eps, lam = 4, 1e-6, 2.0
    _, gp, _, gu = reference64(pred, target, unc, ids, K)
    B, C, Cu, P = 5, 2, 2, 12
    present = {0, 1, 3}
    M = len(present)
    for i in range(B):
        k = int(ids[i])
        idx = [j for j in range(B) if int(ids[j]) == k]
        n = len(idx)
        U = sum(unc[j] for j in idx) / n + eps
        E = sum((pred[j] - target[j]).abs() for j in idx)
        m = U.sum() / (Cu * P)
        want_p = torch.sign(pred[i] - target[i]) / (M * n * C * P * U)
        want_u = (-E / (n * C * P * U**2) + lam / (Cu * P * m)) / (M * n)
        assert torch.allclose(gp[i], want_p, rtol=1e-12, atol=1e-15)
        assert torch.allclose(gu[i], want_u, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------- fused op vs the reference

CASES = {
    # name: (shape, Cu, ids, K)
    "basic": ((6, 3, 16, 16), 3, [0, 1, 2, 0, 1, 2], 3),
    "absent_tasks": ((5, 3, 9, 11), 3, [3, 0, 3, 3, 0], 5),
    "single_sample_tasks": ((4, 3, 8, 8), 3, [0, 1, 2, 3], 4),
    "one_task": ((3, 3, 10, 7), 3, [0, 0, 0], 1),
    "cu1": ((6, 3, 12, 13), 1, [2, 0, 2, 1, 1, 0], 3),
    "one_channel": ((5, 1, 17, 9), 1, [0, 1, 1, 0, 1], 2),
    "volume_3d": ((4, 2, 5, 6, 7), 2, [0, 1, 0, 1], 2),
    "volume_3d_cu1": ((4, 2, 5, 6, 7), 1, [1, 1, 0, 1], 3),
    "signal_1d": ((5, 4, 33), 4, [0, 1, 2, 0, 4], 5),
    "many_chunks": ((3, 3, 37, 41), 3, [0, 1, 1], 2),
    "many_chunks_cu1": ((5, 3, 47, 45), 1, [6, 0, 6, 2, 0], 7),
    "batch_of_one": ((1, 3, 7, 5), 3, [2], 3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(case, dtype, device):
    shape, cu, ids, K = CASES[case]
    pred, target, unc, ids_t = make_inputs(shape, cu, ids, dtype=dtype, device=device, seed=hash(case) % 1000)
    out = assert_matches_reference(pred, target, unc, ids_t, K)
    for k in range(K):
        if k not in ids:
            assert out.counts[k] == 0 and out.per_task_loss[k] == 0 and out.per_task_reg[k] == 0


@pytest.mark.parametrize("eps,lam", [(0.0, 2.0), (0.05, 0.5), (1e-6, 0.0), (1e-3, -1.0)])
def test_non_default_eps_and_reg_weight(eps, lam, device):
    pred, target, unc, ids = make_inputs((6, 3, 9, 10), 1, [0, 2, 2, 0, 0, 1], device=device, seed=3)
    assert_matches_reference(pred, target, unc, ids, 3, eps=eps, reg_weight=lam)


def test_int32_ids_and_list_ids(device):
    pred, target, unc, ids = make_inputs((4, 3, 6, 6), 3, [0, 1, 1, 2], device=device)
    a = tur_ext.task_uncertainty_loss(pred, target, unc, ids, 3)
    b = tur_ext.task_uncertainty_loss(pred, target, unc, ids.int(), 3)
    c = tur_ext.task_uncertainty_loss(pred, target, unc, [0, 1, 1, 2], 3)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.loss, c.loss)


# ----------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("cu", [1, 3])
def test_channels_last(cu, device):
    pred, target, unc, ids = make_inputs((4, 3, 10, 12), cu, [0, 1, 0, 1], device=device, seed=5)
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)
    out = assert_matches_reference(cl(pred), cl(target), cl(unc), ids, 2)
    base, gp, _, gu = fused(pred, target, unc, ids, 2)
    got, gp_cl, _, gu_cl = fused(cl(pred), cl(target), cl(unc), ids, 2)
    assert torch.allclose(out.loss, base.loss, rtol=1e-6)
    assert torch.allclose(gp_cl, gp, rtol=1e-6, atol=1e-12) and torch.allclose(gu_cl, gu, rtol=1e-6, atol=1e-12)
    assert gp_cl.is_contiguous(memory_format=torch.channels_last)


def test_strided_and_mixed_layouts(device):
    big_p, big_t, big_u, _ = make_inputs((8, 4, 20, 22), 4, [0] * 8, device=device, seed=6)
    # Every other sample, a channel slice, a spatial crop and a transposed view: none contiguous.
    pred = big_p[::2, 1:4, 2:17, 3:19]
    target = big_t[::2, :3, 1:16, 2:18].transpose(2, 3).contiguous().transpose(2, 3)
    unc = big_u[1::2, :1, 4:19, 5:21]
    ids = torch.tensor([1, 0, 1, 1], device=device)
    assert not pred.is_contiguous() and not unc.is_contiguous()
    assert_matches_reference(pred, target, unc, ids, 2)


# ------------------------------------------------------------------------------- autograd behaviour


def test_gradcheck_float64(device):
    pred, target, unc, ids = make_inputs((5, 2, 3, 4), 1, [0, 2, 0, 1, 2], dtype=torch.float64, device=device)
    inputs = tuple(t.clone().requires_grad_() for t in (pred, target, unc))
    fn = lambda p, t, u: tur_ext.task_uncertainty_loss(p, t, u, ids, 4).loss
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("scale", [3.0, 0.7, 65536.0])
def test_grad_output_scaling(scale, device):
    for dtype in (torch.float32, torch.float16):
        pred, target, unc, ids = make_inputs((4, 3, 8, 8), 1, [0, 1, 1, 0], dtype=dtype, device=device, seed=9)
        _, rgp, _, rgu = reference64(pred, target, unc, ids.cpu(), 2)
        for how in ("multiply", "grad_tensor"):
            p, u = pred.clone().requires_grad_(), unc.clone().requires_grad_()
            out = tur_ext.task_uncertainty_loss(p, target, u, ids, 2)
            if how == "multiply":
                (scale * out.loss).backward()
            else:
                out.loss.backward(torch.tensor(scale, device=device))
            tol = TOL[dtype][1]
            for got, want in ((p.grad, rgp), (u.grad, rgu)):
                want = want * scale
                assert (got.double().cpu() - want).abs().max() <= tol * want.abs().max()


def test_fp16_gradients_are_not_subnormal(device):
    """Gradients of order 1/(C*P) must keep float16 precision (the op keeps them in float32, see grad_dtype in
    csrc/tur_loss.h, and autograd rounds grad * grad_output to float16 once)."""
    pred, target, unc, ids = make_inputs((4, 3, 64, 64), 3, [0, 1, 0, 1], dtype=torch.float16, device=device)
    out, gp, _, gu = fused(pred, target, unc, ids, 2)
    _, rgp, _, rgu = reference64(pred, target, unc, ids.cpu(), 2)
    scale = 65536.0  # an AMP loss scale brings these gradients into float16's normal range
    p = pred.clone().requires_grad_()
    tur_ext.task_uncertainty_loss(p, target, unc, ids, 2).loss.backward(torch.tensor(scale, device=device))
    rel = ((p.grad.double().cpu() - rgp * scale).abs() / (rgp * scale).abs().clamp(min=1e-30)).max()
    assert rel < 2e-3, rel
    assert p.grad.dtype == torch.float16


@pytest.mark.skipif(ops.backend() != "compiled", reason="needs the compiled op")
@pytest.mark.parametrize("cu", [1, 3])
def test_fp16_gradients_at_small_uncertainty_stay_finite(cu, device):
    """Issue 12 (3): uncertainties near 1e-3 give uncertainty gradients in the hundreds, which fit in float16
    but overflowed when stored times a power of two near Cu*P (512 or 1024 here). Every gradient element is
    finite and within tolerance of the float64 reference, with and without an AMP-style grad_output."""
    g = torch.Generator().manual_seed(7)
    pred, target, _, ids = make_inputs((4, 3, 16, 32), cu, [0, 1, 0, 1], dtype=torch.float16, device=device)
    unc = (torch.rand((4, cu, 16, 32), generator=g, dtype=torch.float64) * 1e-3 + 5e-4).half().to(device)
    _, rgp, _, rgu = reference64(pred, target, unc, ids, 2)
    old_scale = 2 ** ((cu * 512).bit_length() - 1)  # the power of two float16 gradients used to be stored times
    assert rgu.abs().max() * old_scale > 65504 > rgu.abs().max()
    # An AMP-style grad_output too, the largest power of two that keeps the products representable.
    amp = 2.0 ** math.floor(math.log2(32768 / rgu.abs().max().item()))
    assert amp >= 2
    for grad_out in (1.0, amp):
        p, u = pred.clone().requires_grad_(), unc.clone().requires_grad_()
        tur_ext.task_uncertainty_loss(p, target, u, ids, 2).loss.backward(torch.tensor(grad_out, device=device))
        for got, want in ((p.grad, rgp * grad_out), (u.grad, rgu * grad_out)):
            assert got.dtype == torch.float16 and torch.isfinite(got).all()
            err = (got.double().cpu() - want).abs().max().item()
            assert err <= TOL[torch.float16][1] * want.abs().max().item(), (err, want.abs().max().item())
    raw = torch.ops.tur.task_uncertainty_loss(pred, target, unc, ids, 2, 1e-6, 2.0, True)
    assert raw[6].dtype == raw[7].dtype == torch.float32  # what the op hands autograd for float16 inputs


def test_target_gradient_is_negated_pred_gradient(device):
    pred, target, unc, ids = make_inputs((3, 3, 6, 5), 3, [0, 1, 0], device=device)
    _, gp, gt, _ = fused(pred, target, unc, ids, 2, grad_target=True)
    assert torch.equal(gt, -gp)


def test_only_loss_is_differentiable_and_grads_not_written_into_inputs(device):
    pred, target, unc, ids = make_inputs((3, 3, 6, 5), 3, [0, 1, 0], device=device)
    before = [t.clone() for t in (pred, target, unc)]
    p, u = pred.clone().requires_grad_(), unc.clone().requires_grad_()
    out = tur_ext.task_uncertainty_loss(p, target, u, ids, 2)
    assert out.loss.requires_grad
    assert all(not t.requires_grad for t in out[1:])
    out.loss.backward()
    for a, b in zip((p.detach(), target, u.detach()), before):
        assert torch.equal(a, b)


def test_double_backward_raises(device):
    pred, target, unc, ids = make_inputs((3, 3, 6, 5), 3, [0, 1, 0], dtype=torch.float64, device=device)
    p = pred.clone().requires_grad_()
    loss = tur_ext.task_uncertainty_loss(p, target, unc, ids, 2).loss
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, p, create_graph=True)


class RecordOpCalls(TorchDispatchMode):
    """Records the arguments of every tur.task_uncertainty_loss call that reaches the dispatcher."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.startswith("task_uncertainty_loss"):
            self.calls.append((args, out))
        return out


@pytest.mark.skipif(ops.backend() != "compiled", reason="needs the compiled op")
def test_no_grad_writes_no_gradients(device):
    pred, target, unc, ids = make_inputs((4, 3, 8, 8), 1, [0, 1, 0, 1], device=device)
    p = pred.clone().requires_grad_()
    with RecordOpCalls() as rec, torch.no_grad():
        out = tur_ext.task_uncertainty_loss(p, target, unc, ids, 2)
    (args, result), = rec.calls
    assert args[7] is False and result[6].numel() == 0 and result[7].numel() == 0
    assert not out.loss.requires_grad
    with RecordOpCalls() as rec:  # no input requires grad: no gradients either
        tur_ext.task_uncertainty_loss(pred, target, unc, ids, 2)
    assert rec.calls[0][0][7] is False
    with_grad = tur_ext.task_uncertainty_loss(p, target, unc, ids, 2)
    assert torch.equal(with_grad.loss.detach(), out.loss)


@pytest.mark.skipif(ops.backend() != "compiled", reason="needs the compiled op")
def test_raw_op_without_grad_refuses_backward():
    pred, target, unc, ids = make_inputs((2, 3, 4, 4), 3, [0, 1])
    p = pred.clone().requires_grad_()
    loss = torch.ops.tur.task_uncertainty_loss(p, target, unc, ids, 2, 1e-6, 2.0, False)[0]
    with pytest.raises(RuntimeError, match="compute_grad=False"):
        loss.backward()


# ----------------------------------------------------------------------------- determinism, opcheck


def test_deterministic_bits_across_runs_and_thread_counts(device):
    pred, target, unc, ids = make_inputs((8, 3, 61, 67), 1, [0, 1, 2, 3, 4, 0, 1, 2], device=device, seed=11)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, threads, threads, 3):
            torch.set_num_threads(n)
            out, gp, _, gu = fused(pred, target, unc, ids, 5)
            results.append((out.loss, out.per_task_loss, gp, gu))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.skipif(ops.backend() != "compiled", reason="needs the compiled op")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["basic", "cu1", "absent_tasks", "many_chunks", "many_chunks_cu1"])
def test_cpu_simd_levels_match_reference_and_each_other(case, dtype):
    """Every SIMD level of the CPU kernel this machine runs: within the reference's tolerance, and bitwise equal
    to each other (fixed-lane sums, no contraction), gradients included."""
    levels = ops.cpu_capabilities()
    assert levels[0] == "default"
    shape, cu, ids, K = CASES[case]
    pred, target, unc, ids_t = make_inputs(shape, cu, ids, dtype=dtype, seed=5)
    results = []
    for level in levels:
        with ops.cpu_capability(level):
            out = assert_matches_reference(pred, target, unc, ids_t, K)
            _, gp, _, gu = fused(pred, target, unc, ids_t, K)
        results.append((out.loss, out.per_task_loss, out.per_task_l1, out.per_task_weighted_l1, gp, gu))
    for level, other in zip(levels[1:], results[1:]):
        for a, b in zip(results[0], other):
            assert torch.equal(a, b), level


@pytest.mark.skipif(ops.backend() != "compiled", reason="needs the compiled op")
def test_cpu_capability_selection_and_errors():
    import os
    import subprocess
    import sys

    best = ops.cpu_capabilities()[-1]
    assert ops.build_info()["cpu_capability"] == best
    with ops.cpu_capability("default"):
        assert ops.build_info()["cpu_capability"] == "default"
    assert ops.build_info()["cpu_capability"] == best
    with pytest.raises(ValueError, match="capability: expected one of default, avx2, avx512, got 'sse9'"):
        with ops.cpu_capability("sse9"):
            pass
    script = "from tur_ext import ops; print(ops.build_info()['cpu_capability'])"
    run = lambda value: subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, "TUR_CPU_CAPABILITY": value}, capture_output=True, text=True
    )
    assert run("default").stdout.strip() == "default"
    bad = run("fast")
    assert bad.returncode != 0 and "TUR_CPU_CAPABILITY: expected one of default, avx2, avx512, got 'fast'" in bad.stderr


def opcheck_samples(device):
    samples = []
    for dtype in (torch.float32, torch.float64):
        for shape, cu, ids, K in (CASES["basic"], CASES["cu1"], CASES["absent_tasks"], CASES["volume_3d"]):
            pred, target, unc, ids_t = make_inputs(shape, cu, ids, dtype=dtype, device=device)
            for need_grad in (True, False):
                args = (
                    pred.clone().requires_grad_(need_grad),
                    target,
                    unc.clone().requires_grad_(need_grad),
                    ids_t,
                    K,
                    1e-6,
                    2.0,
                    need_grad,
                )
                samples.append(args)
    # float16: the op returns float32 gradients (grad_dtype in csrc/tur_loss.h), which the fake kernel must say.
    pred, target, unc, ids_t = make_inputs(CASES["cu1"][0], 1, CASES["cu1"][2], dtype=torch.float16, device=device)
    for need_grad in (True, False):
        samples.append((pred.clone().requires_grad_(need_grad), target, unc.clone().requires_grad_(need_grad), ids_t,
                        CASES["cu1"][3], 1e-6, 2.0, need_grad))
    return samples


@pytest.mark.skipif(ops.backend() != "compiled", reason="needs the compiled op")
def test_opcheck(device):
    for args in opcheck_samples(device):
        torch.library.opcheck(torch.ops.tur.task_uncertainty_loss.default, args)


@pytest.mark.skipif(ops.backend() != "compiled", reason="needs the compiled op")
def test_torch_compile_fullgraph(device):
    pred, target, unc, ids = make_inputs((6, 3, 12, 12), 1, [0, 1, 2, 0, 1, 2], device=device, seed=2)

    def step(p, t, u, ids):
        out = tur_ext.task_uncertainty_loss(p * 1.5, t, u.exp(), ids, 3)
        return out.loss * 2.0, out.per_task_loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        p, u = pred.clone().requires_grad_(), unc.clone().requires_grad_()
        loss, per_task = fn(p, target, u, ids)
        loss.backward()
        results.append((loss.detach(), per_task, p.grad, u.grad))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.skipif(ops.backend() != "compiled", reason="needs the compiled op")
def test_torchscript_can_call_the_op(device):
    @torch.jit.script
    def scripted(pred: torch.Tensor, target: torch.Tensor, unc: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.tur.task_uncertainty_loss(pred, target, unc, ids, 3, 1e-6, 2.0, False)[0]

    pred, target, unc, ids = make_inputs((3, 3, 5, 5), 1, [0, 2, 2], device=device)
    want = tur_ext.task_uncertainty_loss(pred, target, unc, ids, 3).loss
    assert torch.equal(scripted(pred, target, unc, ids), want)


# ------------------------------------------------------------------------------------- bad inputs

BACKENDS = [
    pytest.param(tur_ext.task_uncertainty_loss, id="api"),
    pytest.param(reference.task_uncertainty_loss, id="reference"),
]


def _bad_cases():
    ok = make_inputs((4, 3, 6, 6), 3, [0, 1, 1, 0])
    p, t, u, ids = ok
    yield "pred_rank", (p[:, :, 0, 0], t[:, :, 0, 0], u[:, :, 0, 0], ids, 2), {}, ValueError, "pred"
    yield "target_shape", (p, t[:, :, :5], u, ids, 2), {}, ValueError, "target"
    yield "unc_channels", (p, t, u[:, :2], ids, 2), {}, ValueError, "uncertainty"
    yield "unc_spatial", (p, t, u[:, :, :5], ids, 2), {}, ValueError, "uncertainty"
    yield "unc_batch", (p, t, u[:3], ids, 2), {}, ValueError, "uncertainty"
    yield "ids_out_of_range", (p, t, u, torch.tensor([0, 1, 2, 0]), 2), {}, ValueError, "task_ids"
    yield "ids_negative", (p, t, u, torch.tensor([0, -1, 1, 0]), 2), {}, ValueError, "task_ids"
    yield "ids_length", (p, t, u, torch.tensor([0, 1, 1]), 2), {}, ValueError, "task_ids"
    yield "ids_rank", (p, t, u, ids[None], 2), {}, ValueError, "task_ids"
    yield "num_tasks_zero", (p, t, u, ids, 0), {}, ValueError, "num_tasks"
    yield "empty_batch", (p[:0], t[:0], u[:0], ids[:0], 2), {}, ValueError, "pred"
    yield "negative_eps", (p, t, u, ids, 2), {"eps": -1e-3}, ValueError, "eps"
    yield "mixed_dtype_target", (p, t.double(), u, ids, 2), {}, ValueError, "dtype"
    yield "mixed_dtype_unc", (p, t, u.half(), ids, 2), {}, ValueError, "dtype"
    yield "int_pred", (p.long(), t.long(), u.long(), ids, 2), {}, TypeError, "pred"
    yield "float_ids", (p, t, u, ids.float(), 2), {}, TypeError, "task_ids"
    yield "str_ids", (p, t, u, ["a", "b", "c", "d"], 2), {}, TypeError, "task_ids"


@pytest.mark.parametrize("fn", BACKENDS)
@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[0])
def test_bad_input_errors(case, fn):
    _, args, kw, exc, word = case
    with pytest.raises(exc, match=word):
        fn(*args, **kw)


@pytest.mark.skipif(ops.backend() != "compiled", reason="needs the compiled op")
@pytest.mark.parametrize("case", list(_bad_cases())[:13], ids=lambda c: c[0])
def test_raw_op_checks(case):
    """The C++ op checks its arguments itself (for TorchScript and C++ callers) with the same exception types."""
    _, (p, t, u, ids, K), kw, exc, word = case
    with pytest.raises(exc, match=word):
        torch.ops.tur.task_uncertainty_loss(p, t, u, ids, K, kw.get("eps", 1e-6), 2.0, True)


def test_non_finite_raises_naming_the_task(device):
    pred, target, unc, ids = make_inputs((4, 3, 6, 6), 3, [0, 1, 2, 1], device=device)
    pred[3, 0, 2, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="task 1"):
        tur_ext.task_uncertainty_loss(pred, target, unc, ids, 3)
    out = tur_ext.task_uncertainty_loss(pred, target, unc, ids, 3, check_finite=False)
    assert torch.isnan(out.loss) and torch.isfinite(out.per_task_loss[[0, 2]]).all()
    module = tur_ext.TaskUncertaintyLoss(["denoise_15", "derain", "dehaze"])
    with pytest.raises(FloatingPointError, match="task 1 \\('derain'\\)"):
        module(pred, target, unc, ids)


# ----------------------------------------------------------------------------------------- module


def test_module_accepts_names_ids_and_counts(device):
    pred, target, unc, ids = make_inputs((4, 3, 6, 6), 1, [0, 4, 4, 2], device=device)
    module = tur_ext.TaskUncertaintyLoss("3task", eps=1e-4, reg_weight=1.0)
    names = ["denoise_15", "dehaze", "dehaze", "denoise_50"]
    by_name = module(pred, target, unc, names)
    by_id = module(pred, target, unc, ids)
    want = tur_ext.task_uncertainty_loss(pred, target, unc, ids, 5, eps=1e-4, reg_weight=1.0)
    assert torch.equal(by_name.loss, want.loss) and torch.equal(by_id.loss, want.loss)
    assert tur_ext.TaskUncertaintyLoss(5)(pred, target, unc, ids).counts.tolist() == [1, 0, 1, 0, 2]
    with pytest.raises(ValueError, match="unknown task name 'rain'"):
        module(pred, target, unc, ["denoise_15", "rain", "dehaze", "dehaze"])
    with pytest.raises(ValueError, match="eps"):
        tur_ext.TaskUncertaintyLoss(3, eps=-1.0)


def test_backend_and_build_info():
    info = ops.build_info()
    assert info["backend"] == ops.backend()
    if ops.backend() == "compiled":
        assert {"cuda", "cuda_archs", "openmp", "threads", "simd", "cpu_capability", "torch_version"} <= set(info)
        assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]


@pytest.mark.parametrize("require", ["0", "1"])
def test_missing_extension_falls_back_or_fails(require, tmp_path):
    """Without tur_ext._C the package warns once and uses the reference; TUR_REQUIRE_COMPILED=1 makes it fail."""
    import os
    import subprocess
    import sys

    script = (
        "import sys, warnings\n"
        "sys.modules['tur_ext._C'] = None\n"  # makes `from . import _C` raise ImportError, as a missing build does
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import tur_ext, tur_ext.ops\n"
        "    import torch\n"
        "    out = tur_ext.task_uncertainty_loss(torch.rand(2,3,4,4), torch.rand(2,3,4,4), torch.rand(2,1,4,4)+.1, [0,1], 2)\n"
        "print(tur_ext.ops.backend(), sum('not built' in str(x.message) for x in w), float(out.loss) == float(out.loss))\n"
    )
    env = dict(os.environ, TUR_REQUIRE_COMPILED=require)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    if require == "1":
        assert res.returncode != 0 and "TUR_REQUIRE_COMPILED=1" in res.stderr
    else:
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == ["reference", "1", "True"]


# --------------------------------------------------------------------- CUDA: bad inputs, device-side ids

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _on_cuda(x):
    return x.cuda() if isinstance(x, torch.Tensor) else x


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("fn", BACKENDS)
@pytest.mark.parametrize("case", [c for c in _bad_cases() if not c[0].startswith("ids_")], ids=lambda c: c[0])
def test_bad_input_errors_cuda(case, fn):
    """The same errors as on the CPU for every bad argument that needs no read of device memory."""
    _, args, kw, exc, word = case
    with pytest.raises(exc, match=word):
        fn(*map(_on_cuda, args), **kw)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("case", [c for c in _bad_cases() if c[0].startswith("ids_") and c[0] != "ids_rank"],
                         ids=lambda c: c[0])
def test_bad_host_ids_with_cuda_inputs(case):
    """Ids on the host are range-checked before they move to the device: the CPU's ValueError."""
    _, (p, t, u, ids, K), kw, exc, word = case
    with pytest.raises(exc, match=word):
        tur_ext.task_uncertainty_loss(p.cuda(), t.cuda(), u.cuda(), ids, K, **kw)


@pytest.mark.cuda
@needs_cuda
def test_device_ids_out_of_range():
    """Device ids are range-checked by the kernel: a NaN loss, NaN gradient rows for the bad samples, the valid
    rows as without them, and a finiteness check that says how many ids were out of range."""
    pred, target, unc, _ = make_inputs((4, 3, 6, 6), 1, [0, 1, 1, 0], device="cuda")
    ids = torch.tensor([0, 1, 3, -1], device="cuda")
    with pytest.raises(FloatingPointError, match=r"2 of 4 task ids outside \[0, 2\)"):
        tur_ext.task_uncertainty_loss(pred, target, unc, ids, 2)
    p, u = pred.clone().requires_grad_(), unc.clone().requires_grad_()
    out = tur_ext.task_uncertainty_loss(p, target, u, ids, 2, check_finite=False)
    out.loss.backward()
    assert torch.isnan(out.loss) and out.counts.tolist() == [1, 1]
    for g in (p.grad, u.grad):
        assert torch.isnan(g[2:]).all() and torch.isfinite(g[:2]).all()
    with pytest.raises(FloatingPointError, match=r"no task id in \[0, 2\)"):
        tur_ext.task_uncertainty_loss(pred, target, unc, torch.tensor([2, 5, -1, 9], device="cuda"), 2)


# ------------------------------------------------------------------------ no host sync with check_finite=False


class CountScalarReads(TorchDispatchMode):
    """Counts the ops that copy a value to the host (item(), bool(), tolist(), nonzero's size): each one is a
    host synchronisation when the tensor lives on a GPU."""

    SYNCING = {"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "allclose"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNCING:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(ops.backend() != "compiled", reason="needs the compiled op")
def test_check_finite_false_reads_nothing_back_cpu():
    """The README's claim, checked where no GPU is: with check_finite=False the forward (function and module)
    issues no op that reads a value back, with True exactly the finiteness check does. (CPU backward reads
    grad_output once to skip a multiply by 1; that branch is CPU-only, see tur_ext/ops.)"""
    pred, target, unc, ids = make_inputs((4, 3, 8, 8), 1, [0, 1, 0, 1])
    p = pred.clone().requires_grad_()
    module = tur_ext.TaskUncertaintyLoss(2, check_finite=False)
    with CountScalarReads() as mode:
        tur_ext.task_uncertainty_loss(p, target, unc, ids, 2, check_finite=False)
        module(p, target, unc, ids)
    assert mode.reads == []
    with CountScalarReads() as mode:
        tur_ext.task_uncertainty_loss(p, target, unc, ids, 2, check_finite=True)
    assert mode.reads, "the counting mode saw no read even for the check that makes one"


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_check_finite_false_has_no_host_sync_cuda(dtype):
    """Forward and backward on device tensors (device ids) under torch.cuda.set_sync_debug_mode("error")."""
    pred, target, unc, ids = make_inputs((4, 3, 16, 16), 1, [0, 2, 0, 1], dtype=dtype, device="cuda")
    p, u = pred.clone().requires_grad_(), unc.clone().requires_grad_()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = tur_ext.task_uncertainty_loss(p, target, u, ids, 3, check_finite=False)
        (out.loss * 2.0).backward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.isfinite(out.loss) and p.grad is not None and u.grad is not None
