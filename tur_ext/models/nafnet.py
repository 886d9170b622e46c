"""NAFNet (Chen et al., ECCV 2022): a nonlinear-activation-free U-Net of NAFBlocks.

Parameter names follow the published implementation (``intro``, ``encoders.i.j``, ``downs.i``, ``middle_blks.j``,
``ups.i.0``, ``decoders.i.j``, ``ending``), so BasicSR NAFNet checkpoints load with
:func:`tur_ext.models.load_weights`. Unlike the published forward, the input is not padded inside the model: its
height and width must be multiples of ``size_multiple = 2 ** len(enc_blocks)`` (use
:func:`tur_ext.models.pad_to_multiple`), which keeps shape logic out of traced and exported graphs.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .detect import count, has_keys, shape, unless_default
from .head import Backbone

__all__ = ["NAFNet", "NAFBlock"]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dim of (B, C, H, W), eps 1e-6, statistics in fp32."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        mu = xf.mean(dim=1, keepdim=True)
        var = (xf - mu).pow(2).mean(dim=1, keepdim=True)
        y = (xf - mu) / torch.sqrt(var + self.eps)
        y = y * self.weight.float().reshape(1, -1, 1, 1) + self.bias.float().reshape(1, -1, 1, 1)
        return y.to(x.dtype)


class SimpleGate(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return x1 * x2


class NAFBlock(nn.Module):
    """Norm -> 1x1 -> depthwise 3x3 -> gate -> simplified channel attention -> 1x1, then a gated FFN; scaled skips."""

    def __init__(self, c: int, dw_expand: int = 2, ffn_expand: int = 2):
        super().__init__()
        dw = c * dw_expand
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
        self.conv3 = nn.Conv2d(dw // 2, c, 1)
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw // 2, dw // 2, 1))
        self.sg = SimpleGate()
        ffn = ffn_expand * c
        self.conv4 = nn.Conv2d(c, ffn, 1)
        self.conv5 = nn.Conv2d(ffn // 2, c, 1)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)
        # Zero-initialised residual scales: every block starts as the identity (published init).
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, inp: Tensor) -> Tensor:
        x = self.sg(self.conv2(self.conv1(self.norm1(inp))))
        x = self.conv3(x * self.sca(x))
        y = inp + x * self.beta
        x = self.conv5(self.sg(self.conv4(self.norm2(y))))
        return y + x * self.gamma


def _count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def _counts(name: str, value: object) -> List[int]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name}: expected a list of block counts, got {value!r}")
    return [_count(f"{name}[{i}]", v, 0) for i, v in enumerate(value)]


class NAFNet(Backbone):
    """NAFNet with ``len(enc_blocks)`` down/up levels; ``forward_features`` returns the last decoder's output
    (``width`` channels at full resolution), the input of ``ending`` and of the uncertainty head."""

    supports_fp16 = True
    # The module's keys are the release's (release_state_dict is the default): spandrel detects them as NAFNet.
    release_layout = "NAFNet (megvii-research/NAFNet, BasicSR 'params')"

    def __init__(
        self,
        in_channels: int = 3,
        width: int = 32,
        enc_blocks: Sequence[int] = (2, 2, 4, 8),
        middle_blocks: int = 12,
        dec_blocks: Sequence[int] = (2, 2, 2, 2),
        dw_expand: int = 2,
        ffn_expand: int = 2,
    ):
        super().__init__()
        _count("in_channels", in_channels, 1)
        _count("width", width, 1)
        _count("middle_blocks", middle_blocks, 0)
        _count("dw_expand", dw_expand, 1)
        _count("ffn_expand", ffn_expand, 1)
        enc, dec = _counts("enc_blocks", enc_blocks), _counts("dec_blocks", dec_blocks)
        if len(enc) != len(dec):
            raise ValueError(f"dec_blocks: expected one count per level ({len(enc)}, as enc_blocks), got {len(dec)}")
        if (width * dw_expand) % 2 or (width * ffn_expand) % 2:
            raise ValueError("width: width * dw_expand and width * ffn_expand must be even (the gates halve them)")

        self.in_channels = in_channels
        self.out_channels = in_channels
        self.feature_channels = width
        self.size_multiple = 2 ** len(enc)

        self.intro = nn.Conv2d(in_channels, width, 3, padding=1)
        self.ending = nn.Conv2d(width, in_channels, 3, padding=1)
        # Registration order as published, so state_dict() lists keys in the same order as its checkpoints.
        self.encoders = nn.ModuleList()
        self.decoders = nn.ModuleList()
        self.middle_blks = nn.Sequential()
        self.ups = nn.ModuleList()
        self.downs = nn.ModuleList()
        chan = width
        for n in enc:
            self.encoders.append(nn.Sequential(*[NAFBlock(chan, dw_expand, ffn_expand) for _ in range(n)]))
            self.downs.append(nn.Conv2d(chan, 2 * chan, 2, stride=2))
            chan *= 2
        self.middle_blks = nn.Sequential(*[NAFBlock(chan, dw_expand, ffn_expand) for _ in range(middle_blocks)])
        for n in dec:
            self.ups.append(nn.Sequential(nn.Conv2d(chan, chan * 2, 1, bias=False), nn.PixelShuffle(2)))
            chan //= 2
            self.decoders.append(nn.Sequential(*[NAFBlock(chan, dw_expand, ffn_expand) for _ in range(n)]))

    @classmethod
    def size_multiple_for(cls, config: Mapping[str, Any]) -> int:
        enc = config.get("enc_blocks", inspect.signature(cls.__init__).parameters["enc_blocks"].default)
        return 2 ** len(enc)

    #: The keys :meth:`detect_config` looks for (``*``: a prefix); listed when a file matches no architecture.
    detect_keys = ("intro.weight", "ending.weight", "encoders.*")

    @classmethod
    def detect_config(cls, state_dict: Mapping[str, Tensor]) -> Optional[Dict[str, Any]]:
        """The configuration of a NAFNet state dict (width and block counts per level, from its keys and shapes),
        or None if it is not one."""
        intro = shape(state_dict, "intro.weight", 4)
        if intro is None or not has_keys(state_dict, cls.detect_keys):
            return None
        config: Dict[str, Any] = {
            "width": intro[0],
            "enc_blocks": [count(state_dict, f"encoders.{i}.") for i in range(count(state_dict, "downs."))],
            "middle_blocks": count(state_dict, "middle_blks."),
            "dec_blocks": [count(state_dict, f"decoders.{i}.") for i in range(count(state_dict, "ups."))],
        }
        # Every block has the same expansions: the first one found tells them.
        block = next((k[:-len("conv1.weight")] for k in state_dict if k.endswith(".conv1.weight")), None)
        if block is None:
            return None
        c = shape(state_dict, block + "norm1.weight", 1)[0]
        return {**config, **unless_default(cls, in_channels=intro[1],
                                           dw_expand=shape(state_dict, block + "conv1.weight")[0] // c,
                                           ffn_expand=shape(state_dict, block + "conv4.weight")[0] // c)}

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.intro(x)
        skips: List[Tensor] = []
        for encoder, down in zip(self.encoders, self.downs):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        x = self.middle_blks(x)
        for up, decoder in zip(self.ups, self.decoders):
            x = decoder(up(x) + skips.pop())
        return x

    def reconstruct(self, features: Tensor, x: Tensor) -> Tensor:
        return self.ending(features) + x
