"""The DCNv2 CUDA kernels (csrc/cuda/deform_conv2d_cuda.cu) run on the CPU CUDA emulator (tests/cuda_emu/), driven
through their plain launch interface (deform_conv2d_cuda.h) by tests/cuda_emu/dcn_entry.cpp, with the glue's
flow (deform_conv2d_cuda_glue.cpp) written out here: per image im2col, the GEMMs (torch.mm, as at::mm there),
col2im and the offset/mask gradient. Compared with the float64 reference on inputs rounded to each dtype; every
case runs under two scheduling seeds: same bits for the columns, the output and the offset/mask gradients; the input
gradient (col2im scatters with atomicAdd, csrc/cuda/deform_conv2d_cuda.cu says why) differs in its last bits,
since the emulator runs the blocks in a seeded order, as a GPU's schedule would reorder the atomics; outputs
are sentinel-filled before each launch and must be fully overwritten."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from deform_conv_reference import deform_conv2d as reference_dcn  # noqa: E402
from deform_conv_reference import sample_columns  # noqa: E402
from test_deform_conv import make_case, rel_err  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = os.path.join(ROOT, "build", "cuda_emu", "libdcn_emu_contract.so")
SOURCES = [os.path.join(ROOT, p) for p in ("csrc/cuda/deform_conv2d_cuda.cu", "csrc/cuda/deform_conv2d_cuda.h",
                                           "tests/cuda_emu/dcn_entry.cpp", "tests/cuda_emu/cuda_emu.h",
                                           "tests/cuda_emu/cuda_emu.cpp", "csrc/cuda/tur_loss_cuda.h")]
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
SENTINEL = 512.0  # exact in every dtype, not a value these inputs produce
SMS = 4


def _needs_build() -> bool:
    if not os.path.exists(LIB):
        return True
    built = os.path.getmtime(LIB)
    return any(os.path.getmtime(p) > built for p in SOURCES)


@pytest.fixture(scope="module")
def lib():
    if shutil.which("g++") is None or shutil.which("objcopy") is None:
        pytest.skip("the CUDA emulator needs g++ and binutils")
    if _needs_build():
        subprocess.run(["bash", "tests/cuda_emu/build.sh", LIB, "csrc/cuda/deform_conv2d_cuda.cu",
                        "tests/cuda_emu/dcn_entry.cpp", "--", "-I", "csrc"], cwd=ROOT, check=True,
                       capture_output=True)
    L = ctypes.CDLL(LIB)
    P, U = ctypes.c_void_p, ctypes.c_uint
    for name, n_ptrs in (("emu_dcn_im2col", 1), ("emu_dcn_col2im", 2), ("emu_dcn_offset_mask_grad", 3)):
        fn = getattr(L, name)
        fn.restype = ctypes.c_char_p
        fn.argtypes = [ctypes.c_int, P, P, P, P] + [P] * n_ptrs + [ctypes.c_int, U]
    return L


def _ptr(t):
    return None if t is None else t.data_ptr()


def _check(err):
    if err is not None:
        raise RuntimeError(err.decode())


def run_kernels(L, case, grad_out, seed):
    """The CUDA glue's forward and backward with the emulated kernels; returns out, the five gradients, cols."""
    x, off, w, b, m = (case[k] for k in ("input", "offset", "weight", "bias", "mask"))
    dtype = x.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    B, C, H, W = x.shape
    Cout, cg, kh, kw = w.shape
    G, kk = C // cg, kh * kw
    og = off.shape[1] // (2 * kk)
    Ho, Wo = off.shape[2:]
    P = Ho * Wo
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
    (sh, sw), (ph, pw), (dh, dw) = pair(case["stride"]), pair(case["padding"]), pair(case["dilation"])
    dims = torch.tensor([C, H, W, kh, kw, og, sh, sw, ph, pw, dh, dw, Ho, Wo], dtype=torch.int64)
    code = DTYPE_CODE[dtype]
    w2 = w.to(acc).reshape(G, Cout // G, cg * kk)
    go = grad_out.to(acc)
    out = torch.empty(B, Cout, P, dtype=acc)
    g_in = torch.full((B, C, H, W), SENTINEL, dtype=acc)
    g_off = torch.full_like(off, SENTINEL)
    g_mask = torch.full_like(m, SENTINEL) if m is not None else None
    g_w = torch.zeros(G, Cout // G, cg * kk, dtype=acc)
    all_cols = []
    for i in range(B):
        xi, oi, mi = x[i].contiguous(), off[i].contiguous(), (m[i].contiguous() if m is not None else None)
        cols = torch.full((C * kk, P), SENTINEL, dtype=acc)
        _check(L.emu_dcn_im2col(code, _ptr(xi), _ptr(oi), _ptr(mi), _ptr(dims), _ptr(cols), SMS, seed))
        all_cols.append(cols.clone())
        grad_cols = torch.empty(C * kk, P, dtype=acc)
        gi = go[i].reshape(G, Cout // G, P)
        for g in range(G):
            rows = slice(g * cg * kk, (g + 1) * cg * kk)
            out[i, g * (Cout // G):(g + 1) * (Cout // G)] = w2[g] @ cols[rows]
            grad_cols[rows] = w2[g].t() @ gi[g]
            g_w[g] += gi[g] @ cols[rows].t()
        gin_i = g_in[i]  # a view: the kernel writes into g_in
        _check(L.emu_dcn_col2im(code, _ptr(xi), _ptr(oi), _ptr(mi), _ptr(dims), _ptr(grad_cols), _ptr(gin_i), SMS,
                                seed))
        goff_i = torch.full_like(oi, SENTINEL)
        gm_i = torch.full_like(mi, SENTINEL) if mi is not None else None
        _check(L.emu_dcn_offset_mask_grad(code, _ptr(xi), _ptr(oi), _ptr(mi), _ptr(dims), _ptr(grad_cols),
                                          _ptr(goff_i), _ptr(gm_i), SMS, seed))
        g_off[i] = goff_i
        if gm_i is not None:
            g_mask[i] = gm_i
    if b is not None:
        out += b.to(acc)[None, :, None]
    grads = {"input": g_in, "offset": g_off, "weight": g_w.reshape(w.shape), "bias": go.sum((0, 2, 3)),
             "mask": g_mask}
    return out.reshape(B, Cout, Ho, Wo), grads, torch.stack(all_cols)


def reference64(case, grad_out):
    leaves = {k: (v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    out = reference_dcn(leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"], case["stride"],
                        case["padding"], case["dilation"], mask=leaves["mask"])
    out.backward(grad_out.double())
    cols = sample_columns(leaves["input"].detach(), leaves["offset"].detach(),
                          None if leaves["mask"] is None else leaves["mask"].detach(), case["weight"].shape[2],
                          case["weight"].shape[3], case["stride"], case["padding"], case["dilation"])
    grads = {k: (leaves[k].grad if leaves[k] is not None else None) for k in ("input", "offset", "weight", "bias",
                                                                              "mask")}
    return out.detach(), grads, cols


CASES = {
    "basic": dict(B=2, C=4, Cout=4, H=5, W=7),
    "stride2_groups2": dict(B=1, C=4, Cout=4, groups=2, stride=2, H=7, W=6),
    "dilation2_og2": dict(B=1, C=4, Cout=2, og=2, dilation=2, padding=2, H=6, W=5),
    "kernel3x5_far_nomask": dict(B=1, C=2, Cout=3, kh=3, kw=5, padding=(1, 2), offset_scale=5.0, with_mask=False,
                                 H=4, W=6),
}
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernels_against_reference(lib, name, dtype):
    case = make_case(**CASES[name], dtype=dtype)
    out_shape_case = make_case(**CASES[name])
    Ho, Wo = out_shape_case["offset"].shape[2:]
    Cout = case["weight"].shape[0]
    grad_out = torch.randn(case["input"].shape[0], Cout, Ho, Wo, generator=torch.Generator().manual_seed(3),
                           dtype=torch.float64).to(dtype)
    out, grads, cols = run_kernels(lib, case, grad_out, seed=0)
    out2, grads2, cols2 = run_kernels(lib, case, grad_out, seed=12345)
    assert torch.equal(cols, cols2) and torch.equal(out, out2)
    for k in grads:
        if grads[k] is None:
            continue
        if k == "input":
            # col2im's atomics: the emulator runs blocks in a seeded order, so the sum order (and the last bits)
            # changes with the seed, as it does on a GPU. Only rounding may differ.
            assert rel_err(grads[k], grads2[k]) < 8 * torch.finfo(grads[k].dtype).eps
        else:
            assert torch.equal(grads[k], grads2[k]), k
    # every element written: no sentinel left in the columns or the gradients the kernels produced
    assert not (cols == SENTINEL).any()
    for k in ("input", "offset", "mask"):
        if grads[k] is not None:
            assert not (grads[k] == SENTINEL).any(), k
    ref_out, ref_grads, ref_cols = reference64(case, grad_out)
    tol = TOL[dtype]
    assert rel_err(cols, ref_cols.reshape(cols.shape)) < tol
    assert rel_err(out, ref_out) < tol
    for k, g in grads.items():
        if case[k] is None:
            assert g is None
            continue
        assert rel_err(g, ref_grads[k]) < tol, (k, rel_err(g, ref_grads[k]))


def test_emulated_kernels_match_cpu_op(lib):
    """float64: the emulated CUDA path and the CPU kernel agree to rounding (both against the same definition)."""
    import tur_ext

    case = make_case(B=2, C=4, Cout=6, og=2, H=6, W=5, offset_scale=2.5)
    grad_out = torch.randn(2, 6, 6, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out, grads, _ = run_kernels(lib, case, grad_out, seed=7)
    leaves = {k: (v.clone().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    cpu = tur_ext.deform_conv2d(leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"], 1, 1, 1,
                                mask=leaves["mask"])
    cpu.backward(grad_out)
    assert rel_err(out, cpu.detach()) < 1e-13
    for k in grads:
        assert rel_err(grads[k], leaves[k].grad) < 1e-12, k
