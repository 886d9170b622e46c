"""PromptIR (Potlapalli et al., NeurIPS 2023), the all-in-one variant with prompts in the decoder.

The module tree, parameter names and forward computation follow the official release (``net/model.py``,
``PromptIR(decoder=True)``), so its Lightning checkpoint loads unchanged (see :func:`tur_ext.models.load_weights`).
Differences that do not change the fp32 result: reshapes are native (no einops) so the model traces and exports, the
layer norm works over the channel dim in place of a transpose round trip, and the two reductions that overflow in
fp16 (layer-norm variance, the L2 norms over all pixels in the attention) run in fp32 whatever the input dtype.

The official constructor hard-codes some channel counts that only agree with each other at ``dim=48`` and the default
prompt sizes; here they are derived from the configuration (identical at the defaults) so that small configurations
for tests and CPU work are consistent. The official model also defines modules its forward never uses
(``chnl_reduce1-3``, ``reduce_noise_channel_1-3``); they are kept (``include_unused=True``) because the released
checkpoint contains them.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .detect import count, expansion_ratio, has_keys, shape, unless_default
from .head import Backbone

__all__ = ["PromptIR"]

_LAYERNORM_TYPES = ("WithBias", "BiasFree")
#: Key prefixes of the modules the release defines but its forward never uses (``include_unused``).
_UNUSED_MODULES = ("chnl_reduce", "reduce_noise_channel_")


class _ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dim of (B, C, H, W), eps 1e-5, as Restormer's ``WithBias``/``BiasFree`` norms."""

    def __init__(self, dim: int, with_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if with_bias else None

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        var = xf.var(dim=1, keepdim=True, unbiased=False)
        weight = self.weight.float().reshape(1, -1, 1, 1)
        if self.bias is None:
            # BiasFree scales without centring (the variance is still taken around the mean).
            y = xf / torch.sqrt(var + 1e-5) * weight
        else:
            y = (xf - xf.mean(dim=1, keepdim=True)) / torch.sqrt(var + 1e-5) * weight
            y = y + self.bias.float().reshape(1, -1, 1, 1)
        return y.to(x.dtype)


class LayerNorm(nn.Module):
    """Holds the norm under ``body`` (official parameter names ``norm1.body.weight``)."""

    def __init__(self, dim: int, layernorm_type: str):
        super().__init__()
        self.body = _ChannelLayerNorm(dim, with_bias=(layernorm_type == "WithBias"))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class FeedForward(nn.Module):
    """Gated-Dconv feed-forward network (GDFN)."""

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class Attention(nn.Module):
    """Multi-Dconv head transposed attention (MDTA): attention across channels, per head."""

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        q = q.reshape(b, self.num_heads, c // self.num_heads, h * w)
        k = k.reshape(b, self.num_heads, c // self.num_heads, h * w)
        v = v.reshape(b, self.num_heads, c // self.num_heads, h * w)
        # The norms sum over every pixel: in fp16 they overflow beyond a few hundred pixels, so take them in fp32.
        q = F.normalize(q.float(), dim=-1)
        k = F.normalize(k.float(), dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature.float()
        attn = attn.softmax(dim=-1).to(v.dtype)
        out = (attn @ v).reshape(b, c, h, w)
        return self.project_out(out)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool, layernorm_type: str):
        super().__init__()
        self.norm1 = LayerNorm(dim, layernorm_type)
        self.attn = Attention(dim, num_heads, bias)
        self.norm2 = LayerNorm(dim, layernorm_type)
        self.ffn = FeedForward(dim, ffn_expansion_factor, bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class OverlapPatchEmbed(nn.Module):
    def __init__(self, in_channels: int, embed_dim: int, bias: bool):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=3, padding=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """Halve the resolution, double the channels: conv to C/2, then pixel-unshuffle by 2."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat // 2, kernel_size=3, padding=1, bias=False),
                                  nn.PixelUnshuffle(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """Double the resolution, halve the channels: conv to 2C, then pixel-shuffle by 2."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat * 2, kernel_size=3, padding=1, bias=False),
                                  nn.PixelShuffle(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class PromptGenBlock(nn.Module):
    """Mixes ``prompt_len`` learned prompts with weights predicted from the features, resized to the features."""

    def __init__(self, prompt_dim: int, prompt_len: int, prompt_size: int, lin_dim: int):
        super().__init__()
        self.prompt_param = nn.Parameter(torch.rand(1, prompt_len, prompt_dim, prompt_size, prompt_size))
        self.linear_layer = nn.Linear(lin_dim, prompt_len)
        self.conv3x3 = nn.Conv2d(prompt_dim, prompt_dim, kernel_size=3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        weights = F.softmax(self.linear_layer(x.mean(dim=(-2, -1))), dim=1)  # (B, L)
        prompt = (weights[:, :, None, None, None] * self.prompt_param).sum(dim=1)  # (B, C, S, S)
        prompt = F.interpolate(prompt, size=(h, w), mode="bilinear", align_corners=False)
        return self.conv3x3(prompt)


def _blocks(n: int, dim: int, heads: int, ffn: float, bias: bool, ln: str) -> nn.Sequential:
    return nn.Sequential(*[TransformerBlock(dim, heads, ffn, bias, ln) for _ in range(n)])


def _positive_ints(name: str, value: Sequence[int], length: int) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else None
    if (values is None or len(values) != length
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values)):
        shown = value[0] if length == 1 and isinstance(value, list) else value
        expected = "a positive int" if length == 1 else f"{length} positive ints"
        raise ValueError(f"{name}: expected {expected}, got {shown!r}")
    return values


class PromptIR(Backbone):
    """PromptIR with decoder prompts; the default configuration is the released model (35,592,263 parameters).

    ``forward_features`` returns the refined full-resolution decoder features (``2*dim`` channels), the input of the
    output convolution and of the uncertainty head.
    """

    size_multiple = 8  # three 2x pixel-unshuffles
    supports_fp16 = True

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        dim: int = 48,
        num_blocks: Sequence[int] = (4, 6, 6, 8),
        num_refinement_blocks: int = 4,
        heads: Sequence[int] = (1, 2, 4, 8),
        ffn_expansion_factor: float = 2.66,
        bias: bool = False,
        layernorm_type: str = "WithBias",
        prompt_dims: Sequence[int] = (64, 128, 320),
        prompt_sizes: Sequence[int] = (64, 32, 16),
        prompt_len: int = 5,
        include_unused: bool = True,
    ):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("dim", dim),
                            ("num_refinement_blocks", num_refinement_blocks), ("prompt_len", prompt_len)):
            _positive_ints(name, [value], 1)
        if out_channels != in_channels:
            raise ValueError(f"out_channels: the output adds the input image, so it must equal in_channels "
                             f"({in_channels}), got {out_channels}")
        nb = _positive_ints("num_blocks", num_blocks, 4)
        hd = _positive_ints("heads", heads, 4)
        p1, p2, p3 = _positive_ints("prompt_dims", prompt_dims, 3)
        s1, s2, s3 = _positive_ints("prompt_sizes", prompt_sizes, 3)
        if layernorm_type not in _LAYERNORM_TYPES:
            raise ValueError(f"layernorm_type: expected one of {_LAYERNORM_TYPES}, got {layernorm_type!r}")
        if not isinstance(ffn_expansion_factor, (int, float)) or ffn_expansion_factor <= 0:
            raise ValueError(f"ffn_expansion_factor: expected a positive number, got {ffn_expansion_factor!r}")
        if dim % 2:
            raise ValueError(f"dim: expected an even number (the downsampling halves it), got {dim}")
        # Every attention splits its channels evenly over its heads.
        for what, channels, h in (("level 1", dim, hd[0]), ("level 2", 2 * dim, hd[1]), ("level 3", 4 * dim, hd[2]),
                                  ("latent", 8 * dim, hd[3]), ("decoder level 1", 2 * dim, hd[0]),
                                  ("noise_level3", 8 * dim + p3, hd[2]), ("noise_level2", 4 * dim + p2, hd[2]),
                                  ("noise_level1", 2 * dim + p1, hd[2])):
            if channels % h:
                raise ValueError(f"heads: {what} has {channels} channels, not divisible by {h} heads")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.feature_channels = 2 * dim
        ffn, ln = float(ffn_expansion_factor), layernorm_type

        # Attribute order follows the official constructor, so state_dict() lists keys in the released order.
        self.patch_embed = OverlapPatchEmbed(in_channels, dim, bias)
        self.prompt1 = PromptGenBlock(p1, prompt_len, s1, lin_dim=2 * dim)
        self.prompt2 = PromptGenBlock(p2, prompt_len, s2, lin_dim=4 * dim)
        self.prompt3 = PromptGenBlock(p3, prompt_len, s3, lin_dim=8 * dim)
        if include_unused:
            self.chnl_reduce1 = nn.Conv2d(p1, p1, kernel_size=1, bias=bias)
            self.chnl_reduce2 = nn.Conv2d(p2, p2, kernel_size=1, bias=bias)
            self.chnl_reduce3 = nn.Conv2d(p3, 2 * p2, kernel_size=1, bias=bias)
            self.reduce_noise_channel_1 = nn.Conv2d(dim + p1, dim, kernel_size=1, bias=bias)
        self.encoder_level1 = _blocks(nb[0], dim, hd[0], ffn, bias, ln)
        self.down1_2 = Downsample(dim)
        if include_unused:
            self.reduce_noise_channel_2 = nn.Conv2d(2 * dim + p2, 2 * dim, kernel_size=1, bias=bias)
        self.encoder_level2 = _blocks(nb[1], 2 * dim, hd[1], ffn, bias, ln)
        self.down2_3 = Downsample(2 * dim)
        if include_unused:
            self.reduce_noise_channel_3 = nn.Conv2d(4 * dim + 2 * p2, 4 * dim, kernel_size=1, bias=bias)
        self.encoder_level3 = _blocks(nb[2], 4 * dim, hd[2], ffn, bias, ln)
        self.down3_4 = Downsample(4 * dim)
        self.latent = _blocks(nb[3], 8 * dim, hd[3], ffn, bias, ln)

        self.up4_3 = Upsample(4 * dim)  # applied after reduce_noise_level3 brought the latent to 4*dim
        self.reduce_chan_level3 = nn.Conv2d(2 * dim + 4 * dim, 4 * dim, kernel_size=1, bias=bias)
        self.noise_level3 = TransformerBlock(8 * dim + p3, hd[2], ffn, bias, ln)
        self.reduce_noise_level3 = nn.Conv2d(8 * dim + p3, 4 * dim, kernel_size=1, bias=bias)
        self.decoder_level3 = _blocks(nb[2], 4 * dim, hd[2], ffn, bias, ln)

        self.up3_2 = Upsample(4 * dim)
        self.reduce_chan_level2 = nn.Conv2d(4 * dim, 2 * dim, kernel_size=1, bias=bias)
        self.noise_level2 = TransformerBlock(4 * dim + p2, hd[2], ffn, bias, ln)
        self.reduce_noise_level2 = nn.Conv2d(4 * dim + p2, 4 * dim, kernel_size=1, bias=bias)
        self.decoder_level2 = _blocks(nb[1], 2 * dim, hd[1], ffn, bias, ln)

        self.up2_1 = Upsample(2 * dim)
        self.noise_level1 = TransformerBlock(2 * dim + p1, hd[2], ffn, bias, ln)
        self.reduce_noise_level1 = nn.Conv2d(2 * dim + p1, 2 * dim, kernel_size=1, bias=bias)
        self.decoder_level1 = _blocks(nb[0], 2 * dim, hd[0], ffn, bias, ln)
        self.refinement = _blocks(num_refinement_blocks, 2 * dim, hd[0], ffn, bias, ln)
        self.output = nn.Conv2d(2 * dim, out_channels, kernel_size=3, padding=1, bias=bias)

    release_layout = "PromptIR (va1shn9v/PromptIR, Lightning 'state_dict' without its 'net.' prefix)"

    @torch.jit.unused
    def release_state_dict(self) -> Dict[str, Tensor]:
        """The release's keys, the unused modules included: a model built with ``include_unused=False`` gets them
        as zeros (its forward never reads them), so that the official ``PromptIR(decoder=True)`` loads strictly."""
        sd = super().release_state_dict()
        if not hasattr(self, "chnl_reduce1"):
            params = inspect.signature(type(self).__init__).parameters
            config = {k: v for k, v in self.config.items() if k in params}
            with torch.device("meta"):
                full = type(self)(**{**config, "include_unused": True})
            sd.update({k: torch.zeros(v.shape, dtype=next(iter(sd.values())).dtype)
                       for k, v in full.state_dict().items() if k.startswith(_UNUSED_MODULES)})
        return sd

    #: The keys :meth:`detect_config` looks for (``*``: a prefix); listed when a file matches no architecture.
    detect_keys = ("patch_embed.proj.weight", "prompt1.prompt_param", "noise_level1.*")

    @classmethod
    def detect_config(cls, state_dict: Mapping[str, Tensor]) -> Optional[Dict[str, Any]]:
        """The configuration of a PromptIR state dict, or None if it is not one. The release has one configuration;
        the sizes are still read from the shapes so that smaller models trained with this package are found too."""
        embed = shape(state_dict, "patch_embed.proj.weight", 4)
        if embed is None or not has_keys(state_dict, cls.detect_keys):
            return None
        levels = ("encoder_level1", "encoder_level2", "encoder_level3", "latent")
        prompts = [shape(state_dict, f"prompt{i}.prompt_param", 5) for i in (1, 2, 3)]  # (1, len, dim, size, size)
        # Hidden widths of every feed-forward, (dim, hidden): project_out maps hidden -> dim.
        ffns = [shape(state_dict, k, 4)[:2] for k in state_dict if k.endswith(".ffn.project_out.weight")]
        config: Dict[str, Any] = {
            "dim": embed[0],
            "num_blocks": [count(state_dict, f"{level}.") for level in levels],
            "num_refinement_blocks": count(state_dict, "refinement."),
            "heads": [shape(state_dict, f"{level}.0.attn.temperature", 3)[0] for level in levels],
            "prompt_dims": [p[2] for p in prompts],
            "prompt_sizes": [p[3] for p in prompts],
            "prompt_len": prompts[0][1],
        }
        defaults = inspect.signature(cls.__init__).parameters
        return {**config, **unless_default(
            cls, in_channels=embed[1], out_channels=embed[1],
            ffn_expansion_factor=expansion_ratio(ffns, defaults["ffn_expansion_factor"].default),
            bias="patch_embed.proj.bias" in state_dict,
            layernorm_type="WithBias" if "encoder_level1.0.norm1.body.bias" in state_dict else "BiasFree",
            include_unused="chnl_reduce1.weight" in state_dict)}

    @torch.jit.unused
    def adapt_state_dict(self, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """A model built with ``include_unused=False`` drops the release's unused modules."""
        if hasattr(self, "chnl_reduce1"):
            return state_dict
        return {k: v for k, v in state_dict.items() if not k.startswith(_UNUSED_MODULES)}

    def forward_features(self, x: Tensor) -> Tensor:
        enc1 = self.encoder_level1(self.patch_embed(x))
        enc2 = self.encoder_level2(self.down1_2(enc1))
        enc3 = self.encoder_level3(self.down2_3(enc2))
        latent = self.latent(self.down3_4(enc3))

        latent = torch.cat([latent, self.prompt3(latent)], dim=1)
        latent = self.reduce_noise_level3(self.noise_level3(latent))
        dec3 = torch.cat([self.up4_3(latent), enc3], dim=1)
        dec3 = self.decoder_level3(self.reduce_chan_level3(dec3))

        dec3 = torch.cat([dec3, self.prompt2(dec3)], dim=1)
        dec3 = self.reduce_noise_level2(self.noise_level2(dec3))
        dec2 = torch.cat([self.up3_2(dec3), enc2], dim=1)
        dec2 = self.decoder_level2(self.reduce_chan_level2(dec2))

        dec2 = torch.cat([dec2, self.prompt1(dec2)], dim=1)
        dec2 = self.reduce_noise_level1(self.noise_level1(dec2))
        dec1 = torch.cat([self.up2_1(dec2), enc1], dim=1)
        return self.refinement(self.decoder_level1(dec1))

    def reconstruct(self, features: Tensor, x: Tensor) -> Tensor:
        return self.output(features) + x
