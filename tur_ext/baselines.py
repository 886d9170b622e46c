"""The losses a run can train with, behind one interface, so that TUR is compared with the usual alternatives.

Every loss is an ``nn.Module`` called as ``loss_fn(pred, target, uncertainty_or_None, task_ids)`` (ids or names)
and returning ``(loss, logs)``: the scalar to back-propagate and a dict of detached K-long per-task tensors:

    loss         the task's term of the objective (0 for a task absent from the batch)
    l1           plain L1 of the task's samples (what every run logs, for comparison)
    count        samples of the task in the batch
    uncertainty  mean predicted uncertainty of the task (when an uncertainty map is given)
    weight       the task's weight in the objective (uw, dwa)

Under torch.distributed, setting ``loss_fn.process_group`` (the trainer does for ``loss.sync: global``) makes the
per-task statistics those of the group's global batch: TUR through :mod:`tur_ext.distributed_loss`, uw/dwa by one
all_reduce of the K per-task L1 sums and K counts; the logged l1 and count are then global too.

Registry (``build_loss(name, tasks, **cfg)``):

    tur   Task Uncertainty Regularization, the fused op (``tur_ext.TaskUncertaintyLoss``); needs the uncertainty map.
          Study knobs (defaults = the published method): ``reg_warmup`` N ramps lambda linearly from 0 over the first
          N training calls (0: off); ``weighting="task"`` weights each task's L1 by the scalar m_k (its mean
          uncertainty) instead of the per-pixel map U_k(x) (``"pixel"``, the default); ``variant="published"`` is
          the released 3/5-task models' loss (:mod:`tur_ext.published_loss`).
    l1    uniform L1 over the batch: exactly ``F.l1_loss(pred, target)``.
    uw    Kendall, Gal & Cipolla (CVPR 2018) homoscedastic uncertainty weighting: a learned s_k = log sigma_k^2 per
          task, objective (1/M) sum_k [0.5 exp(-s_k) L_k + 0.5 s_k] over the M tasks present. Its parameters are
          the loss module's own and must be given to the optimizer (the trainer does).
    dwa   Dynamic Weight Average, Liu, Johns & Davison (CVPR 2019): w_k = L_k(t-1) / L_k(t-2) over the last two
          completed periods, lambda_k = K exp(w_k / T) / sum_i exp(w_i / T), lambda = 1 for the first two periods;
          objective (1/M) sum_k lambda_k L_k. A period is ``period`` training calls (the trainer uses one epoch).
          Its running sums are buffers, so a checkpoint restores them exactly.
    famo  Fast Adaptive Multitask Optimization, Liu et al. (NeurIPS 2023): task logits xi with z = softmax(xi) over
          the tasks present; objective sum_k z_k log(L_k + 1e-8) / c with c = sum_k z_k / (L_k + 1e-8) (detached),
          so the model sees the task gradients with weights z_k / (c (L_k + 1e-8)), which sum to 1 (logged as
          ``weight``). xi follows Adam (``w_lr``, L2 ``gamma``) on J_softmax^T delta with delta_k = log L_k(t') -
          log L_k(t), the improvement of task k since the call t' it was last seen: tasks that improve less gain
          weight.
          O(1) per step, task losses only. The paper measures L(t) after the model's step on the same batch (a
          second forward); here L(t) is the next training call's loss (another batch), which costs nothing more.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .tasks import TaskSet

TaskIds = Union[torch.Tensor, Sequence[str], Sequence[int]]
LossOutput = tuple[torch.Tensor, dict]


def _as_ids(tasks: TaskSet, task_ids: TaskIds, device: torch.device) -> torch.Tensor:
    if isinstance(task_ids, torch.Tensor):
        ids = task_ids.to(device=device, dtype=torch.long)
    else:
        seq = list(task_ids)
        if seq and all(isinstance(t, str) for t in seq):
            ids = tasks.ids(seq, device=device)
        else:
            ids = torch.as_tensor(seq, dtype=torch.long, device=device)
    if ids.dim() != 1:
        raise ValueError(f"task_ids: expected a 1-D sequence of task ids or names, got shape {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(tasks)):
        raise ValueError(f"task_ids: ids must be in [0, {len(tasks)}), got {ids.tolist()}")
    return ids


def _check_pair(pred: torch.Tensor, target: torch.Tensor, ids: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"target: expected the shape of pred {tuple(pred.shape)}, got {tuple(target.shape)}")
    if pred.dim() < 2:
        raise ValueError(f"pred: expected (B, C, ...) , got shape {tuple(pred.shape)}")
    if ids.numel() != pred.shape[0]:
        raise ValueError(f"task_ids: expected {pred.shape[0]} ids (one per sample), got {ids.numel()}")


def _per_task_mean(values: torch.Tensor, ids: torch.Tensor, num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of per-sample ``values`` (B,) within each task -> (K,) means (0 where absent) and (K,) counts."""
    counts = torch.zeros(num_tasks, dtype=values.dtype, device=values.device).index_add_(
        0, ids, torch.ones_like(values))
    sums = torch.zeros(num_tasks, dtype=values.dtype, device=values.device).index_add_(0, ids, values)
    return sums / counts.clamp_min(1), counts


