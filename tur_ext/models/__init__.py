"""Restoration backbones with a plug-and-play uncertainty head.

    from tur_ext.models import build, strip_uncertainty, pad_to_multiple, crop_to
    model = build("nafnet-tiny", uncertainty=True)        # forward(x) -> (image, uncertainty)
    x, size = pad_to_multiple(images, model.size_multiple)  # reflect-pad bottom/right
    image, u = model(x)
    plain = strip_uncertainty(model)                       # forward(x) -> image, same weights
    restored = crop_to(plain(x), size)

Weights from elsewhere: :func:`detect_file` (or :func:`detect_architecture` of a loaded checkpoint) says which
registered architecture and ``build()`` configuration a file holds, :func:`load_weights` loads it.

Registered names: see :func:`available`; each model has ``arch``, ``config``, ``size_multiple``, ``min_size``,
``input_range``/``output_range`` and ``supports_fp16``, and :func:`spec` gives the size facts without building one.
"""
from .airnet import AirNet
from .detect import Detection, detect_architecture, detect_file
from .head import Backbone, UncertaintyHead, attach_uncertainty_head, strip_uncertainty
from .nafnet import NAFNet
from .padding import crop_to, pad_to_multiple, padded_size
from .promptir import PromptIR
from .registry import ModelSpec, available, build, spec
from .transweather import TransWeather
from .uformer import Uformer
from .value_range import from_model_range, model_ranges, to_model_range
from .weights import LoadReport, WeightsMismatchError, load_weights, read_state_dict

__all__ = [
    "AirNet",
    "Backbone",
    "Detection",
    "LoadReport",
    "ModelSpec",
    "NAFNet",
    "PromptIR",
    "TransWeather",
    "UncertaintyHead",
    "Uformer",
    "WeightsMismatchError",
    "attach_uncertainty_head",
    "available",
    "build",
    "crop_to",
    "detect_architecture",
    "detect_file",
    "from_model_range",
    "load_weights",
    "model_ranges",
    "pad_to_multiple",
    "padded_size",
    "read_state_dict",
    "spec",
    "strip_uncertainty",
    "to_model_range",
]
