"""The TUR loss over the global batch of a process group: the distributed path of ``task_uncertainty_loss``.

Every rank holds its shard of the batch. The loss of DESIGN.md §1 depends on the batch only through per-task sums,
so the ranks exchange exactly those and each then computes the loss and the K-long statistics of one process
holding the whole global batch:

    pass A (local)   S_k(c', x) = sum_{i: y_i=k} u_i(c', x)          K x Cu x P
                     E_k(c', x) = sum_{i: y_i=k} sum_{c -> c'} |p - t|   K x Cu x P  (needs no U, so it joins S)
                     n_k                                                K
    all_reduce       one SUM over the concatenation [S, E, n]: 2 K Cu P + K values in the accumulation dtype
    pass B (local)   U_k = S_k / n_k + eps, m_k, the loss and statistics; in backward the gradients of the local
                     pred, target and uncertainty from the global U_k, E_k, m_k, n_k, M (no further communication).

Backward returns ``world_size x dL/d(local input)``, the convention of a differentiable all_gather: DDP averages
parameter gradients over the ranks, so the average of these is the gradient of the one-process loss. No host
synchronisation besides the collective itself (the present-task mask and M stay on the device).

Precision: sums are taken in float64 for float64 inputs and float32 otherwise (as the fused kernels); the order of
the cross-rank sum differs from the one-process order, so results agree with one process to rounding, not in bits.
Without a process group ``tur_ext.task_uncertainty_loss`` does not come here (the fused op, unchanged).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .loss_common import TaskIds, TURLossOutput, as_task_ids, check_finite as _check_finite, validate


def reduced_values_per_step(num_tasks: int, uncertainty_channels: int, positions: int) -> int:
    """Values one rank contributes to the single all_reduce of a step: 2 K Cu P + K."""
    return 2 * num_tasks * uncertainty_channels * positions + num_tasks


def _local_sums(p, t, u, onehot, C: int, Cu: int):
    err = (p - t).abs()
    err_u = err.sum(1, keepdim=True) if Cu == 1 and C > 1 else err  # E counts every channel mapped to c'
    S = torch.einsum("bk,bcp->kcp", onehot, u)
    E = torch.einsum("bk,bcp->kcp", onehot, err_u)
    return S, E, onehot.sum(0)


class _GlobalTUR(torch.autograd.Function):
    """Forward: local sums -> one all_reduce -> global loss and statistics. Backward: local gradients, x world."""

    @staticmethod
    def forward(ctx, pred, target, uncertainty, ids, num_tasks, eps, reg_weight, group):
        acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
        B, C = pred.shape[:2]
        Cu = uncertainty.shape[1]
        P = pred[0, 0].numel()
        K = num_tasks
        p = pred.detach().reshape(B, C, P).to(acc)
        t = target.detach().reshape(B, C, P).to(acc)
        u = uncertainty.detach().reshape(B, Cu, P).to(acc)
        onehot = torch.nn.functional.one_hot(ids.to(torch.long), K).to(acc)  # (B, K)
        S, E, n_local = _local_sums(p, t, u, onehot, C, Cu)
        flat = torch.cat([S.reshape(-1), E.reshape(-1), n_local])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        kcp = K * Cu * P
        S, E, counts = flat[:kcp].view(K, Cu, P), flat[kcp:2 * kcp].view(K, Cu, P), flat[2 * kcp:]
        present = counts > 0
        n = counts.clamp(min=1)
        # Absent tasks use U = 1 so that neither the value nor the gradient sees 0/0 or log(0) (as the reference).
        U = torch.where(present[:, None, None], S / n[:, None, None] + eps, torch.ones_like(S))
        m = U.mean((1, 2))
        wl1 = (E / U).sum((1, 2)) / (n * C * P)
        l1 = E.sum((1, 2)) / (n * C * P)
        reg = reg_weight * torch.log(m)
        zero = torch.zeros_like(wl1)
        per_task = torch.where(present, wl1 + reg, zero)
        M = present.sum().to(acc)
        loss = per_task.sum() / M

        world = dist.get_world_size(group)
        ctx.save_for_backward(pred, target, ids, U, E, m, n, M)
        ctx.meta = (C, Cu, P, float(reg_weight), world)
        ctx.mark_non_differentiable(per_task, l1, wl1, reg, counts)
        out_dtype = pred.dtype
        stats = [torch.where(present, x, zero).to(out_dtype) for x in (wl1, reg)]
        return (loss.to(out_dtype), per_task.to(out_dtype), torch.where(present, l1, zero).to(out_dtype),
                stats[0], stats[1], counts.to(torch.long))

    @staticmethod
    def backward(ctx, g_loss, *_):
        pred, target, ids, U, E, m, n, M = ctx.saved_tensors
        C, Cu, P, lam, world = ctx.meta
        acc = U.dtype
        B = pred.shape[0]
        idx = ids.to(torch.long)
        scale = g_loss.to(acc) * world / M
        n_i = n[idx]  # (B,)
        grad_pred = grad_target = grad_unc = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            diff = (pred.reshape(B, C, P).to(acc) - target.reshape(B, C, P).to(acc)).sign()
            Ui = U[idx]  # (B, Cu, P), broadcast over C when Cu == 1
            g = diff / Ui * (scale / (n_i * C * P))[:, None, None]
            if ctx.needs_input_grad[0]:
                grad_pred = g.to(pred.dtype).reshape(pred.shape)
            if ctx.needs_input_grad[1]:
                grad_target = (-g).to(target.dtype).reshape(target.shape)
        if ctx.needs_input_grad[2]:
            # The same for every sample of one task: computed per task, then gathered.
            nk = n[:, None, None]
            gk = (-E / (nk * C * P * U * U) + lam / (Cu * P * m)[:, None, None]) / nk
            grad_unc = (gk[idx] * scale).to(pred.dtype).reshape(B, Cu, *pred.shape[2:])
        return grad_pred, grad_target, grad_unc, None, None, None, None, None


def global_task_uncertainty_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    uncertainty: torch.Tensor,
    task_ids: TaskIds,
    num_tasks: int,
    *,
    process_group: Optional["dist.ProcessGroup"],
    eps: float = 1e-6,
    reg_weight: float = 2.0,
    check_finite: bool = True,
) -> TURLossOutput:
    """The TUR loss of the global batch of ``process_group`` (every rank passes its shard; all ranks must call).

    Same arguments and result as :func:`tur_ext.task_uncertainty_loss`; the result is the one of one process on
    the concatenation of the ranks' batches, and gradients are ``world_size`` times the local part of its gradient.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group: torch.distributed is not initialised (call init_process_group first)")
    ids = as_task_ids(task_ids, pred.device)
    # The id range check reads the ids: only when they are on the host (no sync on CUDA).
    validate(pred, target, uncertainty, ids, num_tasks, eps, reg_weight, check_id_range=ids.device.type == "cpu")
    ids = ids.to(pred.device, non_blocking=True)
    loss, per_task, l1, wl1, reg, counts = _GlobalTUR.apply(
        pred, target, uncertainty, ids, int(num_tasks), float(eps), float(reg_weight), process_group
    )
    out = TURLossOutput(loss, per_task, l1, wl1, reg, counts)
    if check_finite:
        _check_finite(out)
    return out


__all__ = ["global_task_uncertainty_loss", "reduced_values_per_step"]


class _AllReduceSum(torch.autograd.Function):
    """y = sum over the ranks of x, the same on every rank; backward: world_size x dL/dy (see the module doc)."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        ctx.world = dist.get_world_size(group)
        return y

    @staticmethod
    def backward(ctx, g):
        return g * ctx.world, None


def all_reduce_sum(x: torch.Tensor, process_group: Optional["dist.ProcessGroup"]) -> torch.Tensor:
    """Differentiable SUM over the ranks of ``process_group`` under the world_size x convention (DDP's averaging of
    parameter gradients then gives the gradient of one process on the global batch)."""
    return _AllReduceSum.apply(x, process_group)


__all__.append("all_reduce_sum")
