"""Registry, uncertainty head, strip_uncertainty, padding helpers, trace/export parity of every registered model."""
from __future__ import annotations

import json
import os

import numpy as np

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

import tur_ext
from tur_ext.models import (
    Backbone,
    NAFNet,
    PromptIR,
    UncertaintyHead,
    available,
    build,
    crop_to,
    pad_to_multiple,
    padded_size,
    spec,
    strip_uncertainty,
)

# torch 2.9+ deprecates TorchScript; deployment still offers it (issue 5), so it is tested here without the noise.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")

# Small configurations of the big families, so that most tests take milliseconds on 2 CPU cores.
SMALL_PROMPTIR = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 4, 8],
                      prompt_dims=[8, 16, 32], prompt_sizes=[8, 8, 8], include_unused=False)
SMALL_NAFNET = dict(width=8, enc_blocks=[1, 1], middle_blocks=1, dec_blocks=[1, 1])
SMALL = {"promptir": SMALL_PROMPTIR, "nafnet": SMALL_NAFNET, "transweather": dict(embed_dims=[8, 16, 32, 64]),
         "airnet": dict(features=16, groups=1, blocks=1, queue_size=32),
         "uformer": dict(embed_dim=8, depths=[1] * 9, num_heads=[1, 1, 2, 2, 4, 4, 2, 2, 1], win_size=2)}
# One of each family for behaviour tests.
FAMILIES = [("nafnet-tiny", {}), ("promptir", SMALL_PROMPTIR)]


def _make(name: str, seed: int = 0, **kwargs) -> Backbone:
    torch.manual_seed(seed)
    model = build(name, **{**SMALL.get(name, {}), **kwargs})
    # NAFNet initialises its residual scales to zero (every block starts as the identity), which would hide the
    # blocks from both the outputs and the gradients: give them random values.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("beta", "gamma")):
                p.normal_(0.0, 0.5)
    return model


def _tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _max_diff(a, b) -> float:
    a, b = _tuple(a), _tuple(b)
    assert len(a) == len(b)
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------------- registry


def test_available_lists_the_registered_models():
    names = available()
    assert names == tuple(sorted(names))
    assert {"promptir", "nafnet", "nafnet-tiny", "nafnet-w32"} <= set(names)


#: What the README declares per model (its models table and the TransWeather section: "fp16 is not declared").
#: test_fp16_inference_is_close_to_fp32 runs an fp16 forward of every model declared here as supporting it.
DECLARED = {  # name: (size multiple, supports fp16)
    "promptir": (8, True), "nafnet": (16, True), "nafnet-w32": (16, True), "nafnet-tiny": (8, True),
    "transweather": (16, False), "airnet": (1, False), "uformer": (128, False),
}


def test_every_registered_model_is_declared():
    assert set(available()) == set(DECLARED)


@pytest.mark.parametrize("name", available())
def test_spec_facts_match_the_built_model(name):
    with torch.device("meta"):  # no memory, no init: a 35M-parameter model builds instantly
        model = build(name)
    s = spec(name)
    assert model.arch == name
    assert (model.size_multiple, model.supports_fp16) == DECLARED[name]
    assert (s.size_multiple, s.supports_fp16) == DECLARED[name]
    assert isinstance(model.size_multiple, int) and model.size_multiple >= 1


