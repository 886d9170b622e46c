"""Uformer (Wang et al., CVPR 2022) as MiOIR trains it, and the TUR variant of it (``Uformer_TUR_7task.pth``).

The module tree, parameter names and forward follow MiOIR's ``basicsr/archs/uformer_arch.py`` (``Uformer``) in the
configuration of its mixed 7-task model (``options/{train,test}/Uformer/*_Uformer_M.yml``), which is also what the
TUR code's ``Uformer_uncertainty`` builds: embed dim 32, windows of 8, linear token projection, LeFF feed-forward,
depths [1, 2, 8, 8, 2, 8, 8, 2, 1], heads [1, 2, 4, 8, 16, 16, 8, 4, 2], MLP ratio 4, qkv bias, drop path 0.1, the
learnt window modulator in the decoder, shifted windows in every second block. The TUR head ``var_conv`` (conv3x3
64->64, ELU, conv3x3 64->64, ELU, conv3x3 64->3, Softplus) reads the last decoder layer's 64-channel output, the
input of ``output_proj``: that is :class:`~tur_ext.models.UncertaintyHead` on ``forward_features``.

Checkpoints: both releases are BasicSR ``{"params"}`` / ``{"params_ema"}`` files with no key prefix (MiOIR's
``Uformer_M.pth`` without ``var_conv``, TUR's with it). The relative-position index of every window attention is a
persistent buffer in those files, as here; it only depends on the window size, so a file without it loads too and one
whose index differs from the window size's is refused (:meth:`Uformer.adapt_state_dict`). The shift masks are not
buffers (the released code computes them in every forward, and so does this one, for the actual H and W).

Sizes: the released code takes H = W = sqrt(number of tokens) in every layer, so it only runs on square inputs whose
side is a multiple of 128 (windows of 8 at the 1/16 bottleneck); its test loop pads to such a square. Here H and W
are carried through the layers, so any H and W that are multiples of ``16 * win_size`` (128) work, square or not,
with the same result as the released code where it runs; other sizes are padded by evaluation, ``tur restore`` and
the C++ runner (reflect, bottom/right, cropped back). The model scripts (``torch.jit.script``, any valid size) and
exports with dynamic batch, H and W.

Value range: the BasicSR pipelines of MiOIR and TUR feed RGB in [0, 1] and train the output (input + residual)
against [0, 1] targets, so both ranges are the default [0, 1].

Differences from the released code that do not change the fp32 result beyond rounding: no dropout modules (every
dropout rate of the release is 0), the shift mask built from index comparisons instead of slice assignments.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .detect import count, expansion_ratio, has_keys, shape, unless_default, window_from_table
from .head import Backbone
from .layers import DropPath, init_linear_and_norm

__all__ = ["Uformer"]

_DEPTHS = (1, 2, 8, 8, 2, 8, 8, 2, 1)
_HEADS = (1, 2, 4, 8, 16, 16, 8, 4, 2)
_LEVELS = 4            # encoder layers (and decoder layers); the bottleneck is at 1 / 2**_LEVELS
_IMG_SIZE = 256        # the released constructor's img_size, which decides where windows shrink (see _window_for)


def _drop_path_rates(rate: float, n: int) -> List[float]:
    """``torch.linspace(0, rate, n)`` (float32, as the release computes it) as Python floats."""
    return [float(v) for v in torch.linspace(0, rate, n, device="cpu")]


def _window_for(resolution: int, win_size: int) -> Tuple[int, bool]:
    """The released block's window and whether it may shift, from the layer's nominal resolution (img_size 256):
    a layer no larger than the window uses one window of its size and never shifts."""
    if resolution <= win_size:
        return resolution, False
    return win_size, True


def _to_map(tokens: Tensor, h: int, w: int) -> Tensor:
    """(B, h*w, C) tokens -> (B, C, h, w), contiguous."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w).contiguous()


