"""Pieces of the TUR loss API shared by the compiled op and the pure-PyTorch reference: the result type,
argument validation with errors that name the argument, task-id conversion, and the finiteness check."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

TaskIds = Union[torch.Tensor, Sequence[int]]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class TURLossOutput(NamedTuple):
    """The TUR loss and its per-task statistics (K-long, detached, 0 for tasks absent from the batch)."""

    loss: torch.Tensor
    per_task_loss: torch.Tensor
    per_task_l1: torch.Tensor
    per_task_weighted_l1: torch.Tensor
    per_task_reg: torch.Tensor
    counts: torch.Tensor


def as_task_ids(task_ids: TaskIds, device: torch.device) -> torch.Tensor:
    """``task_ids`` as a 1-D integer tensor; lists and tuples of ints become int64 tensors on ``device``."""
    if isinstance(task_ids, torch.Tensor):
        if task_ids.dtype.is_floating_point or task_ids.dtype.is_complex or task_ids.dtype == torch.bool:
            raise TypeError(f"task_ids: expected an integer tensor, got dtype {task_ids.dtype}")
        return task_ids
    if isinstance(task_ids, (list, tuple)):
        for v in task_ids:
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"task_ids: expected integer ids, got {type(v).__name__} {v!r}")
        return torch.tensor(list(task_ids), dtype=torch.long, device=device)
    raise TypeError(f"task_ids: expected an integer tensor or a list of ints, got {type(task_ids).__name__}")


def validate(
    pred: torch.Tensor,
    target: torch.Tensor,
    uncertainty: torch.Tensor,
    task_ids: torch.Tensor,
    num_tasks: int,
    eps: float,
    reg_weight: float,
    *,
    check_id_range: bool = True,
) -> None:
    """Raises ValueError/TypeError naming the offending argument. The id range check reads the ids, a host
    synchronisation on CUDA, so callers skip it for device ids (the op then reports bad ids as a NaN loss)."""
    for name, t in (("pred", pred), ("target", target), ("uncertainty", uncertainty)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if pred.dtype not in FLOAT_DTYPES:
        raise TypeError(f"pred: expected a float16, bfloat16, float32 or float64 tensor, got dtype {pred.dtype}")
    for name, t in (("target", target), ("uncertainty", uncertainty)):
        if t.dtype != pred.dtype:
            raise ValueError(f"{name}: expected dtype {pred.dtype} (the dtype of pred), got dtype {t.dtype}")
    if pred.dim() < 3:
        raise ValueError(f"pred: expected shape (B, C, *spatial) with at least one spatial dim, got {tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(f"target: expected the shape of pred {tuple(pred.shape)}, got {tuple(target.shape)}")
    B, C = pred.shape[:2]
    if B < 1:
        raise ValueError(f"pred: expected a non-empty batch, got shape {tuple(pred.shape)}")
    if pred.numel() == 0:
        raise ValueError(f"pred: expected non-empty channel and spatial dims, got shape {tuple(pred.shape)}")
    if uncertainty.dim() != pred.dim() or uncertainty.shape[0] != B or uncertainty.shape[2:] != pred.shape[2:]:
        raise ValueError(
            f"uncertainty: expected shape ({B}, 1 or {C}, {', '.join(map(str, pred.shape[2:]))}), "
            f"got {tuple(uncertainty.shape)}"
        )
    if uncertainty.shape[1] not in (1, C):
        raise ValueError(f"uncertainty: expected 1 or {C} channels (pred has {C}), got shape {tuple(uncertainty.shape)}")
    if target.device != pred.device or uncertainty.device != pred.device:
        raise ValueError(
            f"target, uncertainty: expected tensors on {pred.device} like pred, got {target.device} and {uncertainty.device}"
        )
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int):
        raise TypeError(f"num_tasks: expected an int, got {type(num_tasks).__name__}")
    if num_tasks < 1:
        raise ValueError(f"num_tasks: expected >= 1, got {num_tasks}")
    if not (eps >= 0.0 and eps < float("inf")):
        raise ValueError(f"eps: expected a finite value >= 0, got {eps}")
    if not (abs(reg_weight) < float("inf")):
        raise ValueError(f"reg_weight: expected a finite value, got {reg_weight}")
    if task_ids.dim() != 1 or task_ids.shape[0] != B:
        raise ValueError(f"task_ids: expected shape ({B},) (one id per sample), got {tuple(task_ids.shape)}")
    if check_id_range:
        lo, hi = int(task_ids.min()), int(task_ids.max())
        if lo < 0 or hi >= num_tasks:
            bad = lo if lo < 0 else hi
            raise ValueError(f"task_ids: expected every id in [0, {num_tasks}) (num_tasks = {num_tasks}), got {bad}")


def check_finite(
    out: TURLossOutput, task_names: Optional[Sequence[str]] = None, batch_size: Optional[int] = None
) -> None:
    """Raises FloatingPointError naming the first task whose loss is not finite, or saying how many task ids
    were out of range (device ids are range-checked by the kernel, which reports them as a NaN loss; the counts
    then add up to fewer than ``batch_size`` samples)."""
    # The loss is the mean of the per-task losses, so it is finite exactly when they all are: one read suffices.
    if bool(torch.isfinite(out.loss)):
        return
    K = out.counts.shape[0]
    in_range = int(out.counts.sum())
    if batch_size is not None and in_range < batch_size:
        if in_range == 0:
            raise FloatingPointError(f"TUR loss is not finite: no task id in [0, {K}) (num_tasks = {K}): check task_ids")
        raise FloatingPointError(
            f"TUR loss is not finite: {batch_size - in_range} of {batch_size} task ids outside [0, {K}) "
            f"(num_tasks = {K}): check task_ids"
        )
    finite = torch.isfinite(out.per_task_loss)
    bad = [k for k, ok in enumerate(finite.tolist()) if not ok]
    if not bad:
        raise FloatingPointError(f"TUR loss is not finite, every task's loss is (task ids outside [0, {K})?)")
    k = bad[0]
    name = f" ({task_names[k]!r})" if task_names is not None and k < len(task_names) else ""
    raise FloatingPointError(
        f"TUR loss is not finite for task {k}{name}: loss={out.per_task_loss[k].item()}, "
        f"weighted L1={out.per_task_weighted_l1[k].item()}, reg={out.per_task_reg[k].item()}"
    )
