"""Architecture detection from a checkpoint's keys and shapes (tur_ext.models.detect), and `tur restore/export
--weights FILE` / `tur restore --model FILE` without --arch."""
from __future__ import annotations

import argparse
import copy
import functools
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

import cv2
import numpy as np
import pytest
import safetensors.torch as st
import torch

from tur_ext import deploy_cli
from tur_ext.export import artifact_kind
from tur_ext.models import (
    Detection,
    available,
    build,
    detect_architecture,
    detect_file,
    load_weights,
    read_state_dict,
    spec,
)
from tur_ext.models.detect import DETECTION_ORDER, expansion_ratio
from tur_ext.models.transweather import UNUSED_RELEASE_MODULES

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")

# The small configurations of tests/test_models.py: milliseconds per forward on 2 CPU cores.
SMALL: Dict[str, Dict[str, Any]] = {
    "nafnet": dict(width=8, enc_blocks=[1, 1], middle_blocks=1, dec_blocks=[1, 1]),
    "promptir": dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 4, 8],
                     prompt_dims=[8, 16, 32], prompt_sizes=[8, 8, 8], include_unused=False),
    "transweather": dict(embed_dims=[8, 16, 32, 64]),
    "airnet": dict(features=16, groups=1, blocks=1, queue_size=32),
    "uformer": dict(embed_dim=8, depths=[1] * 9, num_heads=[1, 1, 2, 2, 4, 4, 2, 2, 1], win_size=2),
}
LAYOUTS = ("plain", "dataparallel", "basicsr", "lightning", "release")
HEAD_PREFIXES = ("var_conv.", "R.var_conv.")


def family(name: str) -> str:
    """The registry name detection reports for ``name`` (every NAFNet is "nafnet" with an explicit config)."""
    return "nafnet" if name.startswith("nafnet") else name


def backbone_shapes(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    """Shapes of the backbone's tensors: without the head, and without the modules TransWeather's authors' release
    holds but never uses (loading drops them)."""
    return {k: tuple(v.shape) for k, v in state_dict.items()
            if not k.startswith(HEAD_PREFIXES + UNUSED_RELEASE_MODULES)}


def release_layout(model: torch.nn.Module, name: str) -> Dict[str, torch.Tensor]:
    """The model's weights as its authors (or the TUR code) release them, head included where the model has one."""
    if family(name) == "transweather":  # the authors' layout (two unused modules) is that of [-1, 1] weights
        model = copy.deepcopy(model)
        model.set_input_range((-1.0, 1.0))
    head = {k: v for k, v in model.state_dict().items() if k.startswith("var_conv.")}
    prefix = "R." if family(name) == "airnet" else ""  # the TUR AirNet keeps its head inside the restorer
    return {**model.release_state_dict(), **{prefix + k: v for k, v in head.items()}}


def payload_for(model: torch.nn.Module, name: str, layout: str) -> Dict[str, Any]:
    """The checkpoint dict of ``model`` as people download it in ``layout``."""
    sd = model.state_dict()
    if layout == "plain":
        return dict(sd)
    if layout == "dataparallel":
        return {f"module.{k}": v for k, v in sd.items()}
    if layout == "basicsr":
        return {"params_ema": dict(sd), "params": dict(sd), "iter": 10}
    if layout == "lightning":  # PromptIR's release; the Lightning module also owns a loss with a buffer
        return {"state_dict": {**{f"net.{k}": v for k, v in sd.items()}, "loss_fn.weight": torch.ones(1)},
                "epoch": 3}
    if layout == "release":
        return release_layout(model, name)
    raise ValueError(layout)


@functools.lru_cache(maxsize=None)
def meta_model(name: str, head: bool, config_json: str = "{}") -> torch.nn.Module:
    with torch.device("meta"):
        return build(name, uncertainty=head, **json.loads(config_json))


def detected_shapes(found: Detection) -> Dict[str, Tuple[int, ...]]:
    return backbone_shapes(meta_model(found.arch, False, json.dumps(found.config, sort_keys=True)).state_dict())


def small_model(name: str, head: bool, seed: int = 0) -> torch.nn.Module:
    """A small model with random weights everywhere (NAFNet's zero-initialised residual scales would make its
    blocks identities)."""
    torch.manual_seed(seed)
    model = build(name, uncertainty=head, **SMALL[family(name)])
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("beta", "gamma")):
                p.normal_(0.0, 0.2)
    return model.eval()


