"""The CUDA kernels of the TUR loss (csrc/cuda/tur_loss_cuda.cu) run on the CPU through the CUDA emulation of
tests/cuda_emu/, driven through their plain launch interface (tur_loss_cuda.h) the way tur_loss_cuda_glue.cpp
drives them, and compared with the float64 reference on the CPU tests' cases: loss, per-task statistics, counts
and both gradients, under two scheduling seeds (same bits), into sentinel-filled outputs (every element written),
and on the no-grad path. Then what running them found (issue 12): workspace by tasks present, defined gradients
for out-of-range ids, per-launch error checks; and a mutation check that the harness catches broken kernels."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from torch.utils._pytree import tree_flatten, tree_map

from tur_ext import reference
from tur_ext.loss_common import TURLossOutput, check_finite

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
import cached_build  # noqa: E402

from test_loss import CASES, TOL, make_inputs  # noqa: E402  (the CPU tests' cases, inputs and tolerances)

ROOT = Path(__file__).resolve().parents[1]
# TUR_EMU_KERNELS=path/to/tur_loss_cuda.cu runs the module on another version of the kernels (before/after).
KERNELS = Path(os.environ.get("TUR_EMU_KERNELS", ROOT / "csrc" / "cuda" / "tur_loss_cuda.cu")).resolve()
DRIVER = ROOT / "tests" / "cuda_emu" / "loss_entry.cpp"
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SENTINEL = 512.0  # exact in every dtype, and not a value these inputs produce
SMS = 2  # 16 blocks at most: several blocks, and grid-stride loops for the larger cases

pytestmark = pytest.mark.skipif(
    subprocess.run(["bash", "-c", "command -v g++ objcopy readelf"], capture_output=True).returncode != 0,
    reason="the CUDA emulation needs g++ and binutils",
)


def load(path: os.PathLike) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    P, I64, D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    lib.emu_loss.restype = ctypes.c_char_p
    lib.emu_loss.argtypes = [ctypes.c_int, P, P, P, P, I64, I64, I64, I64, D, D, P, P, P, P, P, P, P, P,
                             ctypes.c_int, ctypes.c_uint, ctypes.POINTER(I64)]
    lib.emu_workspace_bytes.restype = I64
    lib.emu_workspace_bytes.argtypes = [ctypes.c_int, I64, I64, I64, I64, ctypes.c_int]
    lib.emu_launches.restype = ctypes.c_uint64
    lib.emu_set_pending_error.argtypes = [ctypes.c_int]
    lib.emu_fail_launch_in.argtypes = [ctypes.c_uint64]
    return lib


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    return load(cached_build.library(KERNELS, [DRIVER]))


def kernel_layout(pred, target, unc):
    """make_problem's choice (csrc/tur_loss.cpp): the inputs in place when one dense order pairs their elements
    (Cu == C), otherwise contiguous copies with G = C / Cu."""
    B, C = pred.shape[:2]
    per_sample = pred[0].numel()
    dense = all(t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last) for t in (pred, target, unc))
    if unc.shape[1] == C and dense and pred.stride() == target.stride() == unc.stride() and (
        B == 1 or pred.stride(0) == per_sample
    ):
        return pred, target, unc, 1
    return pred.contiguous(), target.contiguous(), unc.contiguous(), C // unc.shape[1]


def run_emu(lib, pred, target, unc, ids, K, *, eps=1e-6, reg=2.0, grad=True, seed=1, sms=SMS) -> dict:
    """One launch_loss on the emulated device into sentinel-filled outputs; raises with the launcher's message."""
    kp, kt, ku, G = kernel_layout(pred, target, unc)
    per_sample = pred[0].numel()
    gdt = torch.float32 if pred.dtype == torch.float16 else pred.dtype  # grad_dtype (csrc/tur_loss.h)
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    loss = torch.full((), SENTINEL, dtype=acc)
    stats = [torch.full((K,), SENTINEL, dtype=acc) for _ in range(4)]
    counts = torch.full((K,), -7, dtype=torch.int64)
    gp = torch.full_like(kp, SENTINEL, dtype=gdt) if grad else None
    gu = torch.full_like(ku, SENTINEL, dtype=gdt) if grad else None
    ids64 = ids.to(torch.int64).contiguous()
    ws = ctypes.c_int64()
    ptr = lambda t: None if t is None else t.data_ptr()
    err = lib.emu_loss(DTYPE_CODE[pred.dtype], ptr(kp), ptr(kt), ptr(ku), ptr(ids64), pred.shape[0], G,
                       per_sample // G, K, eps, reg, ptr(gp), ptr(gu), ptr(loss), *map(ptr, stats),
                       ptr(counts), sms, seed, ctypes.byref(ws))
    if err is not None:
        raise RuntimeError(err.decode())
    out = dict(loss=loss, per_task_loss=stats[0], per_task_l1=stats[1], per_task_weighted_l1=stats[2],
               per_task_reg=stats[3], counts=counts, workspace=ws.value)
    if grad:
        out["grad_pred"] = gp.reshape(pred.shape) if gp.shape != pred.shape else gp
        out["grad_unc"] = gu.reshape(unc.shape) if gu.shape != unc.shape else gu
    return out


