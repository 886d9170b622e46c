"""The plug-and-play uncertainty head and the backbone contract it plugs into.

A :class:`Backbone` splits its forward into ``forward_features`` (the last decoder features, before the output
convolution) and ``reconstruct`` (features + input -> image). With a head attached (the ``var_conv`` submodule, named
as in the published TUR code so checkpoints keep their keys) the forward returns ``(image, uncertainty)``; without one
it returns the image alone. By default the head reads the same, non-detached features as the output convolution, so
the loss on the uncertainty also trains the backbone; ``uncertainty_input`` (a study knob, see
:data:`HEAD_INPUTS`) makes it read detached features or the degraded input image instead.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor, nn

__all__ = ["UncertaintyHead", "Backbone", "attach_uncertainty_head", "strip_uncertainty", "HEAD_NAME", "HEAD_INPUTS"]

#: Attribute (and state-dict prefix) of the head inside a backbone.
HEAD_NAME = "var_conv"

#: What the head reads: ``features`` (the published method: the last decoder features), ``detached`` (the same
#: features with the gradient stopped, so the uncertainty loss does not shape the backbone), ``input`` (the degraded
#: input image itself).
HEAD_INPUTS = ("features", "detached", "input")


class UncertaintyHead(nn.Sequential):
    """conv3x3 -> ELU -> conv3x3 -> ELU -> conv3x3 -> Softplus: a positive per-pixel uncertainty map.

    A ``Sequential`` so that its weights are ``0.*``, ``2.*`` and ``4.*`` (the published ``var_conv`` layout).
    Softplus is positive down to pre-activations of about -87 in fp32 (-15 in fp16), below which it underflows to 0;
    the TUR loss adds ``eps`` to the task uncertainty for that reason.
    """

    def __init__(self, in_channels: int, out_channels: int = 3, hidden_channels: Optional[int] = None):
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        hidden = in_channels if hidden_channels is None else hidden_channels
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden_channels: expected a positive int, got {hidden_channels!r}")
        super().__init__(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.ELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ELU(),
            nn.Conv2d(hidden, out_channels, 3, padding=1),
            nn.Softplus(),
        )
        self.in_channels = in_channels
        self.out_channels = out_channels


class Backbone(nn.Module):
    """Base class of the restoration networks in :mod:`tur_ext.models`.

    Subclasses set ``in_channels``, ``out_channels``, ``feature_channels`` (channels of ``forward_features``),
    ``size_multiple`` and ``supports_fp16``, and implement ``forward_features`` and ``reconstruct``. Where they differ
    from the defaults they also set ``min_size`` (the smallest H and W, a multiple of ``size_multiple``) and
    ``input_range``/``output_range`` (the value ranges the forward takes and returns; see
    :mod:`tur_ext.models.value_range`), and ``export_min_size`` where a dynamic-shape ``torch.export`` needs larger
    inputs than the eager model (``None``: ``min_size``), and ``onnx_min_opset`` where an ONNX export needs a newer
    opset than the default (AirNet's DeformConv: 19).
    :func:`tur_ext.models.build` fills in ``arch`` and ``config`` (``build(model.arch, **model.config)`` rebuilds the
    same architecture, head included).
    """

    # Class attributes without annotations: TorchScript would try to type annotated ones as module attributes.
    in_channels = 3
    out_channels = 3
    feature_channels = 0
    size_multiple = 1
    min_size = 1
    export_min_size = None
    onnx_min_opset = 18
    supports_fp16 = False
    input_range = (0.0, 1.0)
    output_range = (0.0, 1.0)

    def __init__(self) -> None:
        super().__init__()
        self.arch: str = type(self).__name__.lower()
        self.config: Dict[str, Any] = {}
        # A plain attribute until a head is attached, so the head's keys come after the backbone's in state_dict().
        self.var_conv: Optional[UncertaintyHead] = None
        self.head_input: str = "features"

    @classmethod
    def size_multiple_for(cls, config: Mapping[str, Any]) -> int:
        """The ``size_multiple`` of the model ``cls(**config)`` would build, without building it."""
        return cls.size_multiple

    @property
    def has_uncertainty(self) -> bool:
        return self.var_conv is not None

    @torch.jit.unused
    def adapt_state_dict(self, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Map a checkpoint's state dict, in the key layout of this architecture's releases, onto this module.

        :func:`~tur_ext.models.load_weights` calls it after it has found the state dict in the file and removed
        wrapper prefixes, before it compares keys and shapes. An architecture whose releases differ from its module
        overrides it, for example to drop modules a release carries but its forward never uses, to rename the head's
        keys, or to resize a buffer whose shape only the file knows (the module may be changed in place for that).
        The default returns ``state_dict`` unchanged.
        """
        return state_dict

    #: What :meth:`release_state_dict` produces: the upstream release whose key layout it follows (safetensors
    #: exports record it; ``None``: this package's own layout, no upstream release to match).
    release_layout = None

    @torch.jit.unused
    def release_state_dict(self) -> Dict[str, Tensor]:
        """The backbone's weights (uncertainty head excluded) in the key layout its authors release, so that their
        code and tools that detect architectures from keys (spandrel) load them as they load the release.

        The inverse of :meth:`adapt_state_dict`: ``load_weights`` of the result into a fresh model of the same
        ``config`` reproduces this model. Tensors are detached, contiguous copies. The default is the module's own
        state dict without the head; an architecture whose releases differ (extra unused modules, renamed keys)
        overrides it and sets ``release_layout``.
        """
        return {k: v.detach().clone().contiguous() for k, v in self.state_dict().items()
                if not k.startswith(HEAD_NAME + ".")}

    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def reconstruct(self, features: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.jit.unused
    def check_input(self, x: Tensor) -> None:
        """Raise a ValueError unless ``x`` is ``(B, in_channels, H, W)`` with H, W multiples of ``size_multiple`` and
        at least ``min_size``."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        m, low = self.size_multiple, self.min_size
        if h % m or w % m or h < low or w < low:
            rule, call = f"multiples of {m}", f"pad_to_multiple(x, {m})"
            if low > m:
                rule, call = rule + f" and at least {low}", f"pad_to_multiple(x, {m}, min_size={low})"
            raise ValueError(
                f"x: height and width must be {rule} for {self.arch}, got {h}x{w}; "
                f"pad with tur_ext.models.{call} and crop back with crop_to")

    def forward(self, x: Tensor):
        """``x`` (B, in_channels, H, W) -> the restored image, or ``(image, uncertainty)`` with a head."""
        if not torch.jit.is_scripting():
            self.check_eager_input(x)
        return self.outputs(self.forward_features(x), x)

    @torch.jit.unused
    def check_eager_input(self, x: Tensor) -> None:
        """:meth:`check_input` when running eagerly: shape checks are Python-side, kept out of traced, exported and
        compiled graphs."""
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self.check_input(x)

    def outputs(self, features: Tensor, x: Tensor):
        """The image (and the uncertainty with a head) from the backbone's ``features`` of the input ``x``."""
        image = self.reconstruct(features, x)
        if self.var_conv is None:
            return image
        if self.head_input == "detached":
            return image, self.var_conv(features.detach())
        if self.head_input == "input":
            return image, self.var_conv(x)
        return image, self.var_conv(features)


def attach_uncertainty_head(model: Backbone, out_channels: Optional[int] = None, input: str = "features") -> Backbone:
    """Give ``model`` a freshly initialised head with ``out_channels`` maps (default: the image channels) that reads
    ``input`` (one of :data:`HEAD_INPUTS`; default the backbone's last decoder features)."""
    if not isinstance(model, Backbone):
        raise TypeError(f"model: expected a tur_ext.models Backbone, got {type(model).__name__}")
    if input not in HEAD_INPUTS:
        raise ValueError(f"input: expected one of {list(HEAD_INPUTS)}, got {input!r}")
    channels = model.out_channels if out_channels is None else out_channels
    head = UncertaintyHead(model.in_channels if input == "input" else model.feature_channels, channels)
    param = next(model.parameters(), None)
    if param is not None:
        head = head.to(device=param.device, dtype=param.dtype)
    if HEAD_NAME in model.__dict__:
        del model.__dict__[HEAD_NAME]
    model.add_module(HEAD_NAME, head)
    model.head_input = input
    model.config = {**model.config, "uncertainty": True, "uncertainty_channels": channels}
    if input != "features":  # only then: default configs (and checkpoints) keep their keys
        model.config["uncertainty_input"] = input
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    # DataParallel/DistributedDataParallel keep the network in .module, torch.compile in ._orig_mod.
    for attr in ("_orig_mod", "module"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and not isinstance(model, Backbone):
            return _unwrap(inner)
    return model


def strip_uncertainty(model: nn.Module) -> Backbone:
    """The plain backbone of ``model``: same weights, forward returns only the image.

    The result is a new top-level module that *shares* its submodules and parameters with ``model`` (no copy, same
    device, dtype and mode); ``model`` keeps its head. Use ``copy.deepcopy`` on the result for an independent copy.
    DataParallel, DistributedDataParallel and ``torch.compile`` wrappers are looked through.
    """
    net = _unwrap(model)
    if not isinstance(net, Backbone):
        raise TypeError(f"model: expected a tur_ext.models Backbone (or a wrapper of one), got {type(model).__name__}")
    plain = net.__class__.__new__(net.__class__)
    # Shallow-copy every dict of the module (parameters, buffers, submodules, hooks, config) so that removing the head
    # here leaves `net` untouched while the tensors themselves stay shared.
    plain.__dict__.update({k: (type(v)(v) if isinstance(v, (dict, set)) else v) for k, v in net.__dict__.items()})
    modules: "OrderedDict[str, Optional[nn.Module]]" = plain.__dict__["_modules"]
    modules.pop(HEAD_NAME, None)
    plain.__dict__[HEAD_NAME] = None
    plain.config = {**net.config, "uncertainty": False}
    plain.config.pop("uncertainty_channels", None)
    plain.config.pop("uncertainty_input", None)
    plain.head_input = "features"
    return plain
