"""The TUR loss (DESIGN.md §1) in plain, vectorised PyTorch: the oracle of the tests and the fallback when
the compiled extension is missing. Autograd provides its gradients."""
from __future__ import annotations

import torch

from .loss_common import TaskIds, TURLossOutput, as_task_ids, check_finite as _check_finite, validate


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
    wl1 = (E / U).sum((1, 2)) / (n * C * P)
    l1 = E.sum((1, 2)) / (n * C * P)
    reg = reg_weight * torch.log(U.mean((1, 2)))
    zero = torch.zeros_like(wl1)
    per_task_loss = torch.where(present, wl1 + reg, zero)
    loss = per_task_loss.sum() / present.sum()
    out = TURLossOutput(
        loss,
        per_task_loss.detach(),
        torch.where(present, l1, zero).detach(),
        torch.where(present, wl1, zero).detach(),
        torch.where(present, reg, zero).detach(),
        counts.to(torch.long),
    )
    if check_finite and not compiling:
        _check_finite(out)
    return out