def _common_logs(pred, target, uncertainty, ids, num_tasks) -> dict:
    with torch.no_grad():
        dt = torch.promote_types(pred.dtype, torch.float32)
        per_sample = (pred.detach().to(dt) - target.detach().to(dt)).abs().flatten(1).mean(1)
        l1, counts = _per_task_mean(per_sample, ids, num_tasks)
        logs = {"l1": l1, "count": counts}
        if uncertainty is not None:
            logs["uncertainty"], _ = _per_task_mean(uncertainty.detach().to(dt).flatten(1).mean(1), ids, num_tasks)
    return logs


class _TaskLoss(nn.Module):
    needs_uncertainty = False
    name = ""
    #: a torch.distributed process group: the per-task statistics are those of its global batch (the trainer sets
    #: it for ``loss.sync: global``); None: this process's batch only.
    process_group = None

    def __init__(self, tasks):
        super().__init__()
        self.tasks = TaskSet(tasks)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks)}"


class TURLoss(_TaskLoss):
    """Task Uncertainty Regularization (DESIGN.md §1) through the fused op.

    ``reg_warmup`` (default 0): lambda_t = reg_weight * min(1, t / reg_warmup) at the t-th training call (t from 0),
    counted in a buffer so a resumed run continues the ramp; the buffer exists only when the ramp is on, so default
    checkpoints keep their keys.

    ``weighting="task"``: each sample's uncertainty map is replaced by its own spatial (and channel) mean, one value
    per sample broadcast to a 1-channel map. Then U_k(x) = (1/n_k) sum_i mean(u_i) + eps = m_k for every x, so
    wl1_k = l1_k / m_k and reg_k = lambda log m_k, with m_k exactly the mean task uncertainty of the per-pixel form;
    autograd spreads d/d mean(u_i) evenly over u_i's elements.
    """

    needs_uncertainty = True
    name = "tur"
    WEIGHTINGS = ("pixel", "task")

    def __init__(self, tasks, eps: float = 1e-6, reg_weight: float = 2.0, reg_warmup: int = 0,
                 weighting: str = "pixel", variant: str = "per_task"):
        super().__init__(tasks)
        from .losses import TaskUncertaintyLoss  # the fused op; imported here so the other losses work without it

        if isinstance(reg_warmup, bool) or not isinstance(reg_warmup, int) or reg_warmup < 0:
            raise ValueError(f"reg_warmup: expected an integer >= 0 (steps), got {reg_warmup!r}")
        if weighting not in self.WEIGHTINGS:
            raise ValueError(f"weighting: expected one of {list(self.WEIGHTINGS)}, got {weighting!r}")
        self.inner = TaskUncertaintyLoss(self.tasks, eps=eps, reg_weight=reg_weight, variant=variant)
        self.reg_weight = float(reg_weight)
        self.reg_warmup = reg_warmup
        self.weighting = weighting
        if reg_warmup > 0:
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def current_reg_weight(self) -> float:
        """lambda for the next training call."""
        if self.reg_warmup == 0:
            return self.reg_weight
        return self.reg_weight * min(1.0, int(self.calls) / self.reg_warmup)

    def forward(self, pred, target, uncertainty, task_ids) -> LossOutput:
        if uncertainty is None:
            raise ValueError("uncertainty: the 'tur' loss needs the model's uncertainty map; "
                             "build the model with uncertainty=True")
        ids = _as_ids(self.tasks, task_ids, pred.device)
        _check_pair(pred, target, ids)
        training = self.training and torch.is_grad_enabled()
        self.inner.reg_weight = self.current_reg_weight() if training else self.reg_weight
        self.inner.process_group = self.process_group
        unc = uncertainty
        if self.weighting == "task":
            shape = (unc.shape[0], 1, *unc.shape[2:])
            unc = unc.flatten(1).mean(1).reshape(-1, *([1] * (unc.dim() - 1))).expand(shape).contiguous()
        out = self.inner(pred, target, unc, ids)
        if training and self.reg_warmup > 0:
            self.calls += 1
        logs = _common_logs(pred, target, uncertainty, ids, self.num_tasks)
        if self.process_group is not None:
            _global_logs(logs, out.per_task_l1, out.counts)
        logs["loss"] = out.per_task_loss.detach().float()
        logs["weighted_l1"] = out.per_task_weighted_l1.detach().float()
        logs["reg"] = out.per_task_reg.detach().float()
        # The effective weight of each task's L1: its 1/U-weighted L1 over its plain L1 (NaN for absent tasks).
        l1 = out.per_task_l1.detach().float()
        logs["weight"] = torch.where(out.counts > 0, logs["weighted_l1"] / l1, torch.full_like(l1, float("nan")))
        return out.loss, logs