STATS = ("per_task_loss", "per_task_l1", "per_task_weighted_l1", "per_task_reg")


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    if not t.is_floating_point():
        return t
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def reference64(pred, target, unc, ids, K, eps, reg):
    p, u = pred.double().requires_grad_(), unc.double().requires_grad_()
    out = reference.task_uncertainty_loss(p, target.double(), u, ids, K, eps=eps, reg_weight=reg, check_finite=False)
    out.loss.backward()
    return out, p.grad, u.grad


def check_case(lib, pred, target, unc, ids, K, *, eps=1e-6, reg=2.0, seeds=(1, 2), no_grad=True) -> None:
    """Asserts: within test_loss's tolerances of the float64 reference, the same bits under each seed, every
    output element written, and (no_grad) the statistics of a gradient-free launch equal to the bit."""
    rtol, gtol = TOL[pred.dtype]
    runs = [run_emu(lib, pred, target, unc, ids, K, eps=eps, reg=reg, seed=s) for s in seeds]
    e = runs[0]
    for other in runs[1:]:
        for name in ("loss", *STATS, "counts", "grad_pred", "grad_unc"):
            assert torch.equal(bits(e[name]), bits(other[name])), f"{name}: bits differ between seeds {seeds}"
    for name in ("loss", *STATS, "grad_pred", "grad_unc"):
        assert not (e[name] == SENTINEL).any(), f"{name}: {int((e[name] == SENTINEL).sum())} element(s) not written"
    ref, rgp, rgu = reference64(pred, target, unc, ids, K, eps, reg)
    assert torch.equal(e["counts"], ref.counts)
    assert torch.allclose(e["loss"].double(), ref.loss.detach(), rtol=rtol, atol=rtol), (e["loss"], ref.loss)
    for name in STATS:
        got, want = e[name].double(), getattr(ref, name)
        assert torch.allclose(got, want, rtol=rtol, atol=rtol), (name, got, want)
    for got, want in ((e["grad_pred"], rgp), (e["grad_unc"], rgu)):
        assert got.dtype == (torch.float32 if pred.dtype == torch.float16 else pred.dtype) and got.shape == want.shape
        err = (got.double() - want).abs().max().item()
        assert err <= gtol * want.abs().max().item(), (err, want.abs().max().item())
    if no_grad:
        n = run_emu(lib, pred, target, unc, ids, K, eps=eps, reg=reg, grad=False, seed=seeds[-1] + 1)
        for name in ("loss", *STATS, "counts"):
            assert torch.equal(bits(n[name]), bits(e[name])), f"no-grad launch: {name} differs"


# ------------------------------------------------------------------------ the CPU tests' cases, emulated


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(lib, case, dtype):
    shape, cu, ids, K = CASES[case]
    pred, target, unc, ids_t = make_inputs(shape, cu, ids, dtype=dtype, seed=hash(case) % 1000)
    # The no-grad path once per case, not per dtype (it shares every kernel but the gradient stores).
    check_case(lib, pred, target, unc, ids_t, K, no_grad=dtype == torch.float32)


