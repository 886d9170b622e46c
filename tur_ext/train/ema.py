"""Exponential moving average of a model's weights (used for validation and saved as ``params_ema``)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """Keeps ``ema = decay * ema + (1 - decay) * param`` after every optimizer step; buffers are copied as they are.

    With ``warmup=True`` the decay used at update n is ``min(decay, (1 + n) / (10 + n))``, so a short run's average
    is not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, *, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay: expected a float in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        src = dict(model.named_parameters())
        for name, p in self.module.named_parameters():
            p.lerp_(src[name].detach().to(p.dtype), 1.0 - d)
        src_b = dict(model.named_buffers())
        for name, b in self.module.named_buffers():
            b.copy_(src_b[name])
        self.num_updates += 1

    def state_dict(self) -> dict:
        """Only the counters: the averaged weights travel separately as ``params_ema``."""
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