class L1Loss(_TaskLoss):
    """Uniform L1 over the whole batch."""

    name = "l1"

    def forward(self, pred, target, uncertainty, task_ids) -> LossOutput:
        ids = _as_ids(self.tasks, task_ids, pred.device)
        _check_pair(pred, target, ids)
        loss = F.l1_loss(pred, target)
        logs = _common_logs(pred, target, uncertainty, ids, self.num_tasks)
        logs["loss"] = logs["l1"].clone()
        return loss, logs


def _differentiable_task_l1(pred, target, ids, num_tasks, process_group=None):
    # At least float32 (AMP outputs are half precision), float64 stays float64.
    dt = torch.promote_types(pred.dtype, torch.float32)
    per_sample = (pred.to(dt) - target.to(dt)).abs().flatten(1).mean(1)
    if process_group is None:
        return _per_task_mean(per_sample, ids, num_tasks)
    from .distributed_loss import all_reduce_sum

    # Global per-task means: one all_reduce of the K sums and K counts.
    both = torch.zeros(2, num_tasks, dtype=dt, device=pred.device)
    both = both.index_put((torch.zeros_like(ids), ids), per_sample, accumulate=True)
    both = both.index_put((torch.ones_like(ids), ids), torch.ones_like(per_sample), accumulate=True)
    both = all_reduce_sum(both, process_group)
    return both[0] / both[1].clamp_min(1), both[1]


def _global_logs(logs: dict, l1: torch.Tensor, counts: torch.Tensor) -> dict:
    """Under a process group the logged l1 and count are those of the global batch."""
    logs["l1"], logs["count"] = l1.detach().to(logs["l1"].dtype), counts.detach().to(logs["count"].dtype)
    return logs


class UncertaintyWeightingLoss(_TaskLoss):
    """Kendall et al. learned task weighting with one log-variance ``s_k`` per task."""

    name = "uw"

    def __init__(self, tasks, init_log_var: float = 0.0):
        super().__init__(tasks)
        self.log_var = nn.Parameter(torch.full((len(self.tasks),), float(init_log_var)))

    def forward(self, pred, target, uncertainty, task_ids) -> LossOutput:
        ids = _as_ids(self.tasks, task_ids, pred.device)
        _check_pair(pred, target, ids)
        l1, counts = _differentiable_task_l1(pred, target, ids, self.num_tasks, self.process_group)
        present = (counts > 0).to(l1.dtype)
        s = self.log_var.to(l1.dtype)
        terms = (0.5 * torch.exp(-s) * l1 + 0.5 * s) * present
        loss = terms.sum() / present.sum()
        logs = _common_logs(pred, target, uncertainty, ids, self.num_tasks)
        if self.process_group is not None:
            _global_logs(logs, l1, counts)
        logs["loss"] = terms.detach()
        logs["weight"] = (0.5 * torch.exp(-s)).detach()
        return loss, logs


