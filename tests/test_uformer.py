"""Uformer (MiOIR's, in the configuration of ``Uformer_TUR_7task.pth``): the released layout and forward against the
fixture made from the TUR code, both release layouts (TUR's with the head, MiOIR's without), H and W carried through
the layers (non-square inputs checked against a float64 re-implementation of a block that follows the released code
slice by slice), the size rule and padding, bad files, and deployment (TorchScript, `tur export` / `tur restore` on
the released layout, the C++ runner).

The fixture lives beside the checkout (``../shared/fixtures/uformer_tur_7task_official.json``); the tests that need it
skip where it is absent. One forward of the released width at 128 x 128 runs here (the fixture); everything else uses
a narrow Uformer with the same blocks (windows of 2, so sides are multiples of 32). The dynamic-shape torch.export and
the AOTInductor package run only with ``TUR_SLOW_EXPORTS=1``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from export_helpers import run_runner, runner_binary, write_photos
from tur_ext import deploy_cli
from tur_ext.export import export_aoti, export_program, export_torchscript, model_from_weights, prepare_for_export
from tur_ext.inference import load_restorer
from tur_ext.models import (
    Uformer,
    WeightsMismatchError,
    build,
    crop_to,
    load_weights,
    pad_to_multiple,
    spec,
    strip_uncertainty,
)
from tur_ext.models.uformer import relative_position_index, shift_attention_mask, window_partition, window_reverse
from tur_ext.train.evaluate import restore

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "uformer_tur_7task_official.json"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_file(), reason=f"Uformer fixture not found: {FIXTURE}")
RUNNER = runner_binary()
needs_runner = pytest.mark.skipif(not RUNNER.is_file(), reason=f"the C++ runner is not built ({RUNNER} missing)")
slow_exports = pytest.mark.skipif(os.environ.get("TUR_SLOW_EXPORTS") != "1",
                                  reason="set TUR_SLOW_EXPORTS=1: minutes of compiling")

#: A narrow Uformer: every layer has a plain and a shifted block, windows of 2 (sides: multiples of 32).
SMALL = dict(embed_dim=8, depths=[2] * 9, num_heads=[1, 1, 2, 2, 4, 4, 2, 2, 1], win_size=2)
PLAIN_PARAMS, HEAD_PARAMS = 50_880_946, 75_587


def deterministic_weights(layout: dict) -> dict:
    """The fixture's weight recipe on a {key: shape} layout (sorted keys; integer buffers left out, as constructed)."""
    g = torch.Generator().manual_seed(1234)
    out = {}
    for key in sorted(layout):
        shape = list(layout[key])
        if key.endswith("relative_position_index"):
            continue
        if (len(shape) == 1 and key.endswith("weight")) or "temperature" in key or key.endswith("running_var"):
            out[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[key] = 0.05 * torch.randn(shape, generator=g)
    return out


def small_model(uncertainty: bool = False, seed: int = 0) -> Uformer:
    """The narrow model, random weights (modulators and bias tables included), output scaled to stay an image."""
    model = build("uformer", uncertainty=uncertainty, **SMALL)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("modulator.weight", "relative_position_bias_table")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        model.output_proj.proj[0].weight.mul_(0.2)
    return model.eval()


@pytest.fixture(scope="module")
def fixture() -> dict:
    with open(FIXTURE, encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------- the releases

@needs_fixture
def test_layout_and_parameter_count(fixture):
    with torch.device("meta"):
        plain, with_head = build("uformer"), build("uformer", uncertainty=True)
    layout = {k: list(v.shape) for k, v in with_head.state_dict().items()}
    assert list(layout) == list(fixture["state_dict"]) and layout == fixture["state_dict"]
    assert [k for k in layout if not k.startswith("var_conv.")] == list(plain.state_dict())
    n_plain, n_head = (sum(p.numel() for p in m.parameters()) for m in (plain, with_head))
    assert n_head == fixture["num_params"] == PLAIN_PARAMS + HEAD_PARAMS
    assert n_plain == PLAIN_PARAMS and n_head - n_plain == fixture["num_params_head"] == HEAD_PARAMS
    # The relative-position indices are persistent buffers (in the files); no attention mask is stored.
    buffers = [k for k, _ in with_head.named_buffers()]
    assert len(buffers) == 40 and all(k.endswith("attn.relative_position_index") for k in buffers)
    assert (spec("uformer").size_multiple, spec("uformer").min_size) == (128, 128)
    assert plain.feature_channels == 64 and plain.input_range == plain.output_range == (0.0, 1.0)


@needs_fixture
def test_tur_release_reproduces_image_and_uncertainty(fixture, tmp_path):
    """BasicSR {"params", "params_ema"} (EMA preferred) of the TUR variant, written without the relative-position
    indices (they are rebuilt), reproduces the TUR code's image and uncertainty at 128 x 128."""
    weights = deterministic_weights(fixture["state_dict"])
    path = tmp_path / "Uformer_TUR_7task.pth"
    torch.save({"params": {k: v + 1.0 for k, v in weights.items()}, "params_ema": weights}, path)
    model = build("uformer", uncertainty=True).eval()
    report = load_weights(model, path)
    assert report.format == "basicsr:params_ema" and report.prefixes_stripped == () and report.num_loaded == 765
    x = torch.rand(fixture["input_shape"], generator=torch.Generator().manual_seed(fixture["input_seed"]))
    with torch.no_grad():
        image, unc = model(x)
    assert image.shape == unc.shape == tuple(fixture["output_shape"])
    assert fixture["output_subsample"].startswith("[:, :, ::2, ::2]")
    for got, key in ((image, "expected_output"), (unc, "expected_uncertainty")):
        sub = got[:, :, ::2, ::2]
        want = torch.tensor(fixture[key]).reshape(sub.shape)
        assert (sub - want).abs().max().item() <= 1e-4, key
        stats = fixture[key + "_full_stats"]
        assert abs(got.double().mean().item() - stats["mean"]) <= 1e-5
        assert abs(got.min().item() - stats["min"]) <= 1e-4 and abs(got.max().item() - stats["max"]) <= 1e-4


def test_mioir_layout_and_head_dropping_load_the_same_backbone(tmp_path):
    """MiOIR's own release (BasicSR params, no head) loads into the plain model, a TUR file (with the head) into a
    plain model with the head dropped (`tur export --weights`), and a TUR file into a head model with it."""
    tur = small_model(uncertainty=True)
    torch.save({"params": tur.state_dict()}, tmp_path / "tur.pth")
    torch.save({"params": strip_uncertainty(tur).state_dict()}, tmp_path / "mioir.pth")
    plain = model_from_weights("uformer", tmp_path / "tur.pth", SMALL)
    mioir = build("uformer", **SMALL)
    report = load_weights(mioir, tmp_path / "mioir.pth")
    assert report.format == "basicsr:params" and report.num_loaded == len(mioir.state_dict())
    assert not plain.has_uncertainty and not mioir.has_uncertainty
    for net in (plain, mioir):
        assert all(torch.equal(v, tur.state_dict()[k]) for k, v in net.state_dict().items())
    with pytest.raises(WeightsMismatchError, match="only the uncertainty head differs"):
        load_weights(build("uformer", uncertainty=True, **SMALL), tmp_path / "mioir.pth")


def test_bad_files_get_clear_errors(tmp_path):
    model = small_model()
    other_window = build("uformer", **{**SMALL, "win_size": 4}).state_dict()
    with pytest.raises(WeightsMismatchError, match=r"shape mismatches .*relative_position_(bias_table|index)"):
        load_weights(model, {"params": other_window})
    sd = model.state_dict()
    sd["conv.blocks.0.attn.relative_position_index"] = sd["conv.blocks.0.attn.relative_position_index"].flip(0)
    with pytest.raises(ValueError, match=r"conv\.blocks\.0\.attn\.relative_position_index is not the "
                                         r"relative-position index of 4-token windows"):
        load_weights(small_model(), sd)
    with pytest.raises(WeightsMismatchError, match="missing keys"):
        load_weights(small_model(), build("nafnet-tiny").state_dict())
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth: (not a readable torch checkpoint|cannot be read)"):
        load_weights(small_model(), tmp_path / "junk.pth")
    with pytest.raises(ValueError, match=r"num_heads: layer 4 has 128 channels, not divisible by 3 heads"):
        build("uformer", **{**SMALL, "num_heads": [1, 1, 2, 2, 3, 4, 2, 2, 1]})
    with pytest.raises(ValueError, match="win_size: expected an int from 2 to 15"):
        build("uformer", win_size=16)
    with pytest.raises(ValueError, match="depths: expected 9 ints"):
        build("uformer", depths=[2, 2])


# ------------------------------------------------------------------------------------- H and W carried through

def _released_shift_regions(h: int, w: int, win: int, shift: int) -> torch.Tensor:
    # The released code's labelling, by slice assignment, on an h x w map.
    regions = torch.zeros(h, w)
    cnt = 0
    for hs in (slice(0, -win), slice(-win, -shift), slice(-shift, None)):
        for ws in (slice(0, -win), slice(-win, -shift), slice(-shift, None)):
            regions[hs, ws] = cnt
            cnt += 1
    return regions


def test_window_helpers_and_shift_mask_on_non_square_maps():
    h, w, win = 12, 20, 4
    x = torch.randn(2, h, w, 3, dtype=torch.float64)
    windows = window_partition(x, win)
    assert windows.shape == (2 * 3 * 5, win, win, 3)
    assert torch.equal(windows[1 * 15 + 2 * 5 + 3], x[1, 8:12, 12:16])  # image 1, window row 2, column 3
    assert torch.equal(window_reverse(windows, win, h, w), x)
    for shift in (1, 2):
        regions = window_partition(_released_shift_regions(h, w, win, shift).reshape(1, h, w, 1), win)
        regions = regions.reshape(-1, win * win)
        want = torch.where(regions[:, None, :] != regions[:, :, None], -100.0, 0.0)
        got = shift_attention_mask(h, w, win, shift, torch.device("cpu"), torch.float32)
        assert got.dtype == torch.float32 and torch.equal(got, want)
    idx = relative_position_index(3)
    assert idx.shape == (9, 9) and idx[0, 0] == 12 and idx[0, 8] == 0 and idx[8, 0] == 24


def _reference_block(block, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """One LeWin block in float64, window by window with explicit slices, as the released code computes it for a
    square map, on an h x w map."""
    b, _, c = x.shape
    win, shift, heads = block.win, block.shift, block.attn.heads
    d = c // heads
    n = win * win
    y = F.layer_norm(x, (c,), block.norm1.weight, block.norm1.bias).reshape(b, h, w, c)
    y = torch.roll(y, (-shift, -shift), (1, 2))
    regions = _released_shift_regions(h, w, win, shift) if shift else torch.zeros(h, w)
    table = block.attn.relative_position_bias_table
    bias = table[relative_position_index(win).reshape(-1)].reshape(n, n, heads).permute(2, 0, 1)
    out = torch.empty_like(y)
    qkv = block.attn.qkv
    for i in range(0, h, win):
        for j in range(0, w, win):
            t = y[:, i:i + win, j:j + win].reshape(b, n, c)
            if block.has_modulator:
                t = t + block.modulator.weight
            q = F.linear(t, qkv.to_q.weight, qkv.to_q.bias).reshape(b, n, heads, d).transpose(1, 2)
            kv = F.linear(t, qkv.to_kv.weight, qkv.to_kv.bias).reshape(b, n, 2, heads, d)
            k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
            att = q @ k.transpose(-1, -2) / math.sqrt(d) + bias
            r = regions[i:i + win, j:j + win].reshape(n)
            att = att + torch.where(r[None, :] != r[:, None], -100.0, 0.0).double()
            o = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
            out[:, i:i + win, j:j + win] = F.linear(o, block.attn.proj.weight, block.attn.proj.bias) \
                .reshape(b, win, win, c)
    x = x + torch.roll(out, (shift, shift), (1, 2)).reshape(b, h * w, c)
    mlp = block.mlp
    z = F.layer_norm(x, (c,), block.norm2.weight, block.norm2.bias)
    z = F.gelu(F.linear(z, mlp.linear1[0].weight, mlp.linear1[0].bias))
    z = z.transpose(1, 2).reshape(b, -1, h, w)
    z = F.gelu(F.conv2d(z, mlp.dwconv[0].weight, mlp.dwconv[0].bias, padding=1, groups=z.shape[1]))
    z = z.flatten(2).transpose(1, 2)
    return x + F.linear(z, mlp.linear2[0].weight, mlp.linear2[0].bias)


@pytest.mark.parametrize("layer", ["encoderlayer_1", "decoderlayer_2"])  # plain + shifted; with the modulator
def test_blocks_on_non_square_maps_match_the_released_computation(layer):
    model = small_model().double()
    h, w = 6, 10  # 3 x 5 windows of 2
    for block in getattr(model, layer).blocks:
        x = torch.randn(2, h * w, block.norm1.normalized_shape[0], dtype=torch.float64,
                        generator=torch.Generator().manual_seed(block.shift))
        with torch.no_grad():
            got, want = block(x, h, w), _reference_block(block, x, h, w)
        assert (got - want).abs().max().item() <= 1e-10
    assert [blk.shift for blk in getattr(model, layer).blocks] == [0, 1]
    assert getattr(model, layer).blocks[0].has_modulator == layer.startswith("decoder")


def test_non_square_batches_and_the_size_rule():
    model = small_model(uncertainty=True)
    assert (model.size_multiple, model.min_size, model.feature_channels) == (32, 32, 16)
    x = torch.rand(2, 3, 32, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        image, unc = model(x)
        alone = model(x[1:])
    assert image.shape == unc.shape == x.shape and (unc > 0).all() and torch.isfinite(image).all()
    # Each image of a batch is computed on its own (windows of different images never mix).
    assert (alone[0] - image[1:]).abs().max().item() <= 1e-5 and (alone[1] - unc[1:]).abs().max().item() <= 1e-5
    for h, w in ((32, 50), (16, 32), (48, 64)):
        with pytest.raises(ValueError, match=r"multiples of 32 for uformer, got .*pad_to_multiple\(x, 32\)"):
            model(torch.rand(1, 3, h, w))
    # Other sizes: evaluation pads (reflect, bottom/right) to the rule and crops back.
    lq = torch.rand(1, 3, 50, 90, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = restore(model, lq)
        padded, size = pad_to_multiple(lq, 32)
        assert padded.shape[-2:] == (64, 96)
        expected = crop_to(model(padded)[0], size).clamp(0, 1)
    assert got.shape == lq.shape and torch.equal(got, expected)


def test_training_step_reaches_every_parameter():
    model = small_model(uncertainty=True).train()
    image, unc = model(torch.rand(2, 3, 32, 32))
    (image.mean() + unc.mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


# ------------------------------------------------------------------------------------------------ deployment

def _photos(folder: Path) -> dict:
    return write_photos(folder, {"small.png": (40, 60), "photo.png": (70, 95)})


@pytest.fixture(scope="module")
def released_export(tmp_path_factory):
    """A TUR-layout file (BasicSR params with var_conv) of the narrow model, exported with `tur export --arch
    uformer --weights` (head dropped) to TorchScript."""
    folder = tmp_path_factory.mktemp("uformer_export")
    model = small_model(uncertainty=True)
    torch.save({"params": model.state_dict()}, folder / "uformer_tur.pth")
    config = [x for k, v in SMALL.items() for x in ("--config", f"{k}={json.dumps(v).replace(' ', '')}")]
    assert deploy_cli.main(["export", "--arch", "uformer", "--weights", str(folder / "uformer_tur.pth"), *config,
                            "--format", "torchscript", "--out", str(folder / "uformer.pt"), "--tasks", "7task"]) == 0
    return model, folder


def test_torchscript_export_scripts_and_restores_like_eager(released_export):
    model, folder = released_export
    restorer = load_restorer(folder / "uformer.pt")
    meta = restorer.metadata
    assert meta["torchscript_mode"] == "script" and meta["arch"] == "uformer" and meta["size_multiple"] == 32
    assert meta["config"]["win_size"] == 2 and meta["min_size"] == 32 and meta["value_range"] == [0.0, 1.0]
    assert len(meta["tasks"]) == 7
    plain = strip_uncertainty(model)
    for h, w in ((40, 60), (32, 96), (70, 95)):
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h))
        with torch.no_grad():
            xp, size = pad_to_multiple(x, 32)
            expected = crop_to(plain(xp), size).clamp(0, 1)
        assert (restorer(x) - expected).abs().max().item() <= 1e-5


@needs_runner
def test_runner_and_tur_restore_on_the_released_layout(released_export, tmp_path):
    _, folder = released_export
    photos = _photos(tmp_path)
    assert deploy_cli.main(["restore", "--model", str(folder / "uformer.pt"), *map(str, photos.values()),
                            "--out", str(tmp_path / "py")]) == 0
    for name, image in photos.items():
        cpp = run_runner(folder / "uformer.pt", image, tmp_path / f"cpp_{name}")
        py = cv2.imread(str(tmp_path / "py" / name)).astype(np.int64)
        assert py.shape == cpp.shape == cv2.imread(str(image)).shape
        assert np.abs(py - cpp).max() <= 1, name
        assert py.std() > 10


@slow_exports
def test_dynamic_export_non_square_sizes():
    """torch.export with batch, H and W dynamic (multiples of 32 from export_min_size = 64 up) against eager."""
    net = prepare_for_export(small_model(uncertainty=True))
    assert net.export_min_size == 64
    program = export_program(net).module()
    with torch.no_grad():
        for b, h, w in ((1, 64, 64), (2, 64, 96), (1, 96, 64), (1, 128, 160)):
            x = torch.rand(b, 3, h, w)
            assert (program(x) - net(x)).abs().max().item() <= 1e-4


@slow_exports
@needs_runner
def test_aoti_export_restore_and_runner(tmp_path):
    result = export_aoti(small_model(uncertainty=True), tmp_path / "uformer.pt2")
    assert result.metadata["min_size"] == 64 and max(result.parity.values()) <= 1e-4
    image = _photos(tmp_path)["photo.png"]
    assert deploy_cli.main(["restore", "--model", str(result.path), str(image), "--out", str(tmp_path / "py")]) == 0
    cpp = run_runner(result.path, image, tmp_path / "cpp.png")
    assert np.abs(cv2.imread(str(tmp_path / "py" / image.name)).astype(np.int64) - cpp).max() <= 1