@pytest.mark.parametrize("eps,lam", [(0.0, 2.0), (0.05, 0.5), (1e-3, -1.0)])
def test_non_default_eps_and_reg_weight(lib, eps, lam):
    pred, target, unc, ids = make_inputs((6, 3, 9, 10), 1, [0, 2, 2, 0, 0, 1], seed=3)
    check_case(lib, pred, target, unc, ids, 3, eps=eps, reg=lam, no_grad=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("cu", [1, 3])
def test_channels_last(lib, cu, dtype):
    pred, target, unc, ids = make_inputs((4, 3, 10, 12), cu, [0, 1, 0, 1], dtype=dtype, seed=5)
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)
    check_case(lib, cl(pred), cl(target), cl(unc), ids, 2, no_grad=False)


def test_large_k_and_many_blocks(lib):
    """K = 5000 with 6 of them present, and a 132-SM grid (an H200's) whose bits differ from a small grid's only
    within tolerance."""
    pred, target, unc, ids = make_inputs((8, 3, 8, 8), 3, [4999, 0, 17, 17, 2500, 4999, 3, 1234], seed=8)
    check_case(lib, pred, target, unc, ids, 5000, no_grad=False)
    pred, target, unc, ids = make_inputs((3, 3, 40, 40), 1, [1, 0, 1], seed=9)
    a = run_emu(lib, pred, target, unc, ids, 2, sms=132)
    b = run_emu(lib, pred, target, unc, ids, 2, sms=1)
    assert torch.allclose(a["loss"], b["loss"], rtol=1e-6) and torch.equal(a["grad_pred"], b["grad_pred"])


# ------------------------------------------------------------------------- what running the kernels found


def test_workspace_sized_by_tasks_present(lib):
    """Issue 12 (1): scratch grows with min(K, B), not K. Realistic shapes through the .cu's own workspace_bytes
    on 132 SMs: K = 5000 needs what K = 16 needs."""
    Q = 3 * 256 * 256
    k5000 = lib.emu_workspace_bytes(0, 16, 1, Q, 5000, 132)
    k16 = lib.emu_workspace_bytes(0, 16, 1, Q, 16, 132)
    inputs = 3 * 16 * Q * 4  # pred, target, uncertainty in float32
    assert k5000 == k16 and k5000 < inputs / 2, (k5000, k16, inputs)
    assert lib.emu_workspace_bytes(0, 16, 1, Q, 3, 132) < k16  # fewer slots when K < B


def test_out_of_range_ids_give_nan_loss_and_defined_gradients(lib):
    """Issue 12 (2): the loss is NaN, the samples with a bad id get NaN gradient rows, every other element is the
    gradient of the valid samples; none keeps the sentinel. Issue 12 (5): the finiteness check says how many ids
    were out of range."""
    pred, target, unc, ids = make_inputs((5, 3, 6, 7), 1, [0, 1, 3, -1, 1], seed=4)
    e = run_emu(lib, pred, target, unc, ids, 3)
    assert torch.isnan(e["loss"]) and e["counts"].tolist() == [1, 2, 0]
    for name in ("grad_pred", "grad_unc"):
        g = e[name]
        assert not (g == SENTINEL).any()
        assert torch.isnan(g[[2, 3]]).all() and torch.isfinite(g[[0, 1, 4]]).all()
    assert torch.isfinite(torch.stack([e[s] for s in STATS])).all()
    out = TURLossOutput(e["loss"], *(e[s] for s in STATS), e["counts"])
    with pytest.raises(FloatingPointError, match=r"2 of 5 task ids outside \[0, 3\)"):
        check_finite(out, batch_size=5)
    e = run_emu(lib, pred, target, unc, torch.tensor([3, 3, 7, -2, 5]), 3)
    with pytest.raises(FloatingPointError, match=r"no task id in \[0, 3\)"):
        check_finite(TURLossOutput(e["loss"], *(e[s] for s in STATS), e["counts"]), batch_size=5)
    assert torch.isnan(e["grad_pred"]).all() and torch.isnan(e["grad_unc"]).all()