# ------------------------------------------------------------------------------------------- detection in memory

def test_every_registered_architecture_is_tried():
    assert {spec(n).cls for n in available()} == {spec(n).cls for n in DETECTION_ORDER}
    assert all(spec(n).cls.detect_keys for n in DETECTION_ORDER)


@pytest.mark.parametrize("head", [False, True], ids=["backbone", "head"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", available())
def test_release_configurations_are_detected(name, layout, head):
    """Every registered default (release) configuration, on the meta device: shapes are all detection reads."""
    model = meta_model(name, head)
    payload = payload_for(model, name, layout)
    found = detect_architecture(payload)
    assert (found.arch, found.has_head) == (family(name), head)
    unwrapped, _, _ = read_state_dict(payload)
    assert detected_shapes(found) == backbone_shapes(unwrapped)
    if layout != "release":
        assert detected_shapes(found) == backbone_shapes(model.state_dict())


@pytest.mark.parametrize("head", [False, True], ids=["backbone", "head"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_configurations_are_detected(name, layout, head):
    model = meta_model(name, head, json.dumps(SMALL[name], sort_keys=True))
    payload = payload_for(model, name, layout)
    found = detect_architecture(payload)
    assert (found.arch, found.has_head) == (name, head)
    unwrapped, _, _ = read_state_dict(payload)
    assert detected_shapes(found) == backbone_shapes(unwrapped)
    if layout != "release":
        assert detected_shapes(found) == backbone_shapes(model.state_dict())


def test_secondary_options_are_detected_where_they_differ():
    """Options other than the sizes appear in the config only where the file departs from the constructor."""
    cases = [
        ("nafnet", dict(width=8, enc_blocks=[0, 2], middle_blocks=0, dec_blocks=[1, 0], dw_expand=4, ffn_expand=3,
                        in_channels=1)),
        ("promptir", {**SMALL["promptir"], "bias": True, "layernorm_type": "BiasFree",
                      "ffn_expansion_factor": 3.1, "prompt_len": 3}),
        ("uformer", {**SMALL["uformer"], "mlp_ratio": 2.0, "qkv_bias": False, "modulator": False, "win_size": 3}),
    ]
    for name, config in cases:
        found = detect_architecture(meta_model(name, False, json.dumps(config, sort_keys=True)).state_dict())
        assert found.config == config, name
    release = detect_architecture(meta_model("promptir", False).state_dict())
    assert "ffn_expansion_factor" not in release.config  # 2.66, the default, though 2.65625 gives the same shapes


def test_expansion_ratio_prefers_the_default_then_short_decimals():
    assert expansion_ratio([(48, 127), (96, 255)], 2.66) == 2.66
    assert expansion_ratio([(8, 24), (16, 49), (32, 99)], 2.66) == 3.1
    assert expansion_ratio([], 2.66) is None


def test_describe_is_the_cli_line():
    found = detect_architecture(meta_model("airnet", True).state_dict())
    assert found.describe() == "airnet (features=64, groups=5, blocks=5, queue_size=1280)"


# ------------------------------------------------------------------------------------------- detection of files

def save(payload: Dict[str, Any], path: Path, layout: str) -> Path:
    if layout == "safetensors":
        st.save_file({k: v.detach().clone().contiguous() for k, v in payload.items()}, str(path))
    else:
        torch.save(payload, path)
    return path


@pytest.mark.parametrize("head", [False, True], ids=["backbone", "head"])
@pytest.mark.parametrize("layout", LAYOUTS + ("safetensors",))
@pytest.mark.parametrize("name", sorted(SMALL))
def test_files_are_detected_and_load(tmp_path, name, layout, head):
    model = small_model(name, head)
    payload = payload_for(model, name, "plain" if layout == "safetensors" else layout)
    if layout == "lightning":  # Lightning pickles its hyper_parameters: read as inert data, no code runs
        payload["hyper_parameters"] = argparse.Namespace(lr=2e-4)
    path = save(payload, tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pth"), layout)
    found = detect_file(path)
    assert (found.arch, found.has_head) == (name, head)
    net = build(found.arch, **found.config)
    report = load_weights(net, path, strict_head=False, inert_objects=True)
    assert bool(report.dropped_head_keys) == head
    own = model.state_dict()
    for key, value in net.state_dict().items():
        if key in own:  # a PromptIR release also holds its unused modules (as zeros)
            assert torch.equal(value, own[key]), key


def test_malformed_shapes_match_nothing():
    sd = dict(meta_model("nafnet", False, json.dumps(SMALL["nafnet"], sort_keys=True)).state_dict())
    sd["intro.weight"] = torch.zeros(8)  # a conv weight must be 4-D
    with pytest.raises(ValueError, match="matches no known architecture"):
        detect_architecture(sd)
    sd = dict(meta_model("uformer", False, json.dumps(SMALL["uformer"], sort_keys=True)).state_dict())
    sd["encoderlayer_0.blocks.0.attn.relative_position_bias_table"] = torch.zeros(8, 1)  # not (2w - 1)**2 rows
    with pytest.raises(ValueError, match="matches no known architecture"):
        detect_architecture(sd)


def test_undetectable_files_are_one_line_errors(tmp_path):
    random_keys = tmp_path / "mystery.pth"
    torch.save({"foo.weight": torch.zeros(3, 3), "bar.bias": torch.zeros(3)}, random_keys)
    with pytest.raises(ValueError) as info:
        detect_file(random_keys)
    message = str(info.value)
    assert message.startswith(f"{random_keys} matches no known architecture") and "\n" not in message
    for name in DETECTION_ORDER:
        assert f"{name} (" in message, name
    assert "intro.weight" in message and "E.E.encoder_q.*" in message and "foo.weight" in message
    text = tmp_path / "notes.txt"
    text.write_text("not weights\n")
    with pytest.raises(ValueError, match=r"notes\.txt: cannot be read with torch.load: not a torch checkpoint"):
        detect_file(text)
    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    with pytest.raises(ValueError, match="empty.pth: not a recognised checkpoint"):
        detect_file(empty)
    with pytest.raises(ValueError, match="state dict: not a recognised checkpoint"):
        detect_architecture({})


# ------------------------------------------------------------------------------------------------------ the CLI

def write_random_image(path: Path, height: int = 24, width: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), pixels)
    return path


def config_args(config: Dict[str, Any]) -> list:
    return sum((["--config", f"{k}={json.dumps(v)}"] for k, v in config.items()), [])


def restore(source: list, image: Path, out: Path) -> np.ndarray:
    assert deploy_cli.main(["restore", *source, str(image), "--out", str(out)]) == 0, source
    return cv2.imread(str(out / image.name), cv2.IMREAD_UNCHANGED)


# One layout per family, as its weights are published: (layout, file name, head).
PUBLISHED = {
    "nafnet": ("basicsr", "NAFNet-width8.pth", False),
    "promptir": ("lightning", "model.ckpt", False),
    "transweather": ("release", "best", False),       # the authors': DataParallel below, no suffix
    "airnet": ("release", "AirNet_TUR_3task.pth", True),
    "uformer": ("basicsr", "Uformer_TUR.safetensors", True),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_restore_without_arch_matches_restore_with_arch(tmp_path, capsys, name):
    layout, file_name, head = PUBLISHED[name]
    model = small_model(name, head, seed=1)
    payload = payload_for(model, name, layout)
    if name == "transweather":
        payload = {f"module.{k}": v for k, v in payload.items()}
    if file_name.endswith(".safetensors"):
        path = save(payload["params"], tmp_path / file_name, "safetensors")
    else:
        path = save(payload, tmp_path / file_name, layout)
    image = write_random_image(tmp_path / "in" / "photo.png")
    expected = restore(["--arch", name, "--weights", str(path), *config_args(SMALL[name])], image, tmp_path / "a")
    capsys.readouterr()
    got = restore(["--weights", str(path)], image, tmp_path / "w")
    line = capsys.readouterr().out.splitlines()[0]
    dropped = "; uncertainty head dropped" if head else ""
    assert line == f"[tur] detected {detect_file(path).describe()} from {path}{dropped}"
    assert np.array_equal(got, expected)
    assert np.array_equal(restore(["--model", str(path)], image, tmp_path / "m"), expected)


def test_export_without_arch(tmp_path, capsys):
    model = small_model("nafnet", head=True)
    weights = save({"params": model.state_dict()}, tmp_path / "net_g_latest.pth", "basicsr")
    out = tmp_path / "nafnet.pt"
    assert deploy_cli.main(["export", "--weights", str(weights), "--format", "torchscript", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[tur] detected nafnet (width=8, enc_blocks=[1, 1], middle_blocks=1, dec_blocks=[1, 1])" in printed
    assert "uncertainty head dropped" in printed and "parity" in printed
    assert artifact_kind(out) == "torchscript"
    # The exported model restores as the weights do.
    image = write_random_image(tmp_path / "in" / "photo.png", 16, 12)
    assert np.array_equal(restore(["--model", str(out)], image, tmp_path / "ts"),
                          restore(["--weights", str(weights)], image, tmp_path / "w"))


def test_cli_errors_for_undetectable_files(tmp_path, capsys):
    image = write_random_image(tmp_path / "in" / "photo.png")
    mystery = tmp_path / "mystery.pth"
    torch.save({"params": {"foo.weight": torch.zeros(3, 3)}}, mystery)
    text = tmp_path / "notes.txt"
    text.write_text("not weights\n")
    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    for option in ("--weights", "--model"):
        assert deploy_cli.main(["restore", option, str(mystery), str(image), "--out", str(tmp_path / "o")]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"{option}: {mystery} matches no known architecture" in err
        assert "name the architecture with --arch" in err
        assert all(f"{name} (" in err for name in DETECTION_ORDER)
        assert deploy_cli.main(["restore", option, str(empty), str(image), "--out", str(tmp_path / "o")]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "empty.pth: not a recognised checkpoint" in err, err
    # A file that is no torch file at all keeps each option's own message.
    assert deploy_cli.main(["restore", "--weights", str(text), str(image), "--out", str(tmp_path / "o")]) == 1
    assert "notes.txt: cannot be read with torch.load: not a torch checkpoint" in capsys.readouterr().err
    assert deploy_cli.main(["restore", "--model", str(text), str(image), "--out", str(tmp_path / "o")]) == 1
    assert "is not a tur_ext model" in capsys.readouterr().err
    assert deploy_cli.main(["export", "--weights", str(mystery), "--format", "torchscript", "--out",
                            str(tmp_path / "m.pt")]) == 1
    assert "matches no known architecture" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.pt").exists()


# ----------------------------------------------------------------------------------- the published key layouts

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.mark.parametrize("fixture, arch, head", [
    ("promptir_official.json", "promptir", False),
    ("transweather_official.json", "transweather", False),
    ("transweather_tur_official.json", "transweather", True),
    ("airnet_official.json", "airnet", False),
    ("airnet_tur_official.json", "airnet", True),
    ("uformer_tur_7task_official.json", "uformer", True),
])
def test_published_layouts_are_detected(fixture, arch, head):
    """The keys and shapes of the real releases (recorded in shared/fixtures), as meta tensors."""
    path = FIXTURES / fixture
    if not path.is_file():
        pytest.skip(f"fixture {path} not found")
    published = {k: torch.empty(v, device="meta") for k, v in json.loads(path.read_text())["state_dict"].items()}
    found = detect_architecture(published, fixture)
    assert (found.arch, found.has_head) == (arch, head)
    assert detected_shapes(found) == backbone_shapes(published)