def test_size_multiples_and_parameter_counts():
    with torch.device("meta"):
        counts = {n: sum(p.numel() for p in build(n).parameters()) for n in available()}
        multiples = {n: build(n).size_multiple for n in available()}
        deep = build("nafnet", width=8, enc_blocks=[1] * 5, middle_blocks=1, dec_blocks=[1] * 5)
    assert counts["promptir"] == 35_592_263
    with torch.device("meta"):
        with_head = {n: sum(p.numel() for p in build(n, uncertainty=True).parameters())
                     for n in ("promptir", "nafnet-w32", "nafnet-tiny")}
    # The README's models table, "N (M with head)".
    assert counts["nafnet-tiny"] == 407_603 and with_head["nafnet-tiny"] == 412_678
    assert with_head == {"promptir": 35_760_938, "nafnet-w32": 29_179_078, "nafnet-tiny": 412_678}
    assert counts["nafnet-w32"] == counts["nafnet"] == 29_159_715  # published NAFNet-width32: "29.1M"
    assert multiples == {"promptir": 8, "nafnet": 16, "nafnet-w32": 16, "nafnet-tiny": 8, "transweather": 16,
                         "airnet": 1, "uformer": 128}
    assert deep.size_multiple == 32 and spec("nafnet").size_multiple == 16


def test_nafnet_w32_uses_the_published_parameter_names():
    with torch.device("meta"):
        sd = build("nafnet-w32").state_dict()
    for key, shape in {
        "intro.weight": (32, 3, 3, 3),
        "ending.weight": (3, 32, 3, 3),
        "encoders.0.0.norm1.weight": (32,),
        "encoders.0.0.sca.1.weight": (32, 32, 1, 1),
        "encoders.0.0.beta": (1, 32, 1, 1),
        "encoders.3.7.conv2.weight": (512, 1, 3, 3),
        "downs.3.weight": (512, 256, 2, 2),
        "middle_blks.11.conv5.weight": (512, 512, 1, 1),
        "ups.0.0.weight": (1024, 512, 1, 1),
        "decoders.3.1.gamma": (1, 32, 1, 1),
    }.items():
        assert tuple(sd[key].shape) == shape, key
    assert list(sd)[:2] == ["intro.weight", "intro.bias"]


@pytest.mark.parametrize("name", ["nafnet-tiny", "promptir", "nafnet"])
@pytest.mark.parametrize("uncertainty", [False, True])
def test_config_rebuilds_the_same_model(name, uncertainty):
    model = build(name, uncertainty=uncertainty, **SMALL.get(name, {}))
    assert json.loads(json.dumps(model.config)) == model.config  # plain data, fit for a checkpoint
    assert model.config["uncertainty"] is uncertainty
    again = build(model.arch, **model.config)
    assert again.config == model.config
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_build_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown model 'unet'.*nafnet-tiny"):
        build("unet")
    with pytest.raises(TypeError, match="name"):
        build(3)
    with pytest.raises(ValueError, match="unknown option.*'widht'"):
        build("nafnet-tiny", widht=8)
    with pytest.raises(TypeError, match="uncertainty"):
        build("nafnet-tiny", uncertainty="yes")
    with pytest.raises(ValueError, match="uncertainty_channels"):
        build("nafnet-tiny", uncertainty_channels=1)
    with pytest.raises(ValueError, match="uncertainty_channels"):
        build("nafnet-tiny", uncertainty=True, uncertainty_channels=0)
    with pytest.raises(ValueError, match="heads"):
        build("promptir", **{**SMALL_PROMPTIR, "heads": [1, 3, 4, 8]})
    with pytest.raises(ValueError, match="dim"):
        build("promptir", **{**SMALL_PROMPTIR, "dim": 7})
    with pytest.raises(ValueError, match="num_blocks"):
        build("promptir", **{**SMALL_PROMPTIR, "num_blocks": [1, 1, 1]})
    with pytest.raises(ValueError, match="out_channels"):
        build("promptir", **{**SMALL_PROMPTIR, "out_channels": 1})
    with pytest.raises(ValueError, match="dec_blocks"):
        build("nafnet", width=8, enc_blocks=[1, 1], middle_blocks=1, dec_blocks=[1])
    with pytest.raises(ValueError, match="width"):
        build("nafnet", width=0)


@pytest.mark.parametrize("name,cfg", FAMILIES)
def test_forward_rejects_inputs_the_model_cannot_take(name, cfg):
    model = build(name, **cfg)
    m = model.size_multiple
    with pytest.raises(ValueError, match=f"multiples of {m}.*pad_to_multiple"):
        model(torch.rand(1, 3, 2 * m + 1, 2 * m))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 1, 2 * m, 2 * m))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(3, 2 * m, 2 * m))


