"""Learning-rate schedule: linear warmup, then cosine annealing.

The schedule is a pure function of the step, so resuming only needs the step (kept in the scheduler's state dict).
The cosine horizon may be longer than the run: the PromptIR recipe warms up for 15 epochs, anneals towards epoch 150
and stops at epoch 120.
"""
from __future__ import annotations

import math

import torch


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


class WarmupCosineSchedule:
    """Sets every param group's ``lr`` to ``base_lr * warmup_cosine_factor(step)``.

    ``base_lrs`` are taken from the optimizer when the schedule is built, so a resumed run whose config changes the
    learning rate uses the new value (the state dict only carries the step).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, warmup_steps: int, cosine_steps: int,
                 min_lr_ratio: float = 0.0, warmup_start_ratio: float = 0.0):
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected >= 0, got {warmup_steps}")
        if cosine_steps < 0:
            raise ValueError(f"cosine_steps: expected >= 0, got {cosine_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: expected in [0, 1], got {min_lr_ratio}")
        self.optimizer = optimizer
        self.warmup_steps = int(warmup_steps)
        self.cosine_steps = int(cosine_steps)
        self.min_lr_ratio = float(min_lr_ratio)
        self.warmup_start_ratio = float(warmup_start_ratio)
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = lr
        self.step_count = 0
        self._apply()

    def factor(self, step: int | None = None) -> float:
        return warmup_cosine_factor(self.step_count if step is None else step, self.warmup_steps, self.cosine_steps,
                                    self.min_lr_ratio, self.warmup_start_ratio)

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
