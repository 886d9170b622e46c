"""TransWeather: both released layouts against the fixtures made from the authors' and the TUR code, the size rule,
the value-range plumbing (evaluation, trainer, `tur restore`, export metadata, the C++ runner) and TorchScript export.

The fixtures live beside the checkout (``../shared/fixtures/transweather*_official.json``, read through
``tests/fixtures.py``): the tests that need them skip where ``../shared`` is absent and fail where it exists but a
fixture does not. The dynamic-shape torch.export and the AOTInductor package of TransWeather take minutes
to compile on 2 CPU cores (the graph, not the width, sets the time): they run only with ``TUR_SLOW_EXPORTS=1``
(``make transweather-export-check``).
"""
from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from export_helpers import photo_crop, runner_binary
from fixtures import load_official_fixture
from tur_ext import deploy_cli
from tur_ext.export import build_metadata, export_aoti, export_program, export_torchscript, model_from_weights
from tur_ext.inference import load_restorer, resolve_tiling
from tur_ext.models import (
    TransWeather,
    build,
    crop_to,
    load_weights,
    pad_to_multiple,
    padded_size,
    spec,
    strip_uncertainty,
)
from tur_ext.models.transweather import UNUSED_RELEASE_MODULES
from tur_ext.train.evaluate import restore

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")

RUNNER = runner_binary()
needs_runner = pytest.mark.skipif(not RUNNER.is_file(), reason=f"the C++ runner is not built ({RUNNER} missing)")
slow_exports = pytest.mark.skipif(os.environ.get("TUR_SLOW_EXPORTS") != "1",
                                  reason="set TUR_SLOW_EXPORTS=1 (make transweather-export-check): minutes of compiling")

#: A narrow TransWeather (same blocks, strides and size rule) for the tests that do not compare with a release.
SMALL = dict(embed_dims=[8, 16, 32, 64])
UNUSED_PARAMS = 296_667
AUTHORS_RANGE = (-1.0, 1.0)