def test_nafnet_matches_a_functional_reimplementation():
    """The NAFNet forward, recomputed with torch.nn.functional from the state dict (one level, one block each)."""
    model = _make("nafnet", width=4, enc_blocks=[1], middle_blocks=1, dec_blocks=[1]).eval()
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 8, 6)

    def ln(t, p):
        mu = t.mean(1, keepdim=True)
        var = ((t - mu) ** 2).mean(1, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-6) * sd[p + ".weight"][None, :, None, None] + sd[p + ".bias"][None, :, None, None]

    def conv(t, p, **kw):
        return F.conv2d(t, sd[p + ".weight"], sd.get(p + ".bias"), **kw)

    def block(t, p):
        c = t.shape[1]
        y = conv(conv(ln(t, p + ".norm1"), p + ".conv1"), p + ".conv2", padding=1, groups=2 * c)
        y = y[:, :c] * y[:, c:]
        y = conv(y * conv(y.mean((2, 3), keepdim=True), p + ".sca.1"), p + ".conv3")
        t = t + y * sd[p + ".beta"]
        y = conv(ln(t, p + ".norm2"), p + ".conv4")
        return t + conv(y[:, :c] * y[:, c:], p + ".conv5") * sd[p + ".gamma"]

    h = conv(x, "intro", padding=1)
    skip = block(h, "encoders.0.0")
    h = block(conv(skip, "downs.0", stride=2), "middle_blks.0")
    h = block(F.pixel_shuffle(conv(h, "ups.0.0"), 2) + skip, "decoders.0.0")
    expected = conv(h, "ending", padding=1) + x
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layernorm_type", ["WithBias", "BiasFree"])
def test_promptir_layer_norm_matches_restormer_formulas(layernorm_type):
    from tur_ext.models.promptir import LayerNorm

    torch.manual_seed(2)
    norm = LayerNorm(6, layernorm_type)
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
    x = torch.randn(2, 6, 5, 7) * 3 + 1
    tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C), the layout the official code normalises in
    if layernorm_type == "WithBias":
        expected = F.layer_norm(tokens, (6,), norm.body.weight, norm.body.bias, eps=1e-5)
        assert set(norm.state_dict()) == {"body.weight", "body.bias"}
    else:
        expected = tokens / torch.sqrt(tokens.var(-1, keepdim=True, unbiased=False) + 1e-5) * norm.body.weight
        assert set(norm.state_dict()) == {"body.weight"}
    expected = expected.transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)
    model = build("promptir", **{**SMALL_PROMPTIR, "layernorm_type": layernorm_type})
    assert model(torch.rand(1, 3, 16, 16)).shape == (1, 3, 16, 16)


# ------------------------------------------------------------------------------------------------------ head


def test_uncertainty_head_layout_and_reference_computation():
    torch.manual_seed(1)
    head = UncertaintyHead(6, 2)
    assert [type(m) for m in head] == [nn.Conv2d, nn.ELU, nn.Conv2d, nn.ELU, nn.Conv2d, nn.Softplus]
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == {
        "0.weight": (6, 6, 3, 3), "0.bias": (6,), "2.weight": (6, 6, 3, 3), "2.bias": (6,),
        "4.weight": (2, 6, 3, 3), "4.bias": (2,)}
    x = torch.randn(2, 6, 9, 7)
    w = [head[i].weight for i in (0, 2, 4)]
    b = [head[i].bias for i in (0, 2, 4)]
    expected = F.elu(F.conv2d(x, w[0], b[0], padding=1))
    expected = F.elu(F.conv2d(expected, w[1], b[1], padding=1))
    expected = F.softplus(F.conv2d(expected, w[2], b[2], padding=1))
    torch.testing.assert_close(head(x), expected)
    with pytest.raises(ValueError, match="in_channels"):
        UncertaintyHead(0)
    with pytest.raises(ValueError, match="hidden_channels"):
        UncertaintyHead(4, 3, hidden_channels=-1)