class DynamicWeightAverageLoss(_TaskLoss):
    """Liu et al. Dynamic Weight Average over periods of ``period`` training calls."""

    name = "dwa"

    def __init__(self, tasks, temperature: float = 2.0, period: int = 100):
        super().__init__(tasks)
        if not temperature > 0:
            raise ValueError(f"temperature: expected > 0, got {temperature}")
        if not (isinstance(period, int) and not isinstance(period, bool) and period >= 1):
            raise ValueError(f"period: expected an integer >= 1, got {period!r}")
        self.temperature = float(temperature)
        self.period = period
        k = len(self.tasks)
        # All state as buffers: it travels in state_dict(), so a resumed run continues with the same weights.
        self.register_buffer("weights", torch.ones(k, dtype=torch.float64))
        self.register_buffer("history", torch.zeros(2, k, dtype=torch.float64))  # [L(t-2), L(t-1)]
        self.register_buffer("periods_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("acc_sum", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("acc_count", torch.zeros(k, dtype=torch.float64))

    @staticmethod
    def dwa_weights(prev2: torch.Tensor, prev1: torch.Tensor, temperature: float) -> torch.Tensor:
        """lambda_k = K softmax_k((L_k(t-1) / L_k(t-2)) / T)."""
        ratio = prev1 / prev2
        ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))  # a task not seen: neutral
        return prev1.numel() * torch.softmax(ratio / temperature, dim=0)

    def forward(self, pred, target, uncertainty, task_ids) -> LossOutput:
        ids = _as_ids(self.tasks, task_ids, pred.device)
        _check_pair(pred, target, ids)
        l1, counts = _differentiable_task_l1(pred, target, ids, self.num_tasks, self.process_group)
        present = (counts > 0).to(l1.dtype)
        lam = self.weights.to(device=l1.device, dtype=l1.dtype)
        terms = lam * l1 * present
        loss = terms.sum() / present.sum()
        logs = _common_logs(pred, target, uncertainty, ids, self.num_tasks)
        if self.process_group is not None:
            _global_logs(logs, l1, counts)
        logs["loss"] = terms.detach()
        logs["weight"] = lam.detach().clone()
        if self.training and torch.is_grad_enabled():
            self._accumulate(l1.detach(), present)
        return loss, logs

    @torch.no_grad()
    def _accumulate(self, l1: torch.Tensor, present: torch.Tensor) -> None:
        sums, counts = l1 * present, present
        if self.process_group is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            # (Under a process group l1 is already the global batch's.) Every process sees its own shard of the batch: average over all of them so the weights agree.
            both = torch.cat([sums, counts]).to(torch.float64)
            torch.distributed.all_reduce(both)
            sums, counts = both[: self.num_tasks], both[self.num_tasks:]
        self.acc_sum += sums.to(self.acc_sum)
        self.acc_count += counts.to(self.acc_count)
        self.calls += 1
        if int(self.calls) % self.period == 0:
            avg = torch.where(self.acc_count > 0, self.acc_sum / self.acc_count.clamp_min(1),
                              torch.full_like(self.acc_sum, float("nan")))
            self.history[0] = self.history[1]
            self.history[1] = avg
            self.periods_done += 1
            self.acc_sum.zero_()
            self.acc_count.zero_()
            if int(self.periods_done) >= 2:
                self.weights.copy_(self.dwa_weights(self.history[0], self.history[1], self.temperature))


