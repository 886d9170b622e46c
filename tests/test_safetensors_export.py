"""``tur export --format safetensors``: the release key layout per architecture, the header metadata, the round trip
through ``tur restore``, and spandrel loading our files.

spandrel is a test-only tool that this project does not depend on. Its declared dependencies include torchvision and
einops, which are not allowed here, so it is installed without them into its own folder:

    python -m pip install --no-deps --target build/spandrel-env spandrel==0.4.2

(``$TUR_SPANDREL_PATH`` names another folder; a spandrel importable as is also works). spandrel imports every
architecture it knows when it is imported, and a few of those import names from torchvision and einops at module
level; NAFNet's code uses neither. The spandrel check therefore runs in a subprocess whose ``sys.path`` starts with a
stub folder written by :func:`_write_stubs`: modules with just those names, which raise if anything calls them (and
only for packages that are not installed). The real torch, safetensors and numpy are used. Without spandrel the
test is skipped, saying how to install it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from export_helpers import REPO_ROOT, TINY_CONFIG, photo_crop, tiny_model
from tur_ext import deploy_cli
from tur_ext.data.io import read_image, write_image
from tur_ext.export_safetensors import export_safetensors, model_from_safetensors, read_safetensors_metadata
from tur_ext.inference import to_file_pixels
from tur_ext.models import build, load_weights
from tur_ext.models.weights import is_safetensors
from tur_ext.train.checkpoint import model_spec, save_checkpoint

st = pytest.importorskip("safetensors.torch")

FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"
SMALL_PROMPTIR = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 2, 2],
                      prompt_dims=[8, 16, 32], prompt_sizes=[8, 4, 2])
SMALL_TRANSWEATHER = dict(embed_dims=[8, 16, 32, 64])
SMALL_UFORMER = dict(embed_dim=8, depths=[1] * 9, num_heads=[1, 1, 2, 2, 4, 4, 2, 2, 1], win_size=2)
SPANDREL_INSTALL = "python -m pip install --no-deps --target build/spandrel-env spandrel==0.4.2"


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` with every tensor randomised (never the published init: zero residual scales hide errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def header(path: Path) -> dict:
    with st.safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def file_keys(path: Path) -> set:
    with st.safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def layout_of(sd: dict) -> dict:
    return {k: list(v.shape) for k, v in sd.items()}


# ------------------------------------------------------------------------------------------ layouts per architecture

@pytest.mark.parametrize("fixture, prefix, arch, config", [
    ("promptir_official.json", "", "promptir", {}),
    ("promptir_official.json", "", "promptir", {"include_unused": False}),
    ("transweather_official.json", "", "transweather", {"input_range": [-1, 1]}),
    ("transweather_tur_official.json", "var_conv.", "transweather", {}),
    ("airnet_official.json", "", "airnet", {}),
    ("airnet_tur_official.json", "R.var_conv.", "airnet", {"queue_size": 8192}),
    ("uformer_tur_7task_official.json", "var_conv.", "uformer", {}),
])
def test_release_state_dict_is_the_published_layout(fixture, prefix, arch, config):
    """Key for key and shape for shape the authors' release (PromptIR; TransWeather for [-1, 1] weights) or the TUR
    release without its head (TransWeather for [0, 1] weights), built on the meta device (no memory, no time)."""
    path = FIXTURES / fixture
    if not path.is_file():
        pytest.skip(f"fixture {path} not found")
    published = json.loads(path.read_text())["state_dict"]
    if prefix:
        published = {k: v for k, v in published.items() if not k.startswith(prefix)}
    with torch.device("meta"):
        model = build(arch, uncertainty=True, **config)
    assert layout_of(model.release_state_dict()) == published


def test_nafnet_release_state_dict_is_its_module_layout():
    model = build("nafnet-tiny", uncertainty=True)
    release = model.release_state_dict()
    assert list(release) == [k for k in model.state_dict() if not k.startswith("var_conv.")]
    assert all(not t.requires_grad and t.is_contiguous() for t in release.values())
    release["intro.weight"].add_(1.0)  # a copy: the model's weights stay as they were
    assert not torch.equal(release["intro.weight"], model.intro.weight)


@pytest.mark.parametrize("arch, config", [
    ("nafnet-tiny", TINY_CONFIG),
    ("promptir", SMALL_PROMPTIR),
    ("promptir", {**SMALL_PROMPTIR, "include_unused": False}),
    ("transweather", SMALL_TRANSWEATHER),
    ("transweather", {**SMALL_TRANSWEATHER, "input_range": [-1, 1]}),
    ("airnet", dict(features=8, groups=1, blocks=1, queue_size=16)),
    ("uformer", SMALL_UFORMER),
])
def test_export_round_trip_header_and_head_stripped(tmp_path, arch, config):
    model = randomised(build(arch, uncertainty=True, **config))
    out = tmp_path / "model.safetensors"
    low = max(model.size_multiple, model.min_size)
    result = export_safetensors(model, out, tasks="3task", parity_sizes=[(low, low + model.size_multiple), (low + model.size_multiple, low)])
    assert set(result.parity.values()) == {0.0} and len(result.parity) == 2
    keys = file_keys(out)
    assert keys == set(model.release_state_dict()) and not any(k.startswith("var_conv") for k in keys)
    meta = header(out)
    assert meta["arch"] == arch and meta["format"] == "tur_ext.export"
    assert json.loads(meta["config"])["uncertainty"] is False
    assert json.loads(meta["tasks"]) == ["denoise_15", "denoise_25", "denoise_50", "derain", "dehaze"]
    assert json.loads(meta["value_range"]) == list(map(float, config.get("input_range", [0, 1])))
    assert json.loads(meta["output_range"]) == [0.0, 1.0]
    assert meta["release_layout"] == model.release_layout
    assert read_safetensors_metadata(out)["size_multiple"] == model.size_multiple == int(meta["size_multiple"])
    # The file also loads into a model the user builds (what `--arch NAME --weights FILE` does), and gives the same.
    rebuilt, tasks = model_from_safetensors(out)
    fresh = build(arch, **config).eval()
    load_weights(fresh, out)
    x = torch.rand(1, 3, low + model.size_multiple, low, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)[0]
        assert torch.equal(rebuilt(x), ref) and torch.equal(fresh(x), ref)
    assert tasks == json.loads(meta["tasks"])


def test_export_errors(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"out: safetensors files must end in \.safetensors"):
        export_safetensors(model, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="half: safetensors exports hold fp32 weights"):
        export_safetensors(model, tmp_path / "model.safetensors", half=True)
    assert not (tmp_path / "model.safetensors").exists()
    plain = tmp_path / "plain.safetensors"
    st.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(plain))
    assert is_safetensors(plain) and not is_safetensors(REPO_ROOT / "README.md")
    with pytest.raises(ValueError, match=r"has no tur_ext metadata.*--arch NAME --weights"):
        read_safetensors_metadata(plain)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((64).to_bytes(8, "little") + b"{" + b"x" * 70)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_weights(build("nafnet-tiny", **TINY_CONFIG), broken)


# ---------------------------------------------------------------------------------------- CLI: export and restore

def _checkpoint(path: Path) -> torch.nn.Module:
    model = tiny_model()
    sd = model.state_dict()
    save_checkpoint(path, {"model": model_spec(model, True), "params": sd, "params_ema": sd, "tasks": ["derain"]})
    return model


def test_cli_export_and_restore_from_safetensors(tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    _checkpoint(ckpt)
    out = tmp_path / "tiny.safetensors"
    assert deploy_cli.main(["export", str(ckpt), "--format", "safetensors", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(safetensors, nafnet-tiny, NAFNet (megvii-research/NAFNet" in printed and "parity" in printed
    assert json.loads(header(out)["tasks"]) == ["derain"]
    image = tmp_path / "in" / "photo.png"
    image.parent.mkdir()
    write_image(image, photo_crop(37, 50))
    outs = {}
    for name, source in [("ckpt", ["--model", str(ckpt)]), ("st", ["--model", str(out)]),
                         ("weights", ["--arch", "nafnet-tiny", "--weights", str(out),
                                      *sum((["--config", f"{k}={v}"] for k, v in TINY_CONFIG.items()), [])]),
                         ("weights_only", ["--weights", str(out)])]:
        assert deploy_cli.main(["restore", *source, str(image), "--out", str(tmp_path / name)]) == 0, name
        outs[name] = read_image(tmp_path / name / "photo.png")
    capsys.readouterr()
    for name in ("st", "weights", "weights_only"):
        assert np.array_equal(outs[name], outs["ckpt"]), name
    # Re-export from the safetensors file without --arch: its header says what it is.
    again = tmp_path / "again.safetensors"
    assert deploy_cli.main(["export", "--weights", str(out), "--format", "safetensors", "--out", str(again)]) == 0
    assert json.loads(header(again)["tasks"]) == ["derain"]
    plain = tmp_path / "plain.safetensors"
    st.save_file(build("nafnet-tiny").release_state_dict(), str(plain))
    # A plain safetensors file (no tur_ext header, as spandrel users share them): the architecture comes from its keys.
    assert deploy_cli.main(["restore", "--weights", str(plain), str(image), "--out", str(tmp_path / "x")]) == 0
    assert "[tur] detected nafnet (width=16, enc_blocks=[1, 1, 1], middle_blocks=2, dec_blocks=[1, 1, 1])" \
        in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------- spandrel

_STUBS = {
    # package/module -> source. Only the names spandrel 0.4.2 imports at module level; calling any of them raises.
    "torchvision/__init__.py": "",
    "torchvision/transforms/__init__.py": "",
    "torchvision/transforms/functional.py": textwrap.dedent("""\
        import enum
        class InterpolationMode(enum.Enum):
            NEAREST = "nearest"
            BILINEAR = "bilinear"
            BICUBIC = "bicubic"
        def _absent(*args, **kwargs):
            raise NotImplementedError("torchvision stub (tests/test_safetensors_export.py): not installed here")
        rotate = normalize = _absent
        """),
    "einops/__init__.py": textwrap.dedent("""\
        def _absent(*args, **kwargs):
            raise NotImplementedError("einops stub (tests/test_safetensors_export.py): not installed here")
        rearrange = repeat = reduce = _absent
        """),
    "einops/layers/__init__.py": "",
    "einops/layers/torch.py": textwrap.dedent("""\
        import torch
        class _Absent(torch.nn.Module):
            def __init__(self, *args, **kwargs):
                raise NotImplementedError("einops stub (tests/test_safetensors_export.py): not installed here")
        Rearrange = Reduce = _Absent
        """),
}

_SPANDREL_SCRIPT = textwrap.dedent("""\
    import json, sys
    import numpy as np, torch
    from spandrel import ModelLoader
    results = {}
    for path, image in json.loads(sys.argv[1]):
        desc = ModelLoader(device="cpu").load_from_file(path)
        x = torch.from_numpy(np.load(image)).permute(2, 0, 1)[None]
        with torch.no_grad():
            y = desc.model.eval()(x)  # the raw module: no tiling or extra padding, only spandrel's own forward
        np.save(image + ".out.npy", y[0].permute(1, 2, 0).numpy())
        results[path] = {"arch": desc.architecture.id, "scale": desc.scale, "channels": desc.input_channels}
    print(json.dumps(results))
    """)


def _spandrel_path() -> Path:
    import importlib.util

    env = os.environ.get("TUR_SPANDREL_PATH")
    folder = Path(env) if env else REPO_ROOT / "build" / "spandrel-env"
    if (folder / "spandrel" / "__init__.py").is_file():
        return folder
    if importlib.util.find_spec("spandrel") is not None:
        return Path()
    pytest.skip(f"spandrel is not installed (looked in {folder} and the current environment); install it with "
                f"`{SPANDREL_INSTALL}`")


def _write_stubs(folder: Path) -> None:
    import importlib.util

    spandrel_folder = _spandrel_path()
    for rel, source in _STUBS.items():
        package = rel.split("/")[0]
        if importlib.util.find_spec(package) is not None or (spandrel_folder / package).is_dir():
            continue  # the real package is installed (here or beside spandrel): use it
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source)


def _run_spandrel(cases, tmp_path: Path) -> dict:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    _write_stubs(stubs)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(stubs), str(_spandrel_path())) if p != "."))
    proc = subprocess.run([sys.executable, "-c", _SPANDREL_SCRIPT, json.dumps(cases)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


#: (registry name, config, spandrel's architecture id, the output convolution to scale down) for every architecture
#: spandrel knows. Uformer's spandrel code calls einops at run time: its case needs the real einops in the spandrel
#: folder (``pip install --no-deps --target build/spandrel-env einops``), never in the project's environment.
#: The image is (rows, cols) size multiples: spandrel's Uformer code takes square inputs only (H = W = sqrt(tokens)).
SPANDREL_CASES = [
    pytest.param("nafnet-tiny", TINY_CONFIG, "NAFNet", "ending", (8, 12), id="nafnet-width8-2level"),
    pytest.param("nafnet-tiny", {}, "NAFNet", "ending", (8, 12), id="nafnet-tiny"),
    pytest.param("uformer", SMALL_UFORMER, "Uformer", "output_proj.proj.0", (3, 3), id="uformer-small"),
]


@pytest.mark.parametrize("arch, config, spandrel_id, output_conv, size", SPANDREL_CASES)
def test_spandrel_loads_our_file_and_matches_tur_restore(tmp_path, arch, config, spandrel_id, output_conv, size):
    """spandrel detects the architecture of our file, rebuilds it from the keys, and its output (8-bit) equals
    `tur restore --model FILE`'s within 1 level in 255 (bit for bit in practice)."""
    path = _spandrel_path()  # skip before any work
    model = randomised(build(arch, uncertainty=True, **config), seed=3)
    with torch.no_grad():
        model.get_submodule(output_conv).weight.mul_(0.1)  # keep the output near the input, as trained ones do
    out = tmp_path / "model.safetensors"
    export_safetensors(model, out, tasks="3task")
    m = model.size_multiple
    image = photo_crop(size[0] * m, size[1] * m)  # a multiple of the size multiple: spandrel pads with zeros, we reflect
    src = tmp_path / "in" / "photo.png"
    src.parent.mkdir()
    write_image(src, image)
    assert deploy_cli.main(["restore", "--model", str(out), str(src), "--out", str(tmp_path / "ours")]) == 0
    ours = (read_image(tmp_path / "ours" / "photo.png") * 255).round().astype(np.int64)
    npy = tmp_path / "photo.npy"
    np.save(npy, read_image(src).astype(np.float32))
    found = _run_spandrel([[str(out), str(npy)]], tmp_path)
    assert found[str(out)] == {"arch": spandrel_id, "scale": 1, "channels": 3}, path
    theirs = to_file_pixels(np.load(str(npy) + ".out.npy"), 8).astype(np.int64)
    diff = np.abs(theirs - ours)
    assert diff.max() <= 1, f"spandrel vs tur restore: max {diff.max()} levels, {int((diff > 0).sum())} pixels differ"
    assert np.abs(ours - np.asarray(image, dtype=np.int64)).mean() > 1.0  # the model changed the image