@pytest.mark.parametrize("name,cfg", FAMILIES)
def test_head_output_is_positive_and_shaped_like_the_image(name, cfg):
    model = _make(name, uncertainty=True)
    x = torch.rand(2, 3, 16, 24)
    with torch.no_grad():
        for p in model.var_conv.parameters():  # larger weights than the init: pre-activations of both signs
            p.normal_(0.0, 0.3)
        image, u = model(x)
        assert image.shape == u.shape == x.shape
        assert torch.isfinite(u).all() and (u > 0).all()
        model.var_conv[4].bias.fill_(-40.0)  # deep in the Softplus tail: still strictly positive
        model.var_conv[4].weight.zero_()
        _, u = model(x)
        assert (u > 0).all()
    one = _make(name, uncertainty=True, uncertainty_channels=1)
    assert one(x)[1].shape == (2, 1, 16, 24)
    assert one.config["uncertainty_channels"] == 1


@pytest.mark.parametrize("name,cfg", FAMILIES)
def test_head_reads_the_features_that_feed_the_output_conv(name, cfg):
    model = _make(name, uncertainty=True).eval()
    out_conv = model.output if isinstance(model, PromptIR) else model.ending
    seen = {}

    def capture(module, inputs):
        seen.setdefault("features", inputs[0])

    out_conv.register_forward_pre_hook(capture)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        image, u = model(x)
        assert seen["features"].shape[1] == model.feature_channels == model.var_conv.in_channels
        torch.testing.assert_close(u, model.var_conv(seen["features"]))
        torch.testing.assert_close(image, out_conv(seen["features"]) + x)
    if isinstance(model, PromptIR):
        assert model.feature_channels == 2 * SMALL_PROMPTIR["dim"]


@pytest.mark.parametrize("name,cfg", FAMILIES)
def test_gradients_reach_head_and_backbone_through_both_outputs(name, cfg):
    model = _make(name, uncertainty=True)
    out_conv = "output." if isinstance(model, PromptIR) else "ending."
    params = dict(model.named_parameters())
    x, target = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    image, u = model(x)

    grads = torch.autograd.grad(u.log().mean(), list(params.values()), retain_graph=True, allow_unused=True)
    for (pname, _), g in zip(params.items(), grads):
        if pname.startswith(out_conv):
            assert g is None, pname  # the output conv does not feed the head
        else:
            assert g is not None and g.abs().sum() > 0, f"no gradient from the uncertainty to {pname}"

    grads = torch.autograd.grad((image - target).abs().mean(), list(params.values()), allow_unused=True)
    for (pname, _), g in zip(params.items(), grads):
        if pname.startswith("var_conv."):
            assert g is None, pname
        else:
            assert g is not None and g.abs().sum() > 0, f"no gradient from the image to {pname}"


def test_tur_loss_trains_head_and_backbone():
    model = _make("nafnet-tiny", uncertainty=True)
    x, target = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)
    image, u = model(x)
    out = tur_ext.task_uncertainty_loss(image, target, u, torch.tensor([0, 1, 2, 1]), 3)
    out.loss.backward()
    assert model.var_conv[0].weight.grad.abs().sum() > 0
    assert model.intro.weight.grad.abs().sum() > 0
    assert model.ending.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------- strip


