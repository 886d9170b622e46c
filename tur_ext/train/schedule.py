"""Optimizers and learning-rate schedules of the run configs.

Schedules: ``cosine`` (linear warmup, then one half cosine: the PromptIR/NAFNet recipes) and ``cosine_restarts``
(BasicSR's ``CosineAnnealingRestartLR``: cycles of given lengths, each restarting at a weight of the base lr and
annealing to ``eta_min``; the TUR TransWeather and MiOIR Uformer recipes). Every schedule is a pure function of the
step, so resuming only needs the step (kept in the scheduler's state dict). The cosine horizon may be longer than
the run: the PromptIR recipe warms up for 15 epochs, anneals towards epoch 150 and stops at epoch 120.
"""
from __future__ import annotations

import bisect
import math
from typing import Iterable, Mapping, Sequence

import torch

#: ``optim.name`` values and the torch optimizer each builds.
OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
#: ``schedule.name`` values.
SCHEDULES = ("cosine", "cosine_restarts", "piecewise")


def warmup_cosine_factor(step: int, warmup_steps: int, cosine_steps: int, min_factor: float = 0.0,
                         warmup_start_factor: float = 0.0) -> float:
    """The multiplier of the base learning rate at ``step`` (0-based: the lr used for the ``step``-th update).

    Linear from ``warmup_start_factor`` to 1 over ``warmup_steps`` steps, then a half cosine from 1 down to
    ``min_factor`` at step ``cosine_steps`` (counted from 0, warmup included); ``min_factor`` after that.
    """
    if step < 0:
        raise ValueError(f"step: expected >= 0, got {step}")
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_steps
    span = cosine_steps - warmup_steps
    if span <= 0:
        return 1.0
    t = min(1.0, (step - warmup_steps) / span)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


def cosine_restart_factor(step: int, periods: Sequence[int], restart_weights: Sequence[float],
                          min_factor: float = 0.0, warmup_steps: int = 0) -> float:
    """The multiplier of the base lr at 0-based ``step`` under BasicSR's ``CosineAnnealingRestartLR``.

    Cycle ``i`` spans ``periods[i]`` steps after the cumulative end ``c[i-1]`` of the previous one (``c[-1] = 0``);
    a step ``s`` belongs to the first cycle with ``s <= c[i]`` (so the last step of a cycle reaches the minimum
    exactly), and the factor is ``m + w_i * (1 - m) * (1 + cos(pi * (s - c[i-1]) / periods[i])) / 2`` with
    ``m = min_factor = eta_min / lr``. This is BasicSR's value at ``last_epoch = s``, which is the lr its training
    loop uses for its ``(s+1)``-th iteration (the scheduler steps from the second iteration on). After the last
    cycle the factor stays at ``m`` (BasicSR fails there). During ``warmup_steps`` the factor ramps linearly
    from 0 to 1 instead, while the cycles keep counting from step 0 (BasicSR's ``warmup_iter``).
    """
    if step < 0:
        raise ValueError(f"step: expected >= 0, got {step}")
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    ends = _cumulative(periods)
    i = bisect.bisect_left(ends, step)
    if i == len(ends):
        return min_factor
    start = ends[i - 1] if i else 0
    t = (step - start) / periods[i]
    return min_factor + restart_weights[i] * (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


def piecewise_factor(step: int, milestones: Sequence[int], factors: Sequence[float]) -> float:
    """The multiplier of the base lr at 0-based ``step`` under a piecewise-constant schedule: 1 before
    ``milestones[0]``, ``factors[i]`` from ``milestones[i]`` on (AirNet's step decays, written out)."""
    if step < 0:
        raise ValueError(f"step: expected >= 0, got {step}")
    i = bisect.bisect_right(list(milestones), step)
    return 1.0 if i == 0 else float(factors[i - 1])


def check_piecewise(milestones: Sequence, factors: Sequence, *, integer: bool = True) -> None:
    """ValueError unless ``milestones`` increase strictly (ints if ``integer``: step counts) and ``factors`` are
    positive numbers, one per milestone."""
    kinds = (int,) if integer else (int, float)
    if (not isinstance(milestones, (list, tuple)) or not milestones
            or any(isinstance(m, bool) or not isinstance(m, kinds) or m <= 0 for m in milestones)
            or any(b <= a for a, b in zip(milestones, milestones[1:]))):
        raise ValueError(f"schedule.milestones: expected a non-empty, strictly increasing list of positive "
                         f"{'integers' if integer else 'numbers'}, got {milestones!r}")
    if (not isinstance(factors, (list, tuple)) or len(factors) != len(milestones)
            or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0 for f in factors)):
        raise ValueError(f"schedule.factors: expected one positive lr factor per milestone ({len(milestones)}), "
                         f"got {factors!r}")


def _cumulative(periods: Sequence[int]) -> list[int]:
    out, total = [], 0
    for p in periods:
        total += int(p)
        out.append(total)
    return out


def check_restarts(periods: Sequence, restart_weights: Sequence, *, integer: bool = True) -> None:
    """ValueError unless ``periods`` are positive (ints if ``integer``: step counts) and ``restart_weights`` are
    numbers in [0, 1], one per period."""
    if not isinstance(periods, (list, tuple)) or not periods:
        raise ValueError(f"schedule.periods: expected a non-empty list of cycle lengths, got {periods!r}")
    kinds = (int,) if integer else (int, float)
    for p in periods:
        if isinstance(p, bool) or not isinstance(p, kinds) or not p > 0:
            raise ValueError(f"schedule.periods: expected positive {'integers' if integer else 'numbers'}, "
                             f"got {periods!r}")
    if not isinstance(restart_weights, (list, tuple)) or len(restart_weights) != len(periods):
        raise ValueError(f"schedule.restart_weights: expected one weight per period ({len(periods)}), "
                         f"got {restart_weights!r}")
    for w in restart_weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 1.0:
            raise ValueError(f"schedule.restart_weights: expected numbers in [0, 1], got {restart_weights!r}")


