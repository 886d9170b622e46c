"""Checkpoints as people download them, straight into ``tur restore --arch NAME --weights FILE`` (and ``tur export``):
a PromptIR Lightning file, BasicSR files, DataParallel state dicts, safetensors. The files are written here in those
layouts, with the extra entries the real ones carry (trainer state, hyper-parameters as objects)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from export_helpers import TINY_CONFIG, photo_crop, tiny_model
from tur_ext import deploy_cli
from tur_ext.data.io import read_image, write_image
from tur_ext.inference import Restorer, _EagerModel, to_file_pixels
from tur_ext.export import build_metadata, prepare_for_export
from tur_ext.models import build, load_weights
from tur_ext.models.weights import OpaqueObject, read_checkpoint_file

SMALL_PROMPTIR = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 2, 2],
                      prompt_dims=[8, 16, 32], prompt_sizes=[8, 4, 2])


def config_args(config: dict) -> list:
    return sum((["--config", f"{k}={v}"] for k, v in config.items()), [])


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


class _LossWithParams(torch.nn.Module):  # the LightningModule may own more modules than `net`
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(3))


class _Sneaky:
    """An object whose unpickling would run a command: the reader must never call it."""

    def __reduce__(self):
        return (os.system, ("touch SHOULD_NOT_EXIST",))


def lightning_checkpoint(net: torch.nn.Module) -> dict:
    """What ``pytorch_lightning.Trainer.save_checkpoint`` writes for PromptIR's ``PromptIRModel`` (``self.net``)."""
    sd = {f"net.{k}": v for k, v in net.state_dict().items()}
    sd.update({f"loss_fn.{k}": v for k, v in _LossWithParams().state_dict().items()})
    adam = {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}}
    return {
        "epoch": 119, "global_step": 480000, "pytorch-lightning_version": "2.0.1",
        "state_dict": sd,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 120}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None, 'mode': 'min'}": {"best_model_path": "", "dirpath": "ckpt/"}},
        "optimizer_states": [{"state": adam, "param_groups": [{"lr": 2e-4, "params": [0]}]}],
        "lr_schedulers": [{"base_lrs": [2e-4], "last_epoch": 119}],
        "hyper_parameters": argparse.Namespace(lr=2e-4, de_type=["denoise_15", "derain", "dehaze"]),
    }


def restore_cli(tmp_path: Path, name: str, args: list, image: Path) -> np.ndarray:
    assert deploy_cli.main(["restore", *args, str(image), "--out", str(tmp_path / name)]) == 0, name
    return np.round(read_image(tmp_path / name / image.name) * 255).astype(np.uint8)


def eager_restore(net: torch.nn.Module, image: Path) -> np.ndarray:
    plain = prepare_for_export(net)
    restorer = Restorer(_EagerModel(plain), build_metadata(plain, artifact="eager"), torch.device("cpu"))
    return to_file_pixels(restorer.restore_image(read_image(image)), 8)


@pytest.fixture()
def image(tmp_path) -> Path:
    path = tmp_path / "in" / "photo.png"
    path.parent.mkdir()
    write_image(path, photo_crop(30, 41))
    return path


def test_promptir_lightning_checkpoint_restores(tmp_path, image, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = randomised(build("promptir", **SMALL_PROMPTIR))
    ckpt = lightning_checkpoint(net)
    ckpt["sneaky"] = _Sneaky()
    path = tmp_path / "model.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"model\.ckpt: cannot be read with torch.load\(weights_only=True\)"):
        read_checkpoint_file(path)  # the library's default: refuse what is not tensors and plain containers
    payload = read_checkpoint_file(path, inert_objects=True)  # the CLI's: the Namespace becomes inert data
    assert isinstance(payload["hyper_parameters"], OpaqueObject)
    assert payload["hyper_parameters"].state == {"lr": 2e-4, "de_type": ["denoise_15", "derain", "dehaze"]}
    assert payload["sneaky"].qualified_name.endswith(".system") and not (tmp_path / "SHOULD_NOT_EXIST").exists()
    got = restore_cli(tmp_path, "lightning", ["--arch", "promptir", "--weights", str(path),
                                              *config_args(SMALL_PROMPTIR)], image)
    assert np.array_equal(got, eager_restore(net, image))
    assert np.abs(got.astype(np.int64) - np.round(read_image(image) * 255)).mean() > 1  # the weights did something
    # The same file exports without code (the head-less backbone, the Lightning wrapper gone).
    out = tmp_path / "promptir.safetensors"
    assert deploy_cli.main(["export", "--arch", "promptir", "--weights", str(path), *config_args(SMALL_PROMPTIR),
                            "--format", "safetensors", "--out", str(out)]) == 0
    assert np.array_equal(restore_cli(tmp_path, "st", ["--model", str(out)], image), got)
    capsys.readouterr()


@pytest.mark.parametrize("layout", ["params_ema+params", "params", "params+module.", "dataparallel", "head"])
def test_basicsr_and_plain_state_dicts_restore(tmp_path, image, layout):
    model = tiny_model(seed=1)  # with an uncertainty head, as a TUR release has
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("var_conv.")}
    stale = {k: v + 0.5 for k, v in backbone.items()}
    payload = {
        "params_ema+params": {"params": stale, "params_ema": backbone},
        "params": {"params": backbone},
        "params+module.": {"params": {f"module.{k}": v for k, v in backbone.items()}},
        "dataparallel": {f"module.{k}": v for k, v in backbone.items()},
        "head": {"params": model.state_dict()},  # a TUR release: the head is dropped for restoring
    }[layout]
    path = tmp_path / "net_g_latest.pth"
    torch.save(payload, path)
    got = restore_cli(tmp_path, "out", ["--arch", "nafnet-tiny", "--weights", str(path),
                                        *config_args(TINY_CONFIG)], image)
    assert np.array_equal(got, eager_restore(model, image))


def test_clear_errors_for_wrong_weights(tmp_path, image, capsys):
    path = tmp_path / "other.pth"
    torch.save({"params": build("nafnet-tiny").state_dict()}, path)  # the 3-level default, not TINY_CONFIG
    args = ["restore", "--arch", "nafnet-tiny", "--weights", str(path), *config_args(TINY_CONFIG), str(image),
            "--out", str(tmp_path / "o")]
    assert deploy_cli.main(args) == 1
    err = capsys.readouterr().err
    assert f"{path}: checkpoint (basicsr:params) does not match NAFNet" in err and "unexpected keys" in err
    foreign = tmp_path / "foreign.pth"
    torch.save({"body.0.weight": torch.randn(4, 3, 3, 3), "tail.bias": torch.randn(3)}, foreign)
    for extra, message in [(["--arch", "nafnet-tiny"], "--arch needs --weights FILE"),
                           (["--model", str(path), "--weights", str(path)], "give either --model or --arch"),
                           ([], "expected --model FILE, or --arch NAME --weights FILE"),
                           (["--weights", str(foreign)], "matches no known architecture"),
                           (["--arch", "nafnet-tiny", "--weights", str(tmp_path / "nope.pth")],
                            "--weights: no such file")]:
        assert deploy_cli.main(["restore", *extra, str(image), "--out", str(tmp_path / "o")]) == 1, extra
        assert message in capsys.readouterr().err, extra
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(ValueError, match="expected a state dict or a checkpoint dict, got list"):
        load_weights(build("nafnet-tiny"), not_a_dict)