@pytest.mark.parametrize("name,cfg", FAMILIES)
def test_strip_uncertainty_gives_the_same_image_with_the_same_weights(name, cfg):
    model = _make(name, uncertainty=True).eval()
    plain = strip_uncertainty(model)
    x = torch.rand(2, 3, 16, 24)
    with torch.no_grad():
        image, _ = model(x)
        out = plain(x)
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, image)
    assert plain.var_conv is None and model.var_conv is not None  # the original keeps its head
    full, bare = model.state_dict(), plain.state_dict()
    assert list(bare) == [k for k in full if not k.startswith("var_conv.")]
    assert all(bare[k].data_ptr() == full[k].data_ptr() for k in bare)  # shared, not copied
    assert plain.config["uncertainty"] is False and "uncertainty_channels" not in plain.config
    assert model.config["uncertainty"] is True
    rebuilt = build(plain.arch, **plain.config)
    assert rebuilt.var_conv is None and list(rebuilt.state_dict()) == list(bare)
    # Wrappers are looked through.
    assert strip_uncertainty(nn.DataParallel(model)).var_conv is None
    with pytest.raises(TypeError, match="Backbone"):
        strip_uncertainty(nn.Conv2d(3, 3, 3))


# ---------------------------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("shape", [(2, 3, 13, 22), (3, 9, 9), (5, 7), (1, 1, 1, 3), (2, 2, 2, 1), (1, 3, 16, 8)])
@pytest.mark.parametrize("multiple", [1, 8, 16])
def test_pad_to_multiple_reflects_like_numpy_and_crops_back(shape, multiple):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(shape, generator=g)
    padded, size = pad_to_multiple(x, multiple)
    h, w = shape[-2:]
    assert size == (h, w)
    assert padded.shape[-2:] == padded_size(h, w, multiple)
    assert padded.shape[-2] % multiple == 0 and padded.shape[-1] % multiple == 0
    # numpy's reflect keeps mirroring when the pad is larger than the image: the behaviour documented here.
    pads = [(0, 0)] * (x.dim() - 2) + [(0, padded.shape[-2] - h), (0, padded.shape[-1] - w)]
    np.testing.assert_array_equal(padded.numpy(), np.pad(x.numpy(), pads, mode="reflect"))
    assert torch.equal(crop_to(padded, size), x)


def test_pad_to_multiple_agrees_with_torch_reflect_and_replicate():
    x = torch.randn(2, 3, 21, 30)
    padded, _ = pad_to_multiple(x, 16)
    assert torch.equal(padded, F.pad(x, (0, 2, 0, 11), mode="reflect"))
    padded, _ = pad_to_multiple(x, 16, mode="replicate")
    assert torch.equal(padded, F.pad(x, (0, 2, 0, 11), mode="replicate"))
    same, size = pad_to_multiple(x[..., :16, :16], 8)
    assert same.shape == (2, 3, 16, 16) and size == (16, 16)
    img = torch.randint(0, 256, (5, 6, 3), dtype=torch.uint8).permute(2, 0, 1)  # uint8 works too
    padded, size = pad_to_multiple(img, 4)
    assert padded.dtype == torch.uint8 and padded.shape == (3, 8, 8)
    np.testing.assert_array_equal(padded.numpy(), np.pad(img.numpy(), [(0, 0), (0, 3), (0, 2)], mode="reflect"))


def test_padding_helpers_reject_bad_arguments():
    x = torch.rand(1, 3, 5, 5)
    for bad in (0, -8):
        with pytest.raises(ValueError, match="multiple"):
            pad_to_multiple(x, bad)
    for bad in (True, 8.0, "8"):
        with pytest.raises(TypeError, match="multiple"):
            pad_to_multiple(x, bad)
    with pytest.raises(ValueError, match="mode"):
        pad_to_multiple(x, 8, mode="circular")
    with pytest.raises(ValueError, match="x"):
        pad_to_multiple(torch.rand(5), 8)
    with pytest.raises(ValueError, match="x"):
        pad_to_multiple(torch.rand(1, 0, 5), 8)
    with pytest.raises(TypeError, match="x"):
        pad_to_multiple(np.zeros((5, 5)), 8)
    with pytest.raises(ValueError, match="size"):
        crop_to(x, (6, 5))
    with pytest.raises(TypeError, match="size"):
        crop_to(x, (5,))


