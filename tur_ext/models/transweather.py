"""TransWeather (Valanarasu et al., CVPR 2022) and the TUR variant of it, with how their checkpoints are recognised.

The module tree, parameter names and forward follow the authors' ``transweather_model.py`` (``Transweather()``), so
both released layouts load (:meth:`TransWeather.adapt_state_dict`):

* the authors' release: the state dict of ``nn.DataParallel(net)`` (``module.`` prefix, removed by
  :func:`~tur_ext.models.load_weights`), which also holds two modules its forward never uses,
  ``Tenc.mini_patch_embed4`` and ``convtail.conv_output`` (296,667 parameters). They are not built here and are
  dropped on loading;
* the TUR release (``Transweather_TUR_*.pth``): BasicSR ``{"params", "params_ema"}`` without those modules, with the
  uncertainty head ``var_conv`` (conv3x3 8->8, ELU, conv3x3 8->8, ELU, conv3x3 8->3, Softplus) on the 8-channel output
  of ``convtail``, beside ``clean`` + tanh. That is :class:`~tur_ext.models.UncertaintyHead` on ``forward_features``.

Value ranges (what the two codes feed and train against):

* the authors' data loaders feed ``Normalize(0.5, 0.5)(ToTensor(img))``, an input in [-1, 1], but train and score
  the tanh output against ``ToTensor(gt)`` in [0, 1] (``train_data_functions.py``: ``transform_input`` vs
  ``transform_gt``; ``train.py``: ``smooth_l1_loss(pred_image, gt)``; the test scripts save the output with
  ``torchvision.utils.save_image``, which reads it as [0, 1]);
* the TUR code feeds ``ToTensor`` images in [0, 1] and trains the output against [0, 1] targets (BasicSR pipeline,
  no mean/std normalisation).

So the output range is [0, 1] for both, and the input range is [-1, 1] for the authors' weights, [0, 1] for the TUR
weights. ``input_range=None`` (the default) means "from the weights": [0, 1] (the TUR code and this package's
trainer) until a checkpoint in the authors' layout is loaded, which sets [-1, 1]; an explicit ``input_range`` is
kept. The raw ``forward`` is the authors' computation either way; the range conversion happens where images enter
and leave a model (:mod:`tur_ext.models.value_range`).

Sizes: H and W must be multiples of 16 and at least 48 (the intra-patch attention of the third stage reduces a map
of ceil(H/32) rows by 2); evaluation and ``tur restore`` pad smaller images. The authors' crop-by-one branches after
the transposed convolutions are written as a gather of the skip connection's size, with no shape-dependent branch,
so the model scripts (``torch.jit.script``, any valid size), traces without freezing a size, and exports with
dynamic batch, H and W. A dynamic ``torch.export`` holds from 112 pixels up (``export_min_size``): below that some
attention grid is one token high or wide, and export specialises matmuls and layouts on size-1 dims, so an
AOTInductor package declares ``min_size`` 112 and smaller images are padded up to it.

Differences from the authors' code that do not change the fp32 result beyond rounding: attention uses
``F.scaled_dot_product_attention`` (no N x N matrix in memory for the large early stages), the decoder's learnt task
queries are projected once and broadcast over the batch instead of being repeated first, and no dropout modules
(every dropout rate of the release is 0).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .detect import has_keys, shape
from .head import Backbone
from .layers import DropPath, init_linear_and_norm
from .value_range import check_value_range

__all__ = ["TransWeather"]

#: Key prefixes of the modules the authors' release holds but its forward never uses.
UNUSED_RELEASE_MODULES = ("Tenc.mini_patch_embed4.", "convtail.conv_output.")

#: The input range of the authors' weights (their loaders feed Normalize(0.5, 0.5) images).
_AUTHORS_RANGE = (-1.0, 1.0)
_EMBED = (64, 128, 320, 512)   # the release; smaller widths only serve tests and CPU work
_ENC_HEADS = (1, 2, 4, 4)
_ENC_MLP = (2, 2, 2, 2)
_ENC_DEPTHS = (2, 2, 2, 2)
_ENC_SR = (4, 2, 2, 1)
_DEC_HEADS, _DEC_MLP, _DEC_DEPTH, _DEC_SR = 8, 4, 3, 1
_DEC_DEPTHS_TOTAL = 16  # the decoder's drop-path schedule spans sum([3, 4, 6, 3]) blocks, of which it builds 3
_TASK_QUERIES = 48
_BLOCK_EPS = 1e-6       # the blocks' and stage norms' LayerNorm; patch embeddings and spatial reduction use 1e-5


def _drop_path_rates(rate: float, n: int) -> List[float]:
    """``torch.linspace(0, rate, n)`` as floats: the stochastic depth of each of ``n`` blocks (no tensor, so the
    model also builds on the meta device)."""
    return [rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def _init_transformer(m: nn.Module) -> None:
    # The authors' `_init_weights` of the encoder and decoder (the conv projection keeps PyTorch's defaults).
    init_linear_and_norm(m)
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _to_map(tokens: Tensor, h: int, w: int) -> Tensor:
    """(B, h*w, C) tokens -> (B, C, h, w), contiguous.

    The transposed view would be a channels-last map; as that, convolutions (and export's symbolic shapes) would
    branch on whether a side is 1 pixel, which specialises a dynamic-shape export to the example's size class.
    """
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w).contiguous()


def _to_tokens(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h*w, C) tokens."""
    return x.flatten(2).transpose(1, 2)


class _PatchEmbed(nn.Module):
    """Overlapping patch embedding: a strided conv (padding k // 2), then LayerNorm over the tokens."""

    def __init__(self, in_channels: int, embed_dim: int, kernel: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tuple[Tensor, int, int]:
        y = self.proj(x)
        return self.norm(_to_tokens(y)), y.shape[2], y.shape[3]


class _Attention(nn.Module):
    """Multi-head attention with spatially reduced keys/values (``sr > 1``); with ``task_queries`` the queries are
    that many learnt vectors, resized (nearest) to the number of keys, as the decoder of TransWeather does."""

    # Constants, so that TorchScript compiles only the branch a module has the submodules for.
    __constants__ = ["reduces", "has_task_query"]

    def __init__(self, dim: int, heads: int, sr: int, task_queries: int = 0):
        super().__init__()
        self.heads = heads
        self.reduces = sr > 1
        self.has_task_query = task_queries > 0
        if self.has_task_query:
            self.task_query = nn.Parameter(torch.randn(1, task_queries, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        if sr > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr, stride=sr)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        d = c // self.heads
        if self.reduces:
            kv_in = self.norm(_to_tokens(self.sr(_to_map(x, h, w))))
        else:
            kv_in = x
        kv = self.kv(kv_in).reshape(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        if self.has_task_query:
            t = self.task_query.shape[1]
            q = self.q(self.task_query.expand(b, -1, -1)).reshape(b, t, self.heads, d).permute(0, 2, 1, 3)
            q = F.interpolate(q, size=[k.shape[2], d], mode="nearest")
        else:
            q = self.q(x).reshape(b, n, self.heads, d).permute(0, 2, 1, 3)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, -1, c))


class _DWConv(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return _to_tokens(self.dwconv(_to_map(x, h, w)))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = _DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class _Block(nn.Module):
    """Pre-norm transformer block: attention and the depth-wise-conv MLP, each with stochastic depth."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, sr: int, drop_path: float, task_queries: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_BLOCK_EPS)
        self.attn = _Attention(dim, heads, sr, task_queries)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=_BLOCK_EPS)
        self.mlp = _Mlp(dim, dim * mlp_ratio)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class _Blocks(nn.ModuleList):
    """A run of blocks on one token grid (a ModuleList, so that keys stay ``block1.0.*`` as released)."""

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        for block in self:
            x = block(x, h, w)
        return x


class _Encoder(nn.Module):
    """``Tenc``: four stages (1/4 .. 1/32) and the intra-patch branch that joins each stage at the next one."""

    def __init__(self, in_channels: int, e: Sequence[int], drop_path_rate: float):
        super().__init__()
        dpr = _drop_path_rates(drop_path_rate, sum(_ENC_DEPTHS))
        starts = [sum(_ENC_DEPTHS[:i]) for i in range(4)]

        def blocks(dim: int, stage: int, heads: int, mlp: int, sr: int, depth: int) -> _Blocks:
            return _Blocks([_Block(dim, heads, mlp, sr, dpr[starts[stage] + i]) for i in range(depth)])

        self.patch_embed1 = _PatchEmbed(in_channels, e[0], 7, 4)
        self.patch_embed2 = _PatchEmbed(e[0], e[1], 3, 2)
        self.patch_embed3 = _PatchEmbed(e[1], e[2], 3, 2)
        self.patch_embed4 = _PatchEmbed(e[2], e[3], 3, 2)
        self.mini_patch_embed1 = _PatchEmbed(e[0], e[1], 3, 2)
        self.mini_patch_embed2 = _PatchEmbed(e[1], e[2], 3, 2)
        self.mini_patch_embed3 = _PatchEmbed(e[2], e[3], 3, 2)
        # Heads, MLP ratios and reductions of the intra-patch blocks as released (stage 3's reuses stage 2's heads).
        self.block1 = blocks(e[0], 0, _ENC_HEADS[0], _ENC_MLP[0], _ENC_SR[0], _ENC_DEPTHS[0])
        self.norm1 = nn.LayerNorm(e[0], eps=_BLOCK_EPS)
        self.patch_block1 = blocks(e[1], 0, _ENC_HEADS[0], _ENC_MLP[0], _ENC_SR[0], 1)
        self.pnorm1 = nn.LayerNorm(e[1], eps=_BLOCK_EPS)
        self.block2 = blocks(e[1], 1, _ENC_HEADS[1], _ENC_MLP[1], _ENC_SR[1], _ENC_DEPTHS[1])
        self.norm2 = nn.LayerNorm(e[1], eps=_BLOCK_EPS)
        self.patch_block2 = blocks(e[2], 1, _ENC_HEADS[1], _ENC_MLP[1], _ENC_SR[1], 1)
        self.pnorm2 = nn.LayerNorm(e[2], eps=_BLOCK_EPS)
        self.block3 = blocks(e[2], 2, _ENC_HEADS[2], _ENC_MLP[2], _ENC_SR[2], _ENC_DEPTHS[2])
        self.norm3 = nn.LayerNorm(e[2], eps=_BLOCK_EPS)
        self.patch_block3 = blocks(e[3], 2, _ENC_HEADS[1], _ENC_MLP[2], _ENC_SR[2], 1)
        self.pnorm3 = nn.LayerNorm(e[3], eps=_BLOCK_EPS)
        self.block4 = blocks(e[3], 3, _ENC_HEADS[3], _ENC_MLP[3], _ENC_SR[3], _ENC_DEPTHS[3])
        self.norm4 = nn.LayerNorm(e[3], eps=_BLOCK_EPS)
        self.apply(_init_transformer)

    def forward(self, x: Tensor) -> List[Tensor]:
        # Stage 1; the intra-patch branch starts from the stage's embedded (not yet transformed) tokens.
        t1, h1, w1 = self.patch_embed1(x)
        t2, h2, w2 = self.mini_patch_embed1(_to_map(t1, h1, w1))
        out1 = _to_map(self.norm1(self.block1(t1, h1, w1)), h1, w1)
        p = _to_map(self.pnorm1(self.patch_block1(t2, h2, w2)), h2, w2)
        # Stage 2
        t1, h1, w1 = self.patch_embed2(out1)
        m = _to_map(t1, h1, w1) + p
        t2, h2, w2 = self.mini_patch_embed2(m)
        out2 = _to_map(self.norm2(self.block2(_to_tokens(m), h1, w1)), h1, w1)
        p = _to_map(self.pnorm2(self.patch_block2(t2, h2, w2)), h2, w2)
        # Stage 3
        t1, h1, w1 = self.patch_embed3(out2)
        m = _to_map(t1, h1, w1) + p
        t2, h2, w2 = self.mini_patch_embed3(m)
        out3 = _to_map(self.norm3(self.block3(_to_tokens(m), h1, w1)), h1, w1)
        p = _to_map(self.pnorm3(self.patch_block3(t2, h2, w2)), h2, w2)
        # Stage 4
        t1, h1, w1 = self.patch_embed4(out3)
        m = _to_map(t1, h1, w1) + p
        out4 = _to_map(self.norm4(self.block4(_to_tokens(m), h1, w1)), h1, w1)
        return [out1, out2, out3, out4]


class _Decoder(nn.Module):
    """``Tdec``: one more stride-2 embedding (1/64) and transformer blocks whose queries are learnt task queries."""

    def __init__(self, dim: int, drop_path_rate: float):
        super().__init__()
        dpr = _drop_path_rates(drop_path_rate, _DEC_DEPTHS_TOTAL)
        self.patch_embed1 = _PatchEmbed(dim, dim, 3, 2)
        self.block1 = _Blocks([_Block(dim, _DEC_HEADS, _DEC_MLP, _DEC_SR, dpr[i], task_queries=_TASK_QUERIES)
                               for i in range(_DEC_DEPTH)])
        self.norm1 = nn.LayerNorm(dim, eps=_BLOCK_EPS)
        self.apply(_init_transformer)

    def forward(self, x: Tensor) -> Tensor:
        t, h, w = self.patch_embed1(x)
        return _to_map(self.norm1(self.block1(t, h, w)), h, w)


class _Conv(nn.Module):
    """A conv under ``conv2d`` (the released key layout of ``ConvLayer``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, padding: int = 1):
        super().__init__()
        self.conv2d = nn.Conv2d(in_channels, out_channels, kernel, 1, padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2d(x)


class _UpConv(nn.Module):
    """A 2x transposed conv (kernel 4, padding 1) under ``conv2d`` (``UpsampleConvLayer``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv2d = nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2d(x)


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = _Conv(channels, channels)
        self.conv2 = _Conv(channels, channels)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.relu(self.conv1(x))) * 0.1 + x


def _crop_like(x: Tensor, ref: Tensor) -> Tensor:
    """The top-left ``ref``-sized part of ``x``: a 2x upsampling of ceil(n/2) rows gives n or n + 1 rows, and the
    authors' branches drop the extra one.

    Gathered by index rather than sliced: a slice compares its end with the size, which a dynamic-shape export turns
    into a guard on the parity of the example's size (so the export would only run at sizes of the same parity).
    """
    rows = torch.arange(ref.shape[2], device=x.device)
    cols = torch.arange(ref.shape[3], device=x.device)
    return x.index_select(2, rows).index_select(3, cols)


class _ConvProjection(nn.Module):
    """``convtail``: transposed convs back to full resolution, adding the encoder stages; 8 channels out."""

    def __init__(self, e: Sequence[int]):
        super().__init__()
        self.convd32x = _UpConv(e[3], e[3])
        self.convd16x = _UpConv(e[3], e[2])
        self.dense_4 = nn.Sequential(_Residual(e[2]))
        self.convd8x = _UpConv(e[2], e[1])
        self.dense_3 = nn.Sequential(_Residual(e[1]))
        self.convd4x = _UpConv(e[1], e[0])
        self.dense_2 = nn.Sequential(_Residual(e[0]))
        self.convd2x = _UpConv(e[0], 16)
        self.dense_1 = nn.Sequential(_Residual(16))
        self.convd1x = _UpConv(16, 8)

    def forward(self, enc: List[Tensor], dec: Tensor) -> Tensor:
        x = _crop_like(self.convd32x(dec), enc[3]) + enc[3]
        x = _crop_like(self.convd16x(x), enc[2])
        x = self.convd8x(self.dense_4(x) + enc[2])
        x = self.convd4x(self.dense_3(x) + enc[1])
        x = self.convd2x(self.dense_2(x) + enc[0])
        return self.convd1x(self.dense_1(x))


class TransWeather(Backbone):
    """TransWeather as released (37,755,411 parameters; 37,756,798 with the TUR head).

    ``forward_features`` returns the 8-channel full-resolution output of ``convtail``, the input of ``clean`` (then
    tanh) and of the TUR head. ``input_range``: the range of the images the forward takes, ``None`` to take it from
    the weights (see the module notes); the output is in [0, 1] (tanh, trained against [0, 1] targets).
    """

    size_multiple = 16
    min_size = 48
    # Below 112 pixels some attention grid is 1 token high or wide (the third intra-patch stage reduces ceil(H/32)
    # rows by 2), and torch.export specialises matmuls and layouts on size-1 dims, so a dynamic export starts there.
    export_min_size = 112
    feature_channels = 8
    supports_fp16 = False  # not verified on a GPU yet
    output_range = (0.0, 1.0)

    def __init__(self, embed_dims: Sequence[int] = _EMBED, drop_path_rate: float = 0.1,
                 input_range: Optional[Sequence[float]] = None):
        super().__init__()
        if isinstance(drop_path_rate, bool) or not isinstance(drop_path_rate, (int, float)) \
                or not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate: expected a number in [0, 1), got {drop_path_rate!r}")
        e = tuple(embed_dims) if isinstance(embed_dims, (list, tuple)) else ()
        if len(e) != 4 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in e):
            raise ValueError(f"embed_dims: expected 4 positive ints, got {embed_dims!r}")
        # Every attention splits its channels evenly over its heads (stage 3's intra-patch blocks use 2 heads, the
        # decoder 8).
        for i, heads in ((1, 2), (2, _ENC_HEADS[2]), (3, _DEC_HEADS)):
            if e[i] % heads:
                raise ValueError(f"embed_dims: embed_dims[{i}] = {e[i]} must be divisible by {heads} heads")
        self.input_range_fixed = input_range is not None
        self.input_range = check_value_range(input_range, "input_range") if input_range is not None else (0.0, 1.0)
        self.Tenc = _Encoder(self.in_channels, e, float(drop_path_rate))
        self.Tdec = _Decoder(e[3], float(drop_path_rate))
        self.convtail = _ConvProjection(e)
        self.clean = _Conv(8, 3)
        self.active = nn.Tanh()

    def forward_features(self, x: Tensor) -> Tensor:
        enc = self.Tenc(x)
        return self.convtail(enc, self.Tdec(enc[3]))

    def reconstruct(self, features: Tensor, x: Tensor) -> Tensor:
        return self.active(self.clean(features))

    @torch.jit.unused
    def set_input_range(self, value_range: Sequence[float]) -> None:
        """Fix the range of the images the forward takes (recorded in ``config``, checkpoints and exports)."""
        self.input_range = check_value_range(value_range, "input_range")
        self.input_range_fixed = True
        self.config = {**self.config, "input_range": list(self.input_range)}

    __jit_unused_properties__ = ["release_layout"]  # Python-side only; TorchScript would try to compile it

    @property
    def release_layout(self) -> str:  # type: ignore[override]
        if self.input_range == _AUTHORS_RANGE:
            return "TransWeather (jeya-maria-jose/TransWeather, without the DataParallel 'module.' prefix)"
        return "TransWeather_TUR (TUR release, BasicSR 'params', head removed)"

    @torch.jit.unused
    def release_state_dict(self) -> Dict[str, Tensor]:
        """Weights that take inputs in [-1, 1] in the authors' layout (their two unused modules added as zeros, so
        that ``Transweather().load_state_dict`` is strict), any other in the TUR release's (the module's own keys).
        Loading either back sets the same input range (:meth:`adapt_state_dict`)."""
        sd = super().release_state_dict()
        if self.input_range != _AUTHORS_RANGE:
            return sd
        e0 = self.Tenc.patch_embed1.proj.out_channels
        e3 = self.Tenc.patch_embed4.proj.out_channels
        dtype = self.clean.conv2d.weight.dtype
        shapes = {"Tenc.mini_patch_embed4.proj.weight": (e3, e0, 3, 3), "Tenc.mini_patch_embed4.proj.bias": (e3,),
                  "Tenc.mini_patch_embed4.norm.weight": (e3,), "Tenc.mini_patch_embed4.norm.bias": (e3,),
                  "convtail.conv_output.conv2d.weight": (3, 8, 3, 3), "convtail.conv_output.conv2d.bias": (3,)}
        sd.update({k: torch.zeros(shape, dtype=dtype) for k, shape in shapes.items()})
        return sd

    #: The keys :meth:`detect_config` looks for (``*``: a prefix); listed when a file matches no architecture.
    detect_keys = ("Tenc.patch_embed1.proj.weight", "Tdec.*", "convtail.*", "clean.conv2d.weight")

    @classmethod
    def detect_config(cls, state_dict: Mapping[str, Tensor]) -> Optional[Dict[str, Any]]:
        """The configuration of a TransWeather state dict (either release's layout), or None if it is not one: the
        embedding widths of the four encoder stages. The input range is not a shape: loading the weights sets it
        from their layout (:meth:`adapt_state_dict`)."""
        if not has_keys(state_dict, cls.detect_keys):
            return None
        return {"embed_dims": [shape(state_dict, f"Tenc.patch_embed{i}.proj.weight", 4)[0] for i in (1, 2, 3, 4)]}

    @torch.jit.unused
    def adapt_state_dict(self, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Drop the release's unused modules; weights in the authors' layout (they have those modules) set the input
        range to [-1, 1] unless the model was built with an explicit ``input_range``."""
        unused = [k for k in state_dict if k.startswith(UNUSED_RELEASE_MODULES)]
        authors = _AUTHORS_RANGE
        if unused and not self.input_range_fixed:
            self.set_input_range(authors)
        elif unused and self.input_range != authors:
            warnings.warn(f"the checkpoint is in the layout of the authors' TransWeather release, whose weights "
                          f"expect inputs in [-1, 1]; the model keeps the input_range {list(self.input_range)} it "
                          f"was built with", stacklevel=3)
        return {k: v for k, v in state_dict.items() if k not in unused}
