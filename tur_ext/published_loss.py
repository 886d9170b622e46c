"""The TUR loss as the released 3/5-task models were trained with it (``variant="published"``).

The TUR code's 3- and 5-task loss (``airnet_uncertainty_loss`` and ``airnet_uncertainty_loss_5_types`` in
``basicsr/losses/airnet_uncertainty_loss.py``, commit 5d026e7; behind ``AirNet_TUR_3task.pth``, PromptIR-TUR and
``Transweather_TUR_5task.pth``) walks the tasks in id order and appends each task's ``1/U_k``-scaled samples to
two lists that are never cleared, so the weighted L1 of the j-th task present is the mean over the samples of every
task present up to and including it:

    term_k = sum_{k' <= k present} S_k' / (N_k · C · P),   S_k' = sum_{i: y_i = k'} sum_{c, x} |p_i - t_i| / U_k'(map(c), x)
    N_k    = sum_{k' <= k present} n_k'
    L      = (1/M) sum_{k present} (term_k + lambda · log(mean U_k))

with U_k, eps, lambda, map(c) and M as in DESIGN.md §1 (eps 1e-6 and lambda 2 in that code). The per-task form of
DESIGN.md §1 is ``term_k = S_k / (n_k · C · P)``. The fused op's differentiable output is the per-task mean, and
this loss weights the tasks' S_k differently (a prefix over the tasks present), so this is a separate, slower
path of ordinary tensor ops, differentiated by autograd.
"""
from __future__ import annotations

import torch

from .loss_common import TaskIds, TURLossOutput
from .reference import finish, task_maps

__all__ = ["published_task_uncertainty_loss"]


def published_task_uncertainty_loss(
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
    """The released 3/5-task training loss (module docstring); arguments and result as
    :func:`tur_ext.task_uncertainty_loss`. ``per_task_weighted_l1`` holds the cumulative ``term_k`` and
    ``per_task_loss`` ``term_k + reg_k`` (the code's ``category_losses``); ``per_task_l1`` is each task's own L1."""
    m = task_maps(pred, target, uncertainty, task_ids, num_tasks, eps, reg_weight)
    S = (m.E / m.U).sum((1, 2))                                      # weighted error sum of each task
    zero = torch.zeros_like(S)
    cum_s = torch.cumsum(torch.where(m.present, S, zero), 0)        # the lists that are never cleared
    cum_n = torch.cumsum(torch.where(m.present, m.counts, zero), 0)
    return finish(m, cum_s / (cum_n.clamp(min=1) * m.C * m.P), reg_weight, check_finite)