def _to_tokens(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h*w, C), contiguous."""
    return x.flatten(2).transpose(1, 2).contiguous()


def window_partition(x: Tensor, win: int) -> Tensor:
    """(B, H, W, C) -> (B * H/win * W/win, win, win, C): non-overlapping windows, row-major over the grid.

    Sizes are spelt out (no ``-1``), so that under torch.export the window count stays ``B * (H // win) *
    (W // win)``: a ``-1`` gives a batch that the tracer cannot tell from 1, which left a runtime guard that the
    batch is not 1 in exported programs. A reshape, not ``unfold``: the ONNX exporter cannot size an unfold of a
    dynamic input."""
    b, h, w, c = x.shape
    nh, nw = h // win, w // win
    x = x.reshape(b, nh, win, nw, win, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * nh * nw, win, win, c)


def window_reverse(windows: Tensor, win: int, h: int, w: int, b: Optional[int] = None) -> Tensor:
    """Undo :func:`window_partition`: (B * h/win * w/win, win, win, C) -> (B, h, w, C). ``b``: the batch B, where the
    caller knows it (torch.export keeps it the input's batch then), else from the window count."""
    c = windows.shape[-1]
    nh, nw = h // win, w // win
    n = b if b is not None else windows.shape[0] // (nh * nw)
    x = windows.reshape(n, nh, nw, win, win, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)


def shift_attention_mask(h: int, w: int, win: int, shift: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The additive mask of shifted-window attention on an h x w map: (nW, win*win, win*win), 0 between tokens of
    the same region of the rolled map and -100 across regions.

    The released code labels three bands per axis (the last ``shift`` rows, the ``win - shift`` before them, the rest)
    by slice assignment; the band of row ``i`` is ``(i >= h - win) + (i >= h - shift)``, which needs no loop over
    slices and keeps ``h`` symbolic under torch.export. -100, not -inf, as released: masked pairs keep a weight of
    about exp(-100).
    """
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    band_h = (rows >= h - win).to(torch.int64) + (rows >= h - shift).to(torch.int64)
    band_w = (cols >= w - win).to(torch.int64) + (cols >= w - shift).to(torch.int64)
    region = (band_h[:, None] * 3 + band_w[None, :]).to(dtype)
    windows = window_partition(region.reshape(1, h, w, 1), win).reshape((h // win) * (w // win), win * win)
    differ = (windows[:, None, :] - windows[:, :, None]) != 0
    return torch.zeros(differ.shape, device=device, dtype=dtype).masked_fill(differ, -100.0)


class _LinearProjection(nn.Module):
    """``to_q`` and ``to_kv`` linear maps of the window tokens (keys as released)."""

    def __init__(self, dim: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_kv = nn.Linear(dim, dim * 2, bias=bias)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        b, n, c = x.shape
        d = c // self.heads
        q = self.to_q(x).reshape(b, n, self.heads, d).permute(0, 2, 1, 3)
        kv = self.to_kv(x).reshape(b, n, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        return q, kv[0], kv[1]


class _WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learnt relative-position bias."""

    def __init__(self, dim: int, win: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.win = win
        self.heads = heads
        self.scale = float((dim // heads) ** -0.5)
        # Registered in the release's order (table, index, then the projections): state_dict() keeps its key order.
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * win - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(win))
        self.qkv = _LinearProjection(dim, heads, qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Optional[Tensor], b: int) -> Tensor:
        """``x`` (B * nW, N, C) window tokens of ``b`` = B images; ``mask`` (nW, N, N) additive, or None."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        # `.long()`: libtorch's Module::to(dtype), unlike Python's, also casts integer buffers; a TorchScript file
        # cast that way in someone's C++ code still indexes. A no-op for the int64 buffer.
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1).long()]
        attn = attn + bias.reshape(n, n, self.heads).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.reshape(b, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)) \
                .reshape(bw, self.heads, n, n)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c))


def relative_position_index(win: int) -> Tensor:
    """(win*win, win*win) int64: the bias-table row of each pair of tokens of a window (Swin's layout)."""
    coords = torch.stack(torch.meshgrid(torch.arange(win), torch.arange(win), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (win - 1)
    return rel[:, :, 0] * (2 * win - 1) + rel[:, :, 1]


class _LeFF(nn.Module):
    """Locally-enhanced feed-forward: linear + GELU, depth-wise 3x3 conv + GELU on the token map, linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear1 = nn.Sequential(nn.Linear(dim, hidden), nn.GELU())
        self.dwconv = nn.Sequential(nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden), nn.GELU())
        self.linear2 = nn.Sequential(nn.Linear(hidden, dim))

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return self.linear2(_to_tokens(self.dwconv(_to_map(self.linear1(x), h, w))))


class _LeWinBlock(nn.Module):
    """Locally-enhanced window transformer block: (shifted) window attention, with the learnt modulator added to
    its input in the decoder, then LeFF; each with stochastic depth."""

    __constants__ = ["win", "shift", "has_modulator"]

    def __init__(self, dim: int, heads: int, win: int, shift: int, mlp_ratio: float, qkv_bias: bool,
                 drop_path: float, modulator: bool):
        super().__init__()
        self.win = win
        self.shift = shift
        self.has_modulator = modulator
        if modulator:
            self.modulator = nn.Embedding(win * win, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _WindowAttention(dim, win, heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _LeFF(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, _, c = x.shape
        win, shift = self.win, self.shift
        y = self.norm1(x).reshape(b, h, w, c)
        mask: Optional[Tensor] = None
        if shift > 0:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
            mask = shift_attention_mask(h, w, win, shift, x.device, x.dtype)
        # Sizes spelt out, from the batch b (see window_partition): no -1 for torch.export to infer.
        bw = b * (h // win) * (w // win)
        windows = window_partition(y, win).reshape(bw, win * win, c)
        if self.has_modulator:
            windows = windows + self.modulator.weight
        y = window_reverse(self.attn(windows, mask, b).reshape(bw, win, win, c), win, h, w, b)
        if shift > 0:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        x = x + self.drop_path(y.reshape(b, h * w, c))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class _Layer(nn.Module):
    """``BasicUformerLayer``: blocks on one token grid, every second one shifted (keys ``blocks.<i>.*``)."""

    def __init__(self, dim: int, resolution: int, depth: int, heads: int, win_size: int, mlp_ratio: float,
                 qkv_bias: bool, drop_path: Sequence[float], modulator: bool = False):
        super().__init__()
        win, shifts = _window_for(resolution, win_size)
        self.blocks = nn.ModuleList([
            _LeWinBlock(dim, heads, win, win // 2 if (shifts and i % 2 == 1) else 0, mlp_ratio, qkv_bias,
                        drop_path[i], modulator)
            for i in range(depth)])

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        for block in self.blocks:
            x = block(x, h, w)
        return x


class _Downsample(nn.Module):
    """Conv 4x4 stride 2 on the token map (keys ``conv.0.*``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, out_channels, 4, 2, 1))

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return _to_tokens(self.conv(_to_map(x, h, w)))


class _Upsample(nn.Module):
    """Transposed conv 2x2 stride 2 on the token map (keys ``deconv.0.*``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.deconv = nn.Sequential(nn.ConvTranspose2d(in_channels, out_channels, 2, 2))

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return _to_tokens(self.deconv(_to_map(x, h, w)))


class _InputProj(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, 1, 1), nn.LeakyReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return _to_tokens(self.proj(x))


class _OutputProj(nn.Module):
    """Conv 3x3 to the image channels; applied to the (B, C, H, W) feature map."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _int_list(value: object, name: str, n: int, low: int) -> Tuple[int, ...]:
    ok = isinstance(value, (list, tuple)) and len(value) == n \
        and all(not isinstance(v, bool) and isinstance(v, int) and v >= low for v in value)
    if not ok:
        raise ValueError(f"{name}: expected {n} ints of at least {low}, got {value!r}")
    return tuple(int(v) for v in value)


class Uformer(Backbone):
    """MiOIR's Uformer (50,880,946 parameters as released; 50,956,533 with the TUR head).

    ``forward_features`` returns the last decoder layer's output as a (B, 2 * embed_dim, H, W) map, the input of
    ``output_proj`` (the image is ``x + output_proj(features)``) and of the TUR head. H and W: multiples of
    ``16 * win_size`` (128 as released). The configuration options other than the defaults serve tests and CPU work
    (a narrower, shallower Uformer with the same blocks); ``win_size`` below 16 keeps every layer's windows as
    released (the release shrinks a window to a layer's size only where the layer is no larger than it at 256
    pixels).
    """

    feature_channels = 64
    size_multiple = 128
    min_size = 128
    # The module's keys are MiOIR's (release_state_dict is the default): spandrel detects them as Uformer.
    release_layout = "Uformer (Xiangtaokong/MiOIR, BasicSR 'params')"
    supports_fp16 = False  # not verified on a GPU yet

    def __init__(self, embed_dim: int = 32, depths: Sequence[int] = _DEPTHS, num_heads: Sequence[int] = _HEADS,
                 win_size: int = 8, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.1,
                 modulator: bool = True):
        super().__init__()
        e = _positive_int(embed_dim, "embed_dim")
        depths = _int_list(depths, "depths", 2 * _LEVELS + 1, 1)
        heads = _int_list(num_heads, "num_heads", 2 * _LEVELS + 1, 1)
        if isinstance(win_size, bool) or not isinstance(win_size, int) or not 2 <= win_size < 16:
            raise ValueError(f"win_size: expected an int from 2 to 15, got {win_size!r}")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio: expected a positive number, got {mlp_ratio!r}")
        if isinstance(drop_path_rate, bool) or not isinstance(drop_path_rate, (int, float)) \
                or not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate: expected a number in [0, 1), got {drop_path_rate!r}")
        for name, value in (("qkv_bias", qkv_bias), ("modulator", modulator)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}: expected a bool, got {value!r}")
        # Channels per layer: encoder e, 2e, 4e, 8e; bottleneck 16e; decoder 16e, 8e, 4e, 2e (upsampled + skip).
        dims = [e * 2 ** i for i in range(_LEVELS + 1)] + [e * 2 ** (_LEVELS - i) for i in range(_LEVELS)]
        for i, (d, nh) in enumerate(zip(dims, heads)):
            if d % nh:
                raise ValueError(f"num_heads: layer {i} has {d} channels, not divisible by {nh} heads")
        self.embed_dim = e
        self.win_size = win_size
        self.feature_channels = 2 * e
        # Windows of win_size at the 1/16 bottleneck: sides are multiples of 16 * win_size, the smallest is one window.
        self.size_multiple = 2 ** _LEVELS * win_size
        self.min_size = self.size_multiple
        # At the smallest size the bottleneck is one window per image, and torch.export specialises its graph on
        # that size-1 window count (the program guards H // size_multiple != 1, W alike): dynamic exports hold from
        # two windows up.
        self.export_min_size = 2 * self.size_multiple
        rate = float(drop_path_rate)
        enc = _drop_path_rates(rate, sum(depths[:_LEVELS]))
        dec = enc[::-1]
        starts = [sum(depths[:i]) for i in range(_LEVELS + 1)]
        dec_starts = [sum(depths[_LEVELS + 1:_LEVELS + 1 + i]) for i in range(_LEVELS + 1)]
        res = [_IMG_SIZE // 2 ** i for i in range(_LEVELS + 1)]

        def layer(i: int, rates: Sequence[float], resolution: int, mod: bool = False) -> _Layer:
            return _Layer(dims[i], resolution, depths[i], heads[i], win_size, mlp_ratio, qkv_bias, rates, mod)

        # Attribute order is the release's, so state_dict() lists keys as its files do.
        self.input_proj = _InputProj(self.in_channels, e)
        self.output_proj = _OutputProj(2 * e, self.out_channels)
        for i in range(_LEVELS):
            setattr(self, f"encoderlayer_{i}", layer(i, enc[starts[i]:starts[i + 1]], res[i]))
            setattr(self, f"dowsample_{i}", _Downsample(dims[i], dims[i] * 2))  # sic: the release's key
        self.conv = layer(_LEVELS, [rate] * depths[_LEVELS], res[_LEVELS])
        for i in range(_LEVELS):
            j = _LEVELS + 1 + i
            setattr(self, f"upsample_{i}", _Upsample(dims[j - 1], dims[j] // 2))
            setattr(self, f"decoderlayer_{i}", layer(j, dec[dec_starts[i]:dec_starts[i + 1]], res[_LEVELS - 1 - i],
                                                     modulator))
        # The release's `_init_weights` (convolutions, the bias tables and the modulators keep their own init).
        self.apply(init_linear_and_norm)

    @classmethod
    def size_multiple_for(cls, config: Mapping[str, object]) -> int:
        win = config.get("win_size", 8)
        return 2 ** _LEVELS * int(win) if isinstance(win, int) and not isinstance(win, bool) else cls.size_multiple

    def forward_features(self, x: Tensor) -> Tensor:
        hs: List[int] = [x.shape[2]]
        ws: List[int] = [x.shape[3]]
        for _ in range(4):  # the grid of each level, down to the 1/16 bottleneck
            hs.append(hs[-1] // 2)
            ws.append(ws[-1] // 2)
        y = self.input_proj(x)
        conv0 = self.encoderlayer_0(y, hs[0], ws[0])
        conv1 = self.encoderlayer_1(self.dowsample_0(conv0, hs[0], ws[0]), hs[1], ws[1])
        conv2 = self.encoderlayer_2(self.dowsample_1(conv1, hs[1], ws[1]), hs[2], ws[2])
        conv3 = self.encoderlayer_3(self.dowsample_2(conv2, hs[2], ws[2]), hs[3], ws[3])
        conv4 = self.conv(self.dowsample_3(conv3, hs[3], ws[3]), hs[4], ws[4])
        d = self.decoderlayer_0(torch.cat([self.upsample_0(conv4, hs[4], ws[4]), conv3], -1), hs[3], ws[3])
        d = self.decoderlayer_1(torch.cat([self.upsample_1(d, hs[3], ws[3]), conv2], -1), hs[2], ws[2])
        d = self.decoderlayer_2(torch.cat([self.upsample_2(d, hs[2], ws[2]), conv1], -1), hs[1], ws[1])
        d = self.decoderlayer_3(torch.cat([self.upsample_3(d, hs[1], ws[1]), conv0], -1), hs[0], ws[0])
        return _to_map(d, hs[0], ws[0])

    def reconstruct(self, features: Tensor, x: Tensor) -> Tensor:
        return x + self.output_proj(features)

    #: The keys :meth:`detect_config` looks for (``*``: a prefix); listed when a file matches no architecture.
    detect_keys = ("input_proj.proj.0.weight", "encoderlayer_0.*", "conv.blocks.*", "output_proj.*")

    @classmethod
    def detect_config(cls, state_dict: Mapping[str, Tensor]) -> Optional[Dict[str, Any]]:
        """The configuration of a Uformer state dict (MiOIR's layout, with or without the TUR head), or None if it is
        not one: the embedding width, the blocks and heads of the nine layers (heads: the columns of each layer's
        relative-position bias table), the window size (from the table's (2w - 1)**2 rows: below 16 every layer's
        windows have that size) and the feed-forward ratio. ``drop_path_rate`` is a training choice, not a shape."""
        embed = shape(state_dict, "input_proj.proj.0.weight", 4)
        if embed is None or not has_keys(state_dict, cls.detect_keys):
            return None
        layers = [f"encoderlayer_{i}" for i in range(_LEVELS)] + ["conv"] \
            + [f"decoderlayer_{i}" for i in range(_LEVELS)]
        tables = [shape(state_dict, f"{layer}.blocks.0.attn.relative_position_bias_table", 2) for layer in layers]
        win = window_from_table(tables[0][0]) if None not in tables else None
        if win is None:
            return None
        # LeFF widths, (dim, hidden): linear1 maps dim -> hidden.
        mlps = [shape(state_dict, k, 2)[::-1] for k in state_dict if k.endswith(".mlp.linear1.0.weight")]
        config: Dict[str, Any] = {
            "embed_dim": embed[0],
            "depths": [count(state_dict, f"{layer}.blocks.") for layer in layers],
            "num_heads": [table[1] for table in tables],
            "win_size": win,
        }
        return {**config, **unless_default(
            cls, mlp_ratio=expansion_ratio(mlps, 4.0),
            qkv_bias="encoderlayer_0.blocks.0.attn.qkv.to_q.bias" in state_dict,
            modulator="decoderlayer_0.blocks.0.modulator.weight" in state_dict)}

    @torch.jit.unused
    def adapt_state_dict(self, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Fill in relative-position indices a file lacks (they follow from the window size) and refuse one whose
        indices are not the window size's (a file of another window configuration)."""
        out = dict(state_dict)
        for name, buf in self.named_buffers():
            if not name.endswith("relative_position_index"):
                continue
            if name not in out:
                out[name] = buf.clone()
            elif out[name].shape == buf.shape and not torch.equal(out[name].to(buf.dtype), buf):
                raise ValueError(f"state dict: {name} is not the relative-position index of {int(buf.shape[0])}-token "
                                 f"windows; the file was saved from another window configuration")
        return out