@pytest.mark.parametrize("name,cfg", FAMILIES)
def test_pad_run_crop_round_trip(name, cfg):
    """Values, not only shapes: the padding is torch's reflect pad on the bottom and right, the crop is the top-left
    slice, and with the output convolution zeroed (the model is then the identity: both families add the input
    back) the round trip returns the input exactly."""
    model = _make(name).eval()
    m = model.size_multiple
    x = torch.rand(1, 3, 19, 13)
    padded, size = pad_to_multiple(x, m)
    assert size == (19, 13) and padded.shape[-2:] == (24, 16)
    assert torch.equal(padded, F.pad(x, (0, 16 - 13, 0, 24 - 19), mode="reflect"))
    with torch.no_grad():
        full = model(padded)
        y = crop_to(full, size)
        assert torch.equal(y, full[..., :19, :13])
        assert (y - x).abs().max() > 1e-3  # the network does change the image
        last = model.ending if isinstance(model, NAFNet) else model.output
        last.weight.zero_()
        if last.bias is not None:  # PromptIR's output convolution has none
            last.bias.zero_()
        identity = crop_to(model(pad_to_multiple(x, m)[0]), size)
    assert torch.equal(identity, x)


# ----------------------------------------------------------------------------------------- trace and export


#: torch.export of these takes minutes on 2 cores (Uformer's windowed attention: about 280 s at the SMALL size);
#: they run with TUR_SLOW_EXPORTS=1 (make slow-export-check).
_SLOW_EXPORTS = {"uformer"}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.skipif(os.environ.get("TUR_SLOW_EXPORTS") != "1",
                                             reason="set TUR_SLOW_EXPORTS=1 (make slow-export-check)"))
    if n in _SLOW_EXPORTS else n for n in available()])
def test_trace_and_export_match_eager_at_two_sizes(name):
    """jit.trace of the model with its head, and torch.export of the stripped backbone with height and width dynamic
    (multiples of size_multiple, as deployment exports it); both against eager at two sizes."""
    model = _make(name, uncertainty=True).eval()
    m = model.size_multiple
    k = -(-(model.export_min_size or model.min_size) // m)  # the smallest side, in multiples
    sizes = [(2, 3, (k + 1) * m, (k + 2) * m), (2, 3, (k + 2) * m, (k + 1) * m)]
    inputs = [torch.rand(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(sizes)]
    plain = strip_uncertainty(model)
    with torch.no_grad():
        traced = torch.jit.trace(model, inputs[0])
        h, w = Dim("h", min=k, max=64), Dim("w", min=k, max=64)
        exported = torch.export.export(plain, (inputs[0],), dynamic_shapes={"x": {2: m * h, 3: m * w}}).module()
        for x in inputs:
            eager = model(x)
            assert isinstance(eager, tuple) and len(eager) == 2
            assert _max_diff(traced(x), eager) <= 1e-4
            assert _max_diff(exported(x), eager[0]) <= 1e-4


@pytest.mark.parametrize("name", [name for name, _ in FAMILIES] + ["airnet"])
def test_script_matches_eager(name):
    model = _make(name, uncertainty=True).eval()
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        assert _max_diff(torch.jit.script(model)(x), model(x)) <= 1e-5
        plain = strip_uncertainty(model)
        assert _max_diff(torch.jit.script(plain)(x), plain(x)) <= 1e-5


@pytest.mark.parametrize("name", [n for n in available() if spec(n).supports_fp16])
def test_fp16_inference_is_close_to_fp32(name):
    model = _make(name, uncertainty=True).eval()
    x = torch.rand(1, 3, 2 * model.size_multiple, 2 * model.size_multiple)
    with torch.no_grad():
        image, u = model(x)
        half = model.half()
        image16, u16 = half(x.half())
    assert image16.dtype == torch.float16
    assert (image16.float() - image).abs().max() <= 2e-2 * max(1.0, image.abs().max().item())
    assert (u16.float() - u).abs().max() <= 2e-2 * max(1.0, u.abs().max().item())
