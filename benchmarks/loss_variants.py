"""The implementations that bench_loss.py times side by side, each a forward+backward of one TUR loss."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from tur_ext import ops, reference, task_uncertainty_loss

EPS, REG = 1e-6, 2.0


def seed_style_loop_loss(pred, target, unc, ids, num_tasks, eps=EPS, reg_weight=REG) -> torch.Tensor:
    """The published training code's shape: group the batch with Python lists, torch.stack each group,
    F.l1_loss of the uncertainty-scaled images per task (per-task form, as DESIGN.md §1 fixes it)."""
    groups: list[list[int]] = [[] for _ in range(num_tasks)]
    for i, k in enumerate(ids.tolist()):
        groups[k].append(i)
    losses = []
    for members in groups:
        if not members:
            continue
        p = torch.stack([pred[i] for i in members])
        t = torch.stack([target[i] for i in members])
        u = torch.stack([unc[i] for i in members]).mean(0, keepdim=True) + eps
        losses.append(F.l1_loss(p / u, t / u) + reg_weight * torch.log(u.mean()))
    return sum(losses) / len(losses)


def fused_loss(pred, target, unc, ids, num_tasks):
    return task_uncertainty_loss(pred, target, unc, ids, num_tasks, eps=EPS, reg_weight=REG, check_finite=False).loss


def fused_default_simd_loss(pred, target, unc, ids, num_tasks):
    """The fused op with its CPU kernel held at the portable SSE2 build (what the SIMD dispatch buys)."""
    with ops.cpu_capability("default"):
        return fused_loss(pred, target, unc, ids, num_tasks)


def reference_loss(pred, target, unc, ids, num_tasks):
    return reference.task_uncertainty_loss(
        pred, target, unc, ids, num_tasks, eps=EPS, reg_weight=REG, check_finite=False
    ).loss


_compiled_reference = None


def compiled_reference_loss(pred, target, unc, ids, num_tasks):
    global _compiled_reference
    if _compiled_reference is None:
        _compiled_reference = torch.compile(reference_loss, dynamic=False)
    return _compiled_reference(pred, target, unc, ids, num_tasks)


def plain_l1_loss(pred, target, unc, ids, num_tasks):
    """The cost without TUR: F.l1_loss alone (the uncertainty map is not used)."""
    return F.l1_loss(pred, target)


VARIANTS: dict[str, Callable] = {
    "fused": fused_loss,
    "fused_default_simd": fused_default_simd_loss,
    "reference": reference_loss,
    "loop": seed_style_loop_loss,
    "compiled_reference": compiled_reference_loss,
    "plain_l1": plain_l1_loss,
}