@pytest.mark.parametrize("cu", [1, 3])
def test_fp16_gradients_at_small_uncertainty_stay_finite(lib, cu):
    """Issue 12 (3), on the CUDA kernels: uncertainties near 1e-3, uncertainty gradients in the hundreds (which
    overflowed when stored in float16 times 512 or 1024); stored in float32 now, finite and within tolerance."""
    g = torch.Generator().manual_seed(7)
    pred, target, _, ids = make_inputs((4, 3, 16, 32), cu, [0, 1, 0, 1], dtype=torch.float16)
    unc = (torch.rand((4, cu, 16, 32), generator=g, dtype=torch.float64) * 1e-3 + 5e-4).half()
    e = run_emu(lib, pred, target, unc, ids, 2)
    _, rgp, rgu = reference64(pred, target, unc, ids, 2, 1e-6, 2.0)
    old_scale = 2 ** ((cu * 512).bit_length() - 1)  # the power of two float16 gradients used to be stored times
    assert rgu.abs().max() * old_scale > 65504 > rgu.abs().max()
    for got, want in ((e["grad_pred"], rgp), (e["grad_unc"], rgu)):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        assert (got.double() - want).abs().max() <= TOL[torch.float16][1] * want.abs().max()


class OtherDevice(torch.Tensor):
    """A CPU tensor standing for one on another device (there is no GPU here): an op that mixes it with a plain
    tensor of one or more dims raises, as PyTorch does for CUDA and CPU tensors; ``.cpu()`` gives the plain
    tensor. Lets the comparison helpers be run on results "from the device" without one."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cpu:
            return args[0].as_subclass(torch.Tensor)
        tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        on_other = any(isinstance(x, OtherDevice) for x in tensors)
        if on_other and any(not isinstance(x, OtherDevice) and x.dim() > 0 for x in tensors):
            raise RuntimeError("Expected all tensors to be on the same device (OtherDevice and cpu)")
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if not on_other:
            return out
        return tree_map(lambda x: x.as_subclass(OtherDevice) if type(x) is torch.Tensor else x, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_comparison_helpers_on_cuda_kernel_results(lib, dtype):
    """Issue 19 (1): test_loss's compare_with_reference (what its CUDA cases call on a GPU) on results of the CUDA
    kernels, inputs and outputs on a stand-in device: it compares them on the CPU in float64 and passes them, and
    it fails them once one gradient element is off by 10%."""
    from test_loss import compare_with_reference

    other = lambda t: t.as_subclass(OtherDevice)
    with pytest.raises(RuntimeError, match="same device"):  # the stand-in refuses what a GPU would refuse
        torch.allclose(other(torch.ones(2)), torch.ones(2))
    shape, cu, ids, K = CASES["absent_tasks"]
    pred, target, unc, ids_t = make_inputs(shape, cu, ids, dtype=dtype, seed=1)
    e = run_emu(lib, pred, target, unc, ids_t, K)
    out = TURLossOutput(*(other(e[n]) for n in ("loss", *STATS, "counts")))
    gp, gu = (other(e[n].to(dtype)) for n in ("grad_pred", "grad_unc"))  # what autograd hands back (grad_output 1)
    inputs = [other(t) for t in (pred, target, unc, ids_t)]
    compare_with_reference(out, (gp, -gp, gu), *inputs, K)
    broken = e["grad_unc"].to(dtype)
    flat = broken.view(-1)
    i = int(flat.abs().argmax())
    flat[i] = flat[i] * 1.1
    with pytest.raises(AssertionError):
        compare_with_reference(out, (gp, -gp, other(broken)), *inputs, K)


def test_each_launch_checked_and_stale_errors_not_reported(lib):
    """Issue 12 (4): an error left pending by an earlier runtime call, or by the failed SM-count query the
    launcher handles itself, is not reported; a failing launch is reported by name and stops the sequence."""
    pred, target, unc, ids = make_inputs((3, 3, 6, 6), 3, [0, 1, 1], seed=2)
    want = run_emu(lib, pred, target, unc, ids, 2)
    lib.emu_set_pending_error(1)  # cudaErrorInvalidValue, as a handled failure elsewhere leaves it
    got = run_emu(lib, pred, target, unc, ids, 2)
    assert torch.equal(got["loss"], want["loss"])
    got = run_emu(lib, pred, target, unc, ids, 2, sms=0)  # cudaDeviceGetAttribute fails: fallback grid
    assert torch.allclose(got["loss"], want["loss"], rtol=1e-6)
    before = lib.emu_launches()
    lib.emu_fail_launch_in(2)
    with pytest.raises(RuntimeError, match="task_unc_kernel: invalid configuration argument"):
        run_emu(lib, pred, target, unc, ids, 2)
    assert lib.emu_launches() - before == 2  # nothing launched after the failure
    assert run_emu(lib, pred, target, unc, ids, 2)["loss"] == want["loss"]  # and nothing left pending


# ---------------------------------------------------------------------------------------- mutation check

# Broken copies of the kernels, by text substitution (old text, new text, how many occurrences, what it breaks).
MUTANTS = {
    "block_sum_first_barrier_removed": ("  if (lane == 0) smem[warp] = v;\n  __syncthreads();",
                                        "  if (lane == 0) smem[warp] = v;", 1),
    "block_sum_second_barrier_removed": ("  __syncthreads();  // smem is reused by the next call", "", 1),
    "half_warp_shuffle": ("__shfl_down_sync(0xffffffffu, v, off);\n  if (lane",
                          "__shfl_down_sync(0x0000ffffu, v, off);\n  if (lane", 1),
    "wrong_grid_stride": ("const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;\n  const int64_t q_first",
                          "const int64_t stride = static_cast<int64_t>(blockDim.x);\n  const int64_t q_first", 1),
    "wrong_sample_stride": ("const int64_t base = w.order[j] * G * Q + q;", "const int64_t base = w.order[j] * Q + q;",
                            1),
    "last_present_task_skipped": ("for (int64_t p = 0; p < present; ++p) {\n    double ws",
                                  "for (int64_t p = 0; p + 1 < present; ++p) {\n    double ws", 1),
}

# What a mutant is run on (in a subprocess: the emulator aborts on a barrier or shuffle error).
MUTANT_CASES = [("many_chunks_cu1", torch.float32), ("basic", torch.float64), ("cu1", torch.float16)]


def check_library(path: str) -> None:
    """Entry point of the mutant subprocesses: check_case on MUTANT_CASES with the library at ``path``."""
    lib = load(path)
    for case, dtype in MUTANT_CASES:
        shape, cu, ids, K = CASES[case]
        pred, target, unc, ids_t = make_inputs(shape, cu, ids, dtype=dtype, seed=hash(case) % 1000)
        check_case(lib, pred, target, unc, ids_t, K, no_grad=False)


def run_check(path: Path) -> subprocess.CompletedProcess:
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import test_loss_emu as t; t.check_library({str(path)!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_harness_passes_the_real_kernels(lib):
    res = run_check(cached_build.library(KERNELS, [DRIVER]))
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_mutant_is_caught(mutant, tmp_path):
    old, new, count = MUTANTS[mutant]
    src = KERNELS.read_text()
    assert src.count(old) == count, f"{mutant}: the text to break is no longer in {KERNELS.name}"
    folder = cached_build.BUILD / "mutants" / mutant / "cuda"  # "cuda/" keeps the .cu's own includes working
    folder.mkdir(parents=True, exist_ok=True)
    cu = folder / KERNELS.name
    cu.write_text(src.replace(old, new))
    path = cached_build.library(cu, [DRIVER], name=f"mutant_{mutant}")
    res = run_check(path)
    assert res.returncode != 0, f"{mutant}: the broken kernel passed every check"
    tail = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ""
    assert "Error" in tail or "cuda_emu: error" in res.stderr, res.stderr[-2000:]