def deterministic_weights(layout: dict) -> dict:
    """The weights the fixtures' ``about`` describes, from a {key: shape} layout (keys in sorted order)."""
    g = torch.Generator().manual_seed(1234)
    out = {}
    for key in sorted(layout):
        shape = list(layout[key])
        if (len(shape) == 1 and key.endswith("weight")) or "temperature" in key or key.endswith("running_var"):
            out[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[key] = 0.05 * torch.randn(shape, generator=g)
    return out


def small_model(uncertainty: bool = False, **config) -> TransWeather:
    """The narrow model with the fixtures' weight recipe, its output convolution scaled so that the result is a
    varied image in (0, 1) (tanh of about 0.5 +- 0.3), not a flat tanh(~0) that clamping turns black."""
    model = build("transweather", uncertainty=uncertainty, **{**SMALL, **config})
    model.load_state_dict(deterministic_weights({k: v.shape for k, v in model.state_dict().items()}))
    with torch.no_grad():
        model.clean.conv2d.weight.mul_(4.0)
        model.clean.conv2d.bias.fill_(0.5)
    return model.eval()


@pytest.fixture(scope="module")
def official() -> dict:
    return load_official_fixture("transweather")


@pytest.fixture(scope="module")
def tur() -> dict:
    return load_official_fixture("transweather_tur")


def fixture_input(fx: dict) -> torch.Tensor:
    return torch.rand(fx["input_shape"], generator=torch.Generator().manual_seed(fx["input_seed"]))


def max_err(got: torch.Tensor, flat: list) -> float:
    return (got - torch.tensor(flat, dtype=torch.float32).reshape(got.shape)).abs().max().item()


# --------------------------------------------------------------------------------------------- the two releases

def test_layouts_and_parameter_counts_of_both_releases(official, tur):
    with torch.device("meta"):
        plain, with_head = build("transweather"), build("transweather", uncertainty=True)
    unused = {k: v for k, v in official["state_dict"].items() if k.startswith(UNUSED_RELEASE_MODULES)}
    assert sum(math.prod(s) for s in unused.values()) == UNUSED_PARAMS
    layout = {k: list(v.shape) for k, v in plain.state_dict().items()}
    assert list(layout) == [k for k in official["state_dict"] if k not in unused]  # the release's order
    assert layout == {k: v for k, v in official["state_dict"].items() if k not in unused}
    assert {k: list(v.shape) for k, v in with_head.state_dict().items()} == tur["state_dict"]
    assert list(with_head.state_dict()) == list(tur["state_dict"])
    n_plain, n_head = (sum(p.numel() for p in m.parameters()) for m in (plain, with_head))
    assert n_plain == official["num_params"] - UNUSED_PARAMS == 37_755_411
    assert n_head == tur["num_params"] == 37_756_798 and n_head - n_plain == tur["num_params_head"] == 1387


def test_authors_release_loads_reproduces_and_sets_the_input_range(official):
    """The DataParallel state dict with the unused modules: they are dropped, the forward matches the authors' code,
    and the weights' input range [-1, 1] (Normalize(0.5, 0.5) in the authors' loaders) is recorded."""
    weights = deterministic_weights(official["state_dict"])
    ckpt = {official["checkpoint_prefix"] + k: v for k, v in weights.items()}
    model = build("transweather").eval()
    assert model.input_range == (0.0, 1.0) and model.config["input_range"] is None
    report = load_weights(model, ckpt)
    assert report.format == "state_dict" and report.prefixes_stripped == ("module.",)
    assert report.num_loaded == len(weights) - 6
    assert model.input_range == AUTHORS_RANGE and model.config["input_range"] == [-1.0, 1.0]
    assert model.output_range == (0.0, 1.0)
    rebuilt = build(model.arch, **{k: v for k, v in model.config.items() if k != "uncertainty"})
    assert rebuilt.input_range == AUTHORS_RANGE  # the range travels with the config (checkpoints, exports)
    with torch.no_grad():
        out = model(fixture_input(official))
    assert out.shape == tuple(official["output_shape"])
    assert max_err(out, official["expected_output"]) <= 1e-4


def test_tur_release_reproduces_image_and_uncertainty(tur, tmp_path):
    """BasicSR {"params", "params_ema"} (EMA preferred) into the TUR variant: image and uncertainty as the TUR code
    computes them; its input range stays [0, 1]. Without a head (export), the head is dropped, the image is kept."""
    weights = deterministic_weights(tur["state_dict"])
    stale = {k: v + 1.0 for k, v in weights.items()}
    path = tmp_path / "Transweather_TUR_5task.pth"
    torch.save({"params": stale, "params_ema": weights}, path)
    model = build("transweather", uncertainty=True).eval()
    report = load_weights(model, path)
    assert report.format == "basicsr:params_ema" and report.prefixes_stripped == ()
    assert model.input_range == (0.0, 1.0) and model.config["input_range"] is None
    x = fixture_input(tur)
    with torch.no_grad():
        image, unc = model(x)
        plain = model_from_weights("transweather", path)(x)
    assert max_err(image, tur["expected_output"]) <= 1e-4
    assert max_err(unc, tur["expected_uncertainty"]) <= 1e-4
    assert (plain - image).abs().max().item() == 0.0


def test_explicit_input_range_is_kept_when_loading_the_authors_layout():
    # The authors' layout: DataParallel keys and (one of) the unused modules.
    ckpt = {"module." + k: v for k, v in small_model().state_dict().items()}
    ckpt["module.Tenc.mini_patch_embed4.proj.bias"] = torch.zeros(64)
    fresh = build("transweather", **SMALL, input_range=[0, 1])
    with pytest.warns(UserWarning, match=r"authors' TransWeather release.*\[-1, 1\]"):
        load_weights(fresh, ckpt)
    assert fresh.input_range == (0.0, 1.0)
    with pytest.raises(ValueError, match="input_range: expected an increasing pair"):
        build("transweather", input_range=[1, 0])
    with pytest.raises(ValueError, match=r"embed_dims\[3\] = 60 must be divisible by 8"):
        build("transweather", embed_dims=[8, 16, 32, 60])


# ------------------------------------------------------------------------------------------------ the size rule

def test_size_rule_clear_errors_and_padding():
    model = small_model(uncertainty=True)
    s = spec("transweather")
    assert (s.size_multiple, s.min_size, model.min_size, model.export_min_size) == (16, 48, 48, 112)
    for h, w in ((32, 64), (48, 40), (48, 56), (50, 64)):
        with pytest.raises(ValueError, match=r"multiples of 16 and at least 48 .*min_size=48"):
            model(torch.rand(1, 3, h, w))
    assert padded_size(40, 50, 16, min_size=48) == (48, 64)
    assert padded_size(100, 17, 16, min_size=48) == (112, 48)
    x = torch.rand(1, 3, 21, 35)
    padded, size = pad_to_multiple(x, 16, min_size=48)
    assert padded.shape[-2:] == (48, 48) and torch.equal(crop_to(padded, size), x)
    with torch.no_grad():
        image, unc = model(padded)  # the smallest valid input
    assert image.shape == unc.shape == (1, 3, 48, 48) and (unc > 0).all()


# --------------------------------------------------------------------------------------------- value ranges

def test_evaluation_and_metadata_use_the_models_ranges():
    """evaluate.restore maps [0, 1] to the input range and back from the output range; export metadata records
    both ranges and the smallest input (AOTInductor's larger one)."""
    model = small_model(input_range=list(AUTHORS_RANGE))
    lq = torch.rand(2, 3, 40, 70, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = restore(model, lq)
        x, size = pad_to_multiple(lq * 2 - 1, 16, min_size=48)
        expected = crop_to(model(x), size).clamp(0, 1)
        naive = crop_to(model(pad_to_multiple(lq, 16, min_size=48)[0]), size).clamp(0, 1)
    assert got.shape == lq.shape and torch.equal(got, expected)
    assert (got - naive).abs().max() > 0.05  # the range matters: [0, 1] input gives another image
    eager = build_metadata(model, artifact="eager")
    assert eager["value_range"] == [-1.0, 1.0] and eager["output_range"] == [0.0, 1.0]
    assert eager["min_size"] == 48 and eager["size_multiple"] == 16
    assert build_metadata(model, artifact="aoti")["min_size"] == 112
    assert build_metadata(build("nafnet-tiny"), artifact="eager")["min_size"] == 8  # others: the multiple


def test_trainer_feeds_the_model_its_input_range(tmp_path):
    from tur_ext.train import Trainer
    from tur_ext.train.config import load_config

    seen = {}
    for input_range in (None, [-1.0, 1.0]):
        raw = {"name": "tw", "seed": 0, "output_dir": str(tmp_path / str(input_range)), "tasks": "3task",
               "model": {"name": "transweather", **SMALL, "input_range": input_range},
               "loss": {"name": "tur"},
               "data": {"type": "embedded", "patch_size": 48, "length": 5, "batch_size": 5, "eval_batch_size": 5},
               "train": {"steps": 1, "progress": False, "tensorboard": False, "validate": False}}
        with Trainer(load_config(raw=raw)) as tr:
            hook = tr.model.register_forward_pre_hook(
                lambda mod, args: seen.__setitem__(str(input_range), (args[0].min().item(), args[0].max().item())))
            tr.train()
            hook.remove()
            assert tr.step == 1 and tr.model.input_range == (tuple(input_range) if input_range else (0.0, 1.0))
    lo, hi = seen["None"]
    assert 0.0 <= lo and hi <= 1.0
    lo, hi = seen["[-1.0, 1.0]"]
    assert -1.0 <= lo < -0.5 and 0.5 < hi <= 1.0


# ------------------------------------------------------------------------------------------------ deployment

@pytest.fixture(scope="module")
def torchscript_artifact(tmp_path_factory):
    """The narrow model in the authors' range, with its TUR head (stripped by the export), scripted."""
    model = small_model(uncertainty=True, input_range=list(AUTHORS_RANGE))
    folder = tmp_path_factory.mktemp("transweather_export")
    return model, export_torchscript(model, folder / "tw.pt", tasks="5task")


def _photos(folder: Path) -> dict:
    files = {"small.png": photo_crop(40, 60), "photo.png": photo_crop(70, 95)}  # 40x60 is below the smallest size
    for name, rgb in files.items():
        assert cv2.imwrite(str(folder / name), np.ascontiguousarray(rgb[:, :, ::-1]))
    return {name: folder / name for name in files}


def test_torchscript_export_scripts_and_restores_like_eager(torchscript_artifact):
    model, result = torchscript_artifact
    meta = result.metadata
    assert meta["torchscript_mode"] == "script"  # scripted: every size, not the traced one only
    assert meta["value_range"] == [-1.0, 1.0] and meta["output_range"] == [0.0, 1.0] and meta["min_size"] == 48
    assert set(result.parity) == {"96x128", "144x80"} and max(result.parity.values()) <= 1e-4
    restorer = load_restorer(result.path)
    plain = strip_uncertainty(model)
    for h, w in ((40, 60), (48, 48), (70, 95)):
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h))
        with torch.no_grad():
            xp, size = pad_to_multiple(x * 2 - 1, 16, min_size=48)
            expected = crop_to(plain(xp), size).clamp(0, 1)
        got = restorer(x)
        assert got.shape == x.shape and (got - expected).abs().max().item() <= 1e-5
    tiled = restorer(torch.rand(1, 3, 70, 95), tile=64, overlap=16)
    assert tiled.shape == (1, 3, 70, 95)
    with pytest.raises(ValueError, match="smaller than the model's smallest input 48"):
        restorer(torch.rand(1, 3, 70, 95), tile=32)
    assert resolve_tiling(64, None, 16, 48) == (64, 32)


