"""The TUR loss (DESIGN.md §1) in plain, vectorised PyTorch: the oracle of the tests and the fallback when
the compiled extension is missing. Autograd provides its gradients."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .loss_common import TaskIds, TURLossOutput, as_task_ids, check_finite as _check_finite, validate


class TaskMaps(NamedTuple):
    """What every form of the loss is built from: per-task error maps ``E`` and uncertainty maps ``U`` (K, C', P)
    with ``U = 1`` for absent tasks, the per-task sample counts, and the sizes the means divide by."""

    E: torch.Tensor
    U: torch.Tensor
    counts: torch.Tensor   # (K,) samples of each task, in the accumulation dtype
    present: torch.Tensor  # (K,) bool
    n: torch.Tensor        # counts clamped to >= 1, the divisor of the per-task means
    C: int
    P: int
    compiling: bool


def task_maps(pred: torch.Tensor, target: torch.Tensor, uncertainty: torch.Tensor, task_ids: TaskIds,
              num_tasks: int, eps: float, reg_weight: float) -> TaskMaps:
    """Validate the arguments and build :class:`TaskMaps` (DESIGN.md §1) with ordinary, differentiable tensor ops."""
    ids = as_task_ids(task_ids, pred.device)
    compiling = torch.compiler.is_compiling()
    validate(pred, target, uncertainty, ids, num_tasks, eps, reg_weight, check_id_range=not compiling)
    # Same accumulation precision as the kernels: float32 for half types.
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    B, C = pred.shape[:2]
    Cu = uncertainty.shape[1]
    P = pred[0, 0].numel()
    p = pred.reshape(B, C, P).to(acc)
    t = target.reshape(B, C, P).to(acc)
    u = uncertainty.reshape(B, Cu, P).to(acc)

    onehot = torch.nn.functional.one_hot(ids.to(device=pred.device, dtype=torch.long), num_tasks).to(acc)  # (B, K)
    counts = onehot.sum(0)
    present = counts > 0
    n = counts.clamp(min=1)
    err = (p - t).abs()
    err_u = err.sum(1, keepdim=True) if Cu == 1 and C > 1 else err  # E counts every channel mapped to c'
    E = torch.einsum("bk,bcp->kcp", onehot, err_u)  # task error maps
    U = torch.einsum("bk,bcp->kcp", onehot, u) / n[:, None, None] + eps  # task uncertainty maps
    # Absent tasks use U = 1 so that neither the value nor the gradient sees 0/0 or log(0).
    U = torch.where(present[:, None, None], U, torch.ones_like(U))
    return TaskMaps(E, U, counts, present, n, C, P, compiling)


def finish(maps: TaskMaps, weighted_l1: torch.Tensor, reg_weight: float, check_finite: bool) -> TURLossOutput:
    """The loss and its per-task outputs from the per-task weighted L1 term ``weighted_l1`` (K,)."""
    present, zero = maps.present, torch.zeros_like(weighted_l1)
    l1 = maps.E.sum((1, 2)) / (maps.n * maps.C * maps.P)
    reg = reg_weight * torch.log(maps.U.mean((1, 2)))
    per_task_loss = torch.where(present, weighted_l1 + reg, zero)
    loss = per_task_loss.sum() / present.sum()
    out = TURLossOutput(
        loss,
        per_task_loss.detach(),
        torch.where(present, l1, zero).detach(),
        torch.where(present, weighted_l1, zero).detach(),
        torch.where(present, reg, zero).detach(),
        maps.counts.to(torch.long),
    )
    if check_finite and not maps.compiling:
        _check_finite(out)
    return out


def task_uncertainty_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    uncertainty: torch.Tensor,
    task_ids: TaskIds,
    num_tasks: int,
    *,
    eps: float = 1e-6,
    reg_weight: float = 2.0,
    check_finite: bool = True,
) -> TURLossOutput:
    """Same signature and result as :func:`tur_ext.task_uncertainty_loss`, computed with ordinary tensor ops."""
    m = task_maps(pred, target, uncertainty, task_ids, num_tasks, eps, reg_weight)
    return finish(m, (m.E / m.U).sum((1, 2)) / (m.n * m.C * m.P), reg_weight, check_finite)
