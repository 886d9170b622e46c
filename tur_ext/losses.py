"""The TUR loss: the functional form and the ``nn.Module`` that training code uses."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from . import ops, reference
from .loss_common import TaskIds, TURLossOutput, as_task_ids, check_finite as _check_finite, validate
from .published_loss import published_task_uncertainty_loss
from .tasks import TaskSet

#: ``per_task``: DESIGN.md §1 (the fused op); ``published``: the released 3/5-task models' loss.
VARIANTS = ("per_task", "published")


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
    variant: str = "per_task",
    process_group: Optional["torch.distributed.ProcessGroup"] = None,
) -> TURLossOutput:
    """Task Uncertainty Regularization loss (DESIGN.md §1), fused forward+backward.

    ``pred``/``target``: (B, C, *S); ``uncertainty``: (B, 1 or C, *S), positive; ``task_ids``: (B,) ints in
    [0, num_tasks). Returns :class:`TURLossOutput`; only ``loss`` is differentiable. With ``check_finite`` a
    non-finite task loss raises FloatingPointError naming the task (one host sync; none when False).
    ``variant="published"``: the released 3/5-task models' loss, whose per-task lists accumulate over the tasks
    (:mod:`tur_ext.published_loss`; ordinary tensor ops, slower).
    ``process_group``: the loss of the global batch of that group (every rank passes its shard and gets the loss and
    statistics of one process on the concatenated batch; gradients are world_size x the local part, so DDP's
    averaging gives the one-process gradient). See :mod:`tur_ext.distributed_loss`. None: the fused op.
    """
    if process_group is not None and variant != "per_task":
        raise ValueError("variant: the 'published' loss has no process_group form; use loss.sync: local")
    if variant != "per_task":
        if variant != "published":
            raise ValueError(f"variant: expected one of {list(VARIANTS)}, got {variant!r}")
        return published_task_uncertainty_loss(pred, target, uncertainty, task_ids, num_tasks, eps=eps,
                                               reg_weight=reg_weight, check_finite=check_finite)
    if process_group is not None:
        from .distributed_loss import global_task_uncertainty_loss

        return global_task_uncertainty_loss(pred, target, uncertainty, task_ids, num_tasks, process_group=process_group,
                                            eps=eps, reg_weight=reg_weight, check_finite=check_finite)
    if ops.backend() == "reference":
        return reference.task_uncertainty_loss(
            pred, target, uncertainty, task_ids, num_tasks, eps=eps, reg_weight=reg_weight, check_finite=check_finite
        )
    compiling = torch.compiler.is_compiling()
    ids = as_task_ids(task_ids, pred.device)
    if not compiling and ids.device != pred.device:
        # The op checks every argument itself (same messages as the reference), but it can only read ids on the
        # host without a sync when they live there: check CPU ids before they move to the device.
        if ids.device.type == "cpu":
            validate(pred, target, uncertainty, ids, num_tasks, eps, reg_weight)
        ids = ids.to(pred.device, non_blocking=True)
    need_grad = torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad or uncertainty.requires_grad)
    loss, per_task, l1, wl1, reg, counts, _, _ = torch.ops.tur.task_uncertainty_loss(
        pred, target, uncertainty, ids, num_tasks, float(eps), float(reg_weight), need_grad
    )
    out = TURLossOutput(loss, per_task.detach(), l1.detach(), wl1.detach(), reg.detach(), counts)
    if check_finite and not compiling:
        _check_finite(out, batch_size=pred.shape[0])
    return out


class TaskUncertaintyLoss(nn.Module):
    """TUR loss over a fixed task set. ``tasks``: task names (or a task-set name such as "3task"), or an int K.

    ``process_group``: compute the loss over the global batch of that group (see :func:`task_uncertainty_loss`).
    ``forward(pred, target, uncertainty, task_ids)`` takes ids (tensor or ints) or task names (a list of str, as a
    data loader yields them) and returns :class:`TURLossOutput`.
    """

    def __init__(
        self,
        tasks: Union[int, str, Sequence[str], TaskSet],
        eps: float = 1e-6,
        reg_weight: float = 2.0,
        check_finite: bool = True,
        variant: str = "per_task",
        process_group: Optional["torch.distributed.ProcessGroup"] = None,
    ):
        super().__init__()
        self.tasks = TaskSet(tasks)
        if variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {list(VARIANTS)}, got {variant!r}")
        self.variant = variant
        self.process_group = process_group  # not None: the loss of the group's global batch
        if not (eps >= 0.0 and eps < float("inf")):
            raise ValueError(f"eps: expected a finite value >= 0, got {eps}")
        self.eps = float(eps)
        self.reg_weight = float(reg_weight)
        self.check_finite = check_finite

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        uncertainty: torch.Tensor,
        task_ids: Union[TaskIds, Sequence[str]],
    ) -> TURLossOutput:
        if isinstance(task_ids, (list, tuple)) and task_ids and all(isinstance(t, str) for t in task_ids):
            task_ids = self.tasks.ids(task_ids)
        out = task_uncertainty_loss(
            pred, target, uncertainty, task_ids, len(self.tasks), eps=self.eps, reg_weight=self.reg_weight,
            check_finite=False, variant=self.variant, process_group=self.process_group,
        )
        if self.check_finite and not torch.compiler.is_compiling():
            _check_finite(out, list(self.tasks), batch_size=pred.shape[0])
        return out

    def extra_repr(self) -> str:
        variant = f", variant={self.variant!r}" if self.variant != "per_task" else ""
        return f"tasks={list(self.tasks)}, eps={self.eps}, reg_weight={self.reg_weight}{variant}"
