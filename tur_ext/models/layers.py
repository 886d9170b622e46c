"""Small building blocks shared by the transformer backbones (written here: timm and einops are not dependencies)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["DropPath", "init_linear_and_norm"]


class DropPath(nn.Module):
    """Stochastic depth: in training, zero the whole residual branch of a sample with probability ``p`` and scale
    the kept ones by ``1 / (1 - p)``; the identity in eval mode (and for ``p = 0``)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"p: expected a drop probability in [0, 1), got {p!r}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def init_linear_and_norm(m: nn.Module) -> None:
    """The transformer releases' ``_init_weights`` for linear and LayerNorm layers (for ``Module.apply``): linear
    weights truncated-normal with std 0.02 and zero bias, LayerNorm weight 1 and bias 0; other modules untouched."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