class _FactorSchedule:
    """Sets every param group's ``lr`` to ``base_lr * factor(step)``.

    ``base_lrs`` are taken from the optimizer when the schedule is built, so a resumed run whose config changes the
    learning rate uses the new value (the state dict only carries the step).
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = lr
        self.step_count = 0
        self._apply()

    def factor(self, step: int | None = None) -> float:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _apply(self) -> None:
        f = self.factor()
        for g, lr in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = lr * f

    def step(self) -> None:
        """Advance one optimizer step."""
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()


def _check_min_ratio(min_lr_ratio: float) -> float:
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio: expected in [0, 1], got {min_lr_ratio}")
    return float(min_lr_ratio)


class WarmupCosineSchedule(_FactorSchedule):
    """``base_lr * warmup_cosine_factor(step)`` for every param group."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, warmup_steps: int, cosine_steps: int,
                 min_lr_ratio: float = 0.0, warmup_start_ratio: float = 0.0):
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected >= 0, got {warmup_steps}")
        if cosine_steps < 0:
            raise ValueError(f"cosine_steps: expected >= 0, got {cosine_steps}")
        self.warmup_steps = int(warmup_steps)
        self.cosine_steps = int(cosine_steps)
        self.min_lr_ratio = _check_min_ratio(min_lr_ratio)
        self.warmup_start_ratio = float(warmup_start_ratio)
        super().__init__(optimizer)

    def factor(self, step: int | None = None) -> float:
        return warmup_cosine_factor(self.step_count if step is None else step, self.warmup_steps, self.cosine_steps,
                                    self.min_lr_ratio, self.warmup_start_ratio)


class CosineRestartSchedule(_FactorSchedule):
    """``base_lr * cosine_restart_factor(step)`` for every param group (BasicSR's CosineAnnealingRestartLR)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, periods: Sequence[int],
                 restart_weights: Sequence[float], min_lr_ratio: float = 0.0, warmup_steps: int = 0):
        check_restarts(periods, restart_weights)
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected >= 0, got {warmup_steps}")
        self.periods = [int(p) for p in periods]
        self.restart_weights = [float(w) for w in restart_weights]
        self.min_lr_ratio = _check_min_ratio(min_lr_ratio)
        self.warmup_steps = int(warmup_steps)
        super().__init__(optimizer)

    def factor(self, step: int | None = None) -> float:
        return cosine_restart_factor(self.step_count if step is None else step, self.periods, self.restart_weights,
                                     self.min_lr_ratio, self.warmup_steps)


class PiecewiseSchedule(_FactorSchedule):
    """``base_lr * piecewise_factor(step)`` for every param group."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, milestones: Sequence[int], factors: Sequence[float]):
        check_piecewise(milestones, factors)
        self.milestones = [int(m) for m in milestones]
        self.factors = [float(f) for f in factors]
        super().__init__(optimizer)

    def factor(self, step: int | None = None) -> float:
        return piecewise_factor(self.step_count if step is None else step, self.milestones, self.factors)


def build_optimizer(groups: Iterable[dict], optim: Mapping) -> torch.optim.Optimizer:
    """The optimizer of a validated ``optim:`` config section over parameter ``groups`` (each group may set its
    own ``weight_decay`` and ``lr``). ``adam`` adds the weight decay to the gradient (L2, torch/BasicSR Adam),
    ``adamw`` decouples it."""
    name = optim["name"]
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name: expected one of {sorted(OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name](list(groups), lr=optim["lr"], betas=tuple(optim["betas"]), eps=optim["eps"])


def build_schedule(optimizer: torch.optim.Optimizer, schedule: Mapping, *, lr: float, steps_per_epoch: int,
                   total_steps: int) -> _FactorSchedule:
    """The lr schedule of a validated ``schedule:`` config section; lengths in ``schedule.unit`` (steps or epochs
    of ``steps_per_epoch``), ``min_lr`` absolute (as a ratio of ``lr``, the main group's base lr)."""
    unit = steps_per_epoch if schedule["unit"] == "epochs" else 1
    warmup = int(round(schedule["warmup"] * unit))
    min_ratio = min(1.0, schedule["min_lr"] / lr)
    name = schedule.get("name", "cosine")
    if name == "cosine":
        end = schedule.get("cosine_end")
        cosine = int(round(end * unit)) if end is not None else total_steps
        return WarmupCosineSchedule(optimizer, warmup_steps=warmup, cosine_steps=max(cosine, warmup),
                                    min_lr_ratio=min_ratio)
    if name == "cosine_restarts":
        periods = schedule.get("periods")
        weights = schedule.get("restart_weights")
        if weights is None and isinstance(periods, (list, tuple)):
            weights = [1.0] * len(periods)
        check_restarts(periods, weights, integer=False)
        steps = [max(1, int(round(p * unit))) for p in periods]
        return CosineRestartSchedule(optimizer, periods=steps, restart_weights=weights, min_lr_ratio=min_ratio,
                                     warmup_steps=warmup)
    if name == "piecewise":
        milestones, factors = schedule.get("milestones"), schedule.get("factors")
        check_piecewise(milestones, factors, integer=False)
        steps = [max(1, int(round(m * unit))) for m in milestones]
        return PiecewiseSchedule(optimizer, milestones=steps, factors=factors)
    raise ValueError(f"schedule.name: expected one of {list(SCHEDULES)}, got {name!r}")
