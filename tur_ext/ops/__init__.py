"""Loads the compiled extension and registers what the C++ op needs from Python: its autograd formula and its
fake (meta) kernel, so that ``torch.compile`` traces it without a graph break.

``backend()`` is ``"compiled"`` when ``tur_ext._C`` loaded, else ``"reference"`` (the pure-PyTorch fallback; a
warning says so once). With ``TUR_REQUIRE_COMPILED=1`` a missing extension is an ImportError instead.
``python -m tur_ext.ops`` prints how the extension was built. The CPU kernel is compiled for several SIMD levels
and picks the best this CPU has (``cpu_capabilities()``; ``TUR_CPU_CAPABILITY=default|avx2|avx512`` or the
``cpu_capability(name)`` context caps it).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Iterator

import torch

try:
    from .. import _C  # noqa: F401  (importing it registers torch.ops.tur.*)

    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - depends on the install
    _C = None
    _IMPORT_ERROR = exc
    if os.environ.get("TUR_REQUIRE_COMPILED") == "1":
        raise ImportError(
            "TUR_REQUIRE_COMPILED=1 but the compiled extension tur_ext._C could not be loaded "
            f"({exc}); build it with `pip install --no-build-isolation -e .`"
        ) from exc
    warnings.warn(
        f"tur_ext._C is not built ({exc}); using the pure-PyTorch reference loss, which is slower. "
        "Build the extension with `pip install --no-build-isolation -e .`",
        RuntimeWarning,
        stacklevel=2,
    )

OP_NAME = "tur::task_uncertainty_loss"


def backend() -> str:
    """``"compiled"`` when the C++/CUDA op is available, ``"reference"`` otherwise."""
    return "reference" if _C is None else "compiled"


def build_info() -> dict[str, Any]:
    """What the compiled module was built with (CUDA and archs, OpenMP, threads, SIMD level, torch version)."""
    if _C is None:
        return {"backend": "reference", "error": str(_IMPORT_ERROR), "torch_runtime": torch.__version__}
    info = dict(_C.build_info())
    info["backend"] = "compiled"
    info["torch_runtime"] = torch.__version__
    return info


def cpu_capabilities() -> list[str]:
    """SIMD levels of the CPU kernel that this machine runs, lowest first (``"default"``, ``"avx2"``,
    ``"avx512"``). All give the same bits; the op uses the last one unless ``TUR_CPU_CAPABILITY`` says otherwise."""
    return [] if _C is None else list(_C.cpu_capabilities())


@contextlib.contextmanager
def cpu_capability(name: str) -> Iterator[None]:
    """Runs the CPU kernel at SIMD level ``name`` inside the block, for every thread of the process (the setting
    is process-wide; meant for comparisons in tests and benchmarks). ValueError when the level is unknown or this
    CPU lacks it."""
    if _C is None:
        raise RuntimeError("cpu_capability: the compiled extension is not loaded")
    previous = _C.set_cpu_capability(name)
    try:
        yield
    finally:
        _C.set_cpu_capability(previous)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_loss(pred, target, uncertainty, task_ids, num_tasks, eps, reg_weight, compute_grad):
    stats = pred.new_empty((num_tasks,), dtype=_accumulate_dtype(pred.dtype))
    if compute_grad:  # float16 gradients come in float32 (csrc/tur_loss.h, grad_dtype)
        gdt = torch.float32 if pred.dtype == torch.float16 else pred.dtype
        grad_pred, grad_unc = torch.empty_like(pred, dtype=gdt), torch.empty_like(uncertainty, dtype=gdt)
    else:
        grad_pred, grad_unc = pred.new_empty((0,)), pred.new_empty((0,))
    return (
        pred.new_empty((), dtype=stats.dtype),
        stats,
        torch.empty_like(stats),
        torch.empty_like(stats),
        torch.empty_like(stats),
        pred.new_empty((num_tasks,), dtype=torch.long),
        grad_pred,
        grad_unc,
    )


def _setup_context(ctx, inputs, output) -> None:
    pred, _, uncertainty = inputs[:3]
    ctx.compute_grad = inputs[7]
    ctx.dtypes = (pred.dtype, uncertainty.dtype)
    ctx.save_for_backward(output[6], output[7])
    # Only the loss is differentiable: without these, autograd would allocate and zero-fill a gradient for each
    # of the other outputs (the two gradient-sized ones included) on every backward.
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _scale(grad: torch.Tensor, grad_loss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if grad.dtype != dtype:
        # float16 inputs: the op's float32 gradient times grad_loss, rounded to float16 once, so that a gradient
        # of order 1/(C*P) keeps its precision under an AMP loss scale and a large one stays finite.
        return (grad * grad_loss.float()).to(dtype)
    # The common case, loss.backward() on CPU, needs no extra pass over the gradient. Only for plain eager
    # tensors: under tracing (fake/functional tensor subclasses) the value is not known.
    if (
        type(grad_loss) is torch.Tensor
        and not torch.compiler.is_compiling()
        and grad_loss.device.type == "cpu"
        and grad_loss.item() == 1.0
    ):
        return grad
    return grad * grad_loss


def _backward(ctx, grad_loss, *_unused):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "tur.task_uncertainty_loss does not support double backward (create_graph=True): its gradients are "
            "computed by the fused forward kernel and are not themselves differentiable"
        )
    if not ctx.compute_grad:
        raise RuntimeError(
            "tur.task_uncertainty_loss was called with compute_grad=False, so it kept no gradients; call it "
            "through tur_ext.task_uncertainty_loss, which asks for them when an input requires grad"
        )
    grad_pred, grad_unc = ctx.saved_tensors
    if grad_loss is None:  # only another output was used downstream: nothing flows back
        return None, None, None, None, None, None, None, None
    grad_pred = _scale(grad_pred, grad_loss, ctx.dtypes[0])
    grad_target = -grad_pred if ctx.needs_input_grad[1] else None
    grad_unc = _scale(grad_unc, grad_loss, ctx.dtypes[1]) if ctx.needs_input_grad[2] else None
    return grad_pred, grad_target, grad_unc, None, None, None, None, None


if _C is not None:
    torch.library.register_fake(OP_NAME)(_fake_loss)
    torch.library.register_autograd(OP_NAME, _backward, setup_context=_setup_context)


# The second op, modulated deformable convolution (DCNv2); imported after the loss's registration above.
from . import deform_conv as _deform_conv  # noqa: E402
from .deform_conv import deform_conv2d  # noqa: E402

if _C is not None:
    _deform_conv.register()