@needs_runner
@pytest.mark.parametrize("tiling", [None, (64, 16)], ids=["whole", "tiled"])
def test_runner_matches_tur_restore(torchscript_artifact, tmp_path, tiling):
    _, result = torchscript_artifact
    photos = _photos(tmp_path)
    for name, image in photos.items():
        if tiling and name == "small.png":
            continue
        argv = ["restore", "--model", str(result.path), str(image), "--out", str(tmp_path / "py")]
        args = ["--model", result.path, "--input", image, "--output", tmp_path / f"cpp_{name}"]
        if tiling:
            argv += ["--tile", str(tiling[0]), "--overlap", str(tiling[1])]
            args += ["--tile", tiling[0], "--overlap", tiling[1]]
        assert deploy_cli.main(argv) == 0
        proc = subprocess.run([str(RUNNER), *map(str, args)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        py = cv2.imread(str(tmp_path / "py" / name)).astype(np.int64)
        cpp = cv2.imread(str(tmp_path / f"cpp_{name}")).astype(np.int64)
        assert py.shape == cpp.shape == cv2.imread(str(image)).shape
        assert np.abs(py - cpp).max() <= 1, name
        assert py.std() > 10  # a varied image, not a constant
    proc = subprocess.run([str(RUNNER), "--model", str(result.path), "--input", str(photos["photo.png"]),
                           "--output", str(tmp_path / "x.png"), "--tile", "32"], capture_output=True, text=True)
    assert proc.returncode == 2 and "smallest input 48" in proc.stderr


# ------------------------------------------------------------------------- dynamic export (TUR_SLOW_EXPORTS=1)

@slow_exports
def test_dynamic_export_from_112_pixels():
    """torch.export with batch, H and W dynamic (H, W = 16k from export_min_size = 112), against eager at sizes of
    both parities of H/32 and batch 1 and 2."""
    from tur_ext.export import prepare_for_export

    net = prepare_for_export(small_model(uncertainty=True))
    program = export_program(net).module()
    with torch.no_grad():
        for b, h, w in ((1, 112, 112), (2, 112, 128), (1, 144, 176), (1, 256, 208)):
            x = torch.rand(b, 3, h, w)
            assert (program(x) - net(x)).abs().max().item() <= 1e-4


@slow_exports
@needs_runner
def test_aoti_export_restore_and_runner(tmp_path):
    model = small_model(uncertainty=True, input_range=list(AUTHORS_RANGE))
    result = export_aoti(model, tmp_path / "tw.pt2")
    assert result.metadata["min_size"] == 112 and max(result.parity.values()) <= 1e-4
    image = _photos(tmp_path)["photo.png"]  # 70x95: padded to 112x112 for this package
    assert deploy_cli.main(["restore", "--model", str(result.path), str(image), "--out", str(tmp_path / "py")]) == 0
    proc = subprocess.run([str(RUNNER), "--model", str(result.path), "--input", str(image), "--output",
                           str(tmp_path / "cpp.png")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    py = cv2.imread(str(tmp_path / "py" / image.name)).astype(np.int64)
    assert np.abs(py - cv2.imread(str(tmp_path / "cpp.png")).astype(np.int64)).max() <= 1