class FAMOLoss(_TaskLoss):
    """Liu et al. FAMO: loss-balancing task logits updated from the change of the log task losses."""

    name = "famo"

    def __init__(self, tasks, w_lr: float = 0.025, gamma: float = 0.01, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8):
        super().__init__(tasks)
        for key, v in (("w_lr", w_lr), ("eps", eps)):
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"{key}: expected > 0, got {v!r}")
        if not (isinstance(gamma, (int, float)) and gamma >= 0):
            raise ValueError(f"gamma: expected >= 0, got {gamma!r}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {betas!r}")
        self.w_lr, self.gamma, self.betas, self.eps = float(w_lr), float(gamma), tuple(map(float, betas)), float(eps)
        k = len(self.tasks)
        # Logits, Adam's moments and the previous call's losses are buffers: a checkpoint restores them exactly.
        self.register_buffer("logits", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("adam_m", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("adam_v", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("adam_t", torch.zeros((), dtype=torch.long))
        self.register_buffer("prev_loss", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("prev_present", torch.zeros(k, dtype=torch.bool))

    def forward(self, pred, target, uncertainty, task_ids) -> LossOutput:
        ids = _as_ids(self.tasks, task_ids, pred.device)
        _check_pair(pred, target, ids)
        l1, counts = _differentiable_task_l1(pred, target, ids, self.num_tasks)
        present = counts > 0
        if self.training and torch.is_grad_enabled():
            self._update_logits(l1.detach(), present)
        z = torch.softmax(self.logits.masked_fill(~present.to(self.logits.device), float("-inf")), 0)
        z = z.to(device=l1.device, dtype=l1.dtype)
        d = torch.where(present, l1, torch.ones_like(l1)) + self.eps
        c = (z / d).sum().detach()
        terms = torch.where(present, z * torch.log(d) / c, torch.zeros_like(l1))
        loss = terms.sum()
        logs = _common_logs(pred, target, uncertainty, ids, self.num_tasks)
        logs["loss"] = terms.detach()
        logs["weight"] = torch.where(present, z / (c * d), torch.full_like(l1, float("nan"))).detach()
        return loss, logs

    @torch.no_grad()
    def _update_logits(self, l1: torch.Tensor, present: torch.Tensor) -> None:
        sums, cnt = (l1 * present).to(torch.float64), present.to(torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            both = torch.cat([sums, cnt])  # every process steps the logits on the losses of the whole batch
            torch.distributed.all_reduce(both)
            sums, cnt = both[: self.num_tasks], both[self.num_tasks:]
        cur = (sums / cnt.clamp_min(1)).to(self.prev_loss)
        now = (cnt > 0).to(self.prev_present.device)
        both_seen = now & self.prev_present
        if bool(both_seen.any()):
            delta = torch.where(both_seen, torch.log(self.prev_loss + self.eps) - torch.log(cur + self.eps),
                                torch.zeros_like(cur))
            z = torch.softmax(self.logits, 0)
            grad = z * (delta - (z * delta).sum()) + self.gamma * self.logits  # J_softmax^T delta, L2 as Adam's
            b1, b2 = self.betas
            self.adam_t += 1
            t = int(self.adam_t)
            self.adam_m.mul_(b1).add_(grad, alpha=1 - b1)
            self.adam_v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            m_hat = self.adam_m / (1 - b1 ** t)
            v_hat = self.adam_v / (1 - b2 ** t)
            self.logits -= self.w_lr * m_hat / (v_hat.sqrt() + 1e-8)
        self.prev_loss.copy_(torch.where(now, cur, self.prev_loss))
        self.prev_present |= now


LOSSES: dict[str, Callable[..., _TaskLoss]] = {
    "tur": TURLoss,
    "l1": L1Loss,
    "uw": UncertaintyWeightingLoss,
    "dwa": DynamicWeightAverageLoss,
    "famo": FAMOLoss,
}


def build_loss(name: str, tasks, *, sync: str = "local", process_group=None, **cfg) -> _TaskLoss:
    """The loss ``name`` (tur, l1, uw, dwa, famo) for ``tasks`` (a TaskSet, set name or list of names).

    ``sync="global"`` with a ``process_group``: per-task statistics over the group's global batch (see the module
    doc); ``"local"``, or no group (one process), each process's own batch."""
    if name not in LOSSES:
        raise ValueError(f"loss.name: unknown loss {name!r}; expected one of {sorted(LOSSES)}")
    if sync not in ("local", "global"):
        raise ValueError(f"loss.sync: expected 'local' or 'global', got {sync!r}")
    try:
        loss = LOSSES[name](tasks, **cfg)
    except TypeError as e:
        raise TypeError(f"loss: bad options {sorted(cfg)} for loss {name!r}: {e}") from None
    if sync == "global" and process_group is not None:
        loss.process_group = process_group
    return loss
