"""AirNet and AirNet-TUR: both released layouts against the fixtures made from the authors' and the TUR code, the
size rule, the encoder modes (MoCo, frozen) and their training, and deployment (TorchScript, AOTInductor, runner).

The fixtures live beside the checkout (``../shared/fixtures/airnet*_official.json``); the tests that need them skip
where they are absent.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import tur_ext.ops
from export_helpers import run_runner, runner_binary, write_photos
from tur_ext import deploy_cli
from tur_ext.export import export_aoti
from tur_ext.export_onnx import export_onnx, load_onnx
from tur_ext.inference import load_restorer
from tur_ext.models import AirNet, build, load_weights, spec, strip_uncertainty
from tur_ext.models.weights import WeightsMismatchError

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
OFFICIAL = FIXTURES / "airnet_official.json"
TUR = FIXTURES / "airnet_tur_official.json"
needs_fixtures = pytest.mark.skipif(not (OFFICIAL.is_file() and TUR.is_file()),
                                    reason=f"AirNet fixtures not found in {FIXTURES}")

#: A small AirNet (same blocks, one group of one block, 8 features) for the tests that do not compare with a release.
SMALL = dict(features=8, groups=1, blocks=1, queue_size=16)
RELEASE_HEAD = "R.var_conv."
# The DCN op has no pure-PyTorch fallback: without the compiled extension the forward tests have no op to call.
needs_dcn = pytest.mark.skipif(tur_ext.ops.backend() != "compiled",
                               reason="tur_ext._C is not built (deform_conv2d needs it)")
RUNNER = runner_binary()
needs_runner = pytest.mark.skipif(not RUNNER.is_file(), reason=f"the C++ runner is not built ({RUNNER} missing)")


def deterministic_weights(layout: dict) -> dict:
    """The weights the fixtures' ``about`` describes, from a {key: shape} layout (keys in sorted order; integer
    buffers are left out, as the recipe leaves them as constructed)."""
    g = torch.Generator().manual_seed(1234)
    out = {}
    for key in sorted(layout):
        shape = list(layout[key])
        if key.endswith(("num_batches_tracked", "queue_ptr")):
            continue
        if (len(shape) == 1 and key.endswith("weight")) or "temperature" in key or key.endswith("running_var"):
            out[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif "conv_offset_mask" in key:
            out[key] = 0.5 * torch.randn(shape, generator=g)
        else:
            out[key] = 0.03 * torch.randn(shape, generator=g)
    return out


def release_checkpoint(fx: dict) -> dict:
    """A full state dict in a release's layout: the recipe's float tensors, the integer buffers as constructed."""
    weights = deterministic_weights(fx["state_dict"])
    for key, shape in fx["state_dict"].items():
        if key not in weights:
            weights[key] = torch.zeros(shape, dtype=torch.long)
    return {k: weights[k] for k in fx["state_dict"]}


def small_model(uncertainty: bool = False, seed: int = 0, **config) -> AirNet:
    """The small model with the fixtures' weight recipe (so offsets of pixels and masks far from 0.5)."""
    torch.manual_seed(seed)
    model = build("airnet", uncertainty=uncertainty, **{**SMALL, **config})
    sd = model.state_dict()
    sd.update(deterministic_weights({k: v.shape for k, v in sd.items()}))
    model.load_state_dict(sd)
    return model.eval()


@pytest.fixture(scope="module")
def official() -> dict:
    with open(OFFICIAL, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tur() -> dict:
    with open(TUR, encoding="utf-8") as f:
        return json.load(f)


def fixture_input(fx: dict) -> torch.Tensor:
    return torch.rand(fx["input_shape"], generator=torch.Generator().manual_seed(fx["input_seed"]))


def max_err(got: torch.Tensor, flat: list) -> float:
    return (got - torch.tensor(flat, dtype=torch.float32).reshape(got.shape)).abs().max().item()


def _release_layout(model: torch.nn.Module) -> dict:
    return {(RELEASE_HEAD + k[len("var_conv."):] if k.startswith("var_conv.") else k): list(v.shape)
            for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------- the two releases

@needs_fixtures
def test_layouts_and_parameter_counts_of_both_releases(official, tur):
    with torch.device("meta"):
        plain, with_head = build("airnet"), build("airnet", uncertainty=True)
    layout = _release_layout(plain)
    assert list(layout) == list(official["state_dict"]) and layout == official["state_dict"]
    assert layout["E.E.queue"] == [256, 1280]  # AirNet: batch size 5 x 256
    # The TUR release: the same keys plus R.var_conv (ours at the end, as every backbone's head), queue width 8192.
    tur_layout = _release_layout(with_head)
    assert set(tur_layout) == set(tur["state_dict"])
    assert {k: v for k, v in tur_layout.items() if k != "E.E.queue"} == \
        {k: v for k, v in tur["state_dict"].items() if k != "E.E.queue"}
    assert tur["state_dict"]["E.E.queue"] == [256, 8192]
    n_plain, n_head = (sum(p.numel() for p in m.parameters()) for m in (plain, with_head))
    assert n_plain == official["num_params"] == 8_930_313
    assert n_head == tur["num_params"] == 9_005_900 and n_head - n_plain == tur["num_params_head"] == 75_587
    s = spec("airnet")
    assert (s.size_multiple, s.min_size) == (1, 1)


@needs_dcn
@needs_fixtures
@pytest.mark.parametrize("prefix", ["", "module."])
def test_authors_release_reproduces_the_authors_forward(official, tmp_path, prefix):
    """ckpt/All.pth's layout, a plain state dict (``module.`` when saved from DataParallel), reproduces the
    authors' ``model(x_query=x, x_key=x)``."""
    ckpt = {prefix + k: v for k, v in release_checkpoint(official).items()}
    path = tmp_path / "All.pth"
    torch.save(ckpt, path)
    model = build("airnet").eval()
    report = load_weights(model, path)
    assert report.format == "state_dict" and report.prefixes_stripped == ((prefix,) if prefix else ())
    assert report.num_loaded == len(official["state_dict"])
    with torch.no_grad():
        out = model(fixture_input(official))
    assert out.shape == tuple(official["output_shape"])
    assert max_err(out, official["expected_output"]) <= 1e-4


@needs_dcn
@needs_fixtures
def test_tur_release_reproduces_image_and_uncertainty(tur, tmp_path):
    """BasicSR {"params", "params_ema"} (EMA preferred), head under R.var_conv, a queue of the file's width: image
    and uncertainty as the TUR code computes them. Without a head (export), the head is dropped, the image kept."""
    from tur_ext.export import model_from_weights

    weights = release_checkpoint(tur)
    stale = {k: (v + 1.0 if v.is_floating_point() else v) for k, v in weights.items()}
    path = tmp_path / "AirNet_TUR_3task.pth"
    torch.save({"params": stale, "params_ema": weights}, path)
    model = build("airnet", uncertainty=True).eval()
    report = load_weights(model, path)
    assert report.format == "basicsr:params_ema" and report.num_loaded == len(tur["state_dict"])
    assert model.E.E.queue.shape == (256, 8192) and model.config["queue_size"] == 8192
    assert torch.equal(model.E.E.queue, weights["E.E.queue"])
    assert torch.equal(model.var_conv[4].weight, weights["R.var_conv.4.weight"])
    x = fixture_input(tur)
    with torch.no_grad():
        image, unc = model(x)
        plain = model_from_weights("airnet", path)(x)
    assert max_err(image, tur["expected_output"]) <= 1e-4
    assert max_err(unc, tur["expected_uncertainty"]) <= 1e-4
    assert (unc > 0).all() and (plain - image).abs().max().item() == 0.0
    # The rebuilt architecture (checkpoints, exports) carries the file's queue width.
    with torch.device("meta"):
        assert build("airnet", **{k: v for k, v in model.config.items() if not k.startswith("uncertainty")}).E.E.queue.shape \
            == (256, 8192)


def test_bad_files_and_configs_give_clear_errors(tmp_path):
    model = build("airnet", **SMALL)
    sd = model.state_dict()
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        load_weights(model, tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: cannot be read with torch.load"):
        load_weights(model, junk)
    wrong_dim = {**sd, "E.E.queue": torch.zeros(7, 16)}  # the key dim is the encoder's (4 x features), not the file's
    with pytest.raises(WeightsMismatchError, match=r"shape mismatches \(1\): E\.E\.queue \(7, 16\) vs model \(32, 16\)"):
        load_weights(model, wrong_dim)
    partial = {k: v for k, v in sd.items() if not k.startswith("E.E.encoder_k.")}
    with pytest.raises(WeightsMismatchError, match=r"missing keys \(\d+\): E\.E\.encoder_k\."):
        load_weights(model, partial)
    release_head = {**sd, **{RELEASE_HEAD + k: v for k, v in
                             build("airnet", uncertainty=True, **SMALL).var_conv.state_dict().items()}}
    with pytest.raises(WeightsMismatchError, match="only the uncertainty head differs: pass strict_head=False"):
        load_weights(model, release_head)
    assert load_weights(model, release_head, strict_head=False).dropped_head_keys[0] == "var_conv.0.weight"
    for bad, match in ((dict(encoder="trained"), r"encoder: expected one of \['moco', 'frozen'\]"),
                       (dict(features=0), "features: expected a positive int"),
                       (dict(queue_size=1.5), "queue_size: expected a positive int")):
        with pytest.raises(ValueError, match=match):
            build("airnet", **bad)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 3, H, W\)"):
        model(torch.rand(1, 4, 8, 8))


# ------------------------------------------------------------------------------------------------ sizes

@needs_dcn
@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (2, 3, 1, 7), (1, 3, 5, 3), (1, 3, 13, 22)])
def test_any_size_and_batch_consistency(shape):
    """Any H, W >= 1; each image's result does not depend on the others in the batch (eval BatchNorm)."""
    model = small_model(uncertainty=True)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        image, unc = model(x)
        first, _ = model(x[:1])
    assert image.shape == unc.shape == shape and torch.isfinite(image).all() and (unc > 0).all()
    assert (image[:1] - first).abs().max().item() <= 1e-5
    assert image.std().item() > 0 if math.prod(shape[2:]) > 1 else True


@needs_dcn
def test_dcn_offsets_come_from_conv_offset_mask_in_the_authors_order():
    """The DCN layer hands channels 0..17 of conv_offset_mask to the op as interleaved (dy, dx) offsets and the
    sigmoid of 18..26 as the mask: with a conv_offset_mask that only has a bias, dy = 1 at every kernel point and
    mask logits of 0 (0.5), the layer is half a conv of the image shifted up by one row."""
    import torch.nn.functional as F

    layer = small_model().R.body[0].body[0].dgm1.dcn
    with torch.no_grad():
        layer.conv_offset_mask.weight.zero_()
        layer.conv_offset_mask.bias.zero_()
        layer.conv_offset_mask.bias[0:18:2] = 1.0
        x, inter = torch.rand(1, 8, 6, 9), torch.rand(1, 8, 6, 9)
        got = layer(x, inter)
    expected = 0.5 * F.conv2d(F.pad(x, (1, 1, 0, 2)), layer.weight)
    assert (got - expected).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------------ encoder modes

@needs_dcn
def test_moco_training_forward_updates_keys_and_queue():
    model = small_model(encoder="moco").train()
    x, key = torch.rand(4, 3, 12, 12), torch.rand(4, 3, 9, 9)
    q0, k0 = model.E.E.queue.clone(), model.E.E.encoder_k.E_pre.backbone[0].weight.clone()
    wq = model.E.E.encoder_q.E_pre.backbone[0].weight.detach().clone()
    image = model(x, key)
    logits, labels = model.pop_contrastive()
    assert model.pop_contrastive() is None
    assert image.shape == x.shape and logits.shape == (4, 1 + 16) and labels.tolist() == [0] * 4
    assert int(model.E.E.queue_ptr) == 4 and not torch.equal(model.E.E.queue[:, :4], q0[:, :4])
    assert torch.equal(model.E.E.queue[:, 4:], q0[:, 4:])
    assert torch.allclose(model.E.E.encoder_k.E_pre.backbone[0].weight, 0.999 * k0 + 0.001 * wq, atol=1e-7)
    assert not torch.equal(k0, wq)  # the recipe gives the two encoders different weights: the update is visible
    torch.nn.functional.cross_entropy(logits, labels).backward()
    assert model.E.E.encoder_q.mlp[0].weight.grad is not None
    assert all(p.grad is None for p in model.E.E.encoder_k.parameters())
    with pytest.raises(ValueError, match="x_key: the queue width 16 must be a multiple of the batch size, got 3"):
        model(x[:3], key[:3])


@needs_dcn
def test_frozen_encoder_stays_fixed_in_training():
    model = small_model(uncertainty=True, encoder="frozen").train()
    assert model.training and not model.E.training and not model.E.E.encoder_q.E_pre.backbone[1].training
    assert all(not p.requires_grad for p in model.E.parameters())
    stats = model.E.E.encoder_q.E_pre.backbone[1].running_mean.clone()
    image, unc = model(torch.rand(2, 3, 10, 10), torch.rand(2, 3, 8, 8))  # no MoCo step in frozen mode
    assert model.pop_contrastive() is None
    (image.mean() + unc.mean()).backward()
    assert torch.equal(model.E.E.encoder_q.E_pre.backbone[1].running_mean, stats)
    assert model.R.head[0].weight.grad is not None and model.var_conv[0].weight.grad is not None
    plain = strip_uncertainty(model)
    assert plain.encoder_mode == "frozen" and not plain.E.training


# ------------------------------------------------------------------------------------------------ training

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_recipe_is_airnets_published_3task_setting():
    from tur_ext.tasks import TaskSet
    from tur_ext.train.config import load_config
    from tur_ext.train.schedule import piecewise_factor

    cfg = load_config(CONFIGS / "airnet_3task.yaml")
    assert cfg["model"]["name"] == "airnet" and cfg["model"]["encoder"] == "moco" and cfg["loss"]["name"] == "tur"
    assert list(TaskSet(cfg["tasks"])) == ["denoise_15", "denoise_25", "denoise_50", "derain", "dehaze"]
    assert cfg["data"]["patch_size"] == 128 and cfg["data"]["batch_size"] == 5 and cfg["model"]["queue_size"] == 1280
    assert cfg["optim"]["name"] == "adam" and cfg["optim"]["lr"] == 1e-3 and cfg["optim"]["weight_decay"] == 0.0
    t, s = cfg["train"], cfg["schedule"]
    assert (t["epochs"], t["encoder_pretrain"], t["contrastive_weight"]) == (1000, 100, 0.1)

    def airnet_lr(epoch: int) -> float:
        """train.py: the lr of epoch `epoch`, set at the end of the one before."""
        if epoch == 0:
            return 1e-3
        e = epoch - 1
        return 1e-3 * 0.1 ** (e // 60) if e <= 100 else 1e-4 * 0.5 ** ((e - 100) // 125)

    for epoch in range(1000):
        ours = cfg["optim"]["lr"] * piecewise_factor(epoch, s["milestones"], s["factors"])
        assert math.isclose(ours, airnet_lr(epoch), rel_tol=1e-12), epoch


def test_piecewise_schedule_errors_name_the_key():
    from tur_ext.train.config import ConfigError, load_config

    base = {"train": {"steps": 4}, "schedule": {"name": "piecewise", "milestones": [2, 3], "factors": [0.5, 0.25]}}
    assert load_config(raw=base)["schedule"]["milestones"] == [2, 3]
    for sched, match in (({"milestones": [3, 2]}, "schedule.milestones.*strictly increasing"),
                         ({"factors": [0.5]}, r"schedule.factors.*one positive lr factor per milestone \(2\)"),
                         ({"name": "cosine"}, "apply to schedule.name 'piecewise' only")):
        with pytest.raises(ConfigError, match=match):
            load_config(raw={**base, "schedule": {**base["schedule"], **sched}})


def _train(tmp_path: Path, name: str, steps: int, model: dict, train: dict = None) -> "object":
    from tur_ext.train import Trainer
    from tur_ext.train.config import load_config

    raw = {"name": name, "seed": 0, "output_dir": str(tmp_path / name), "tasks": "3task",
           "model": {"name": "airnet", **SMALL, "queue_size": 10, **model},
           "loss": {"name": "tur"},
           "optim": {"name": "adam", "lr": 1e-3},
           "data": {"type": "embedded", "patch_size": 16, "length": 5, "batch_size": 5, "eval_batch_size": 5},
           "train": {"steps": steps, "progress": False, "tensorboard": False, "validate": False, "log_every": 1,
                     **(train or {})}}
    trainer = Trainer(load_config(raw=raw))
    with trainer:
        trainer.train()
    return trainer


@needs_dcn
def test_short_moco_training_runs_both_stages(tmp_path):
    """AirNet's training: one step of the encoder alone (the restorer does not move), then a joint step; the MoCo
    loss is logged and the queue fills."""
    import csv

    tr = _train(tmp_path, "moco", 2, {"encoder": "moco"}, {"encoder_pretrain": 1, "ema_decay": 0.0})
    assert tr.step == 2 and tr.moco and tr.encoder_pretrain_steps == 1
    rows = list(csv.DictReader(open(tmp_path / "moco" / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2] and all(float(r["contrastive"]) > 0 for r in rows)
    assert int(tr.model.E.E.queue_ptr) == 0  # 2 batches of 5 keys went into a queue of 10
    assert tr.model.config["encoder"] == "moco"


@needs_dcn
def test_encoder_stage_leaves_the_restorer_unchanged(tmp_path):
    """The first stage trains the encoder only: the restorer and the head end as they were built (the trainer
    seeds the run with seed 0 before building the model)."""
    from tur_ext import models

    tr = _train(tmp_path, "stage1", 1, {"encoder": "moco"}, {"encoder_pretrain": 1})
    torch.manual_seed(0)
    init = models.build("airnet", uncertainty=True, **{**SMALL, "queue_size": 10})
    assert torch.equal(tr.model.R.head[0].weight, init.R.head[0].weight)
    assert torch.equal(tr.model.var_conv[0].weight, init.var_conv[0].weight)
    assert not torch.equal(tr.model.E.E.encoder_q.mlp[0].weight, init.E.E.encoder_q.mlp[0].weight)


@needs_dcn
def test_short_frozen_training_from_released_weights(tmp_path):
    """TUR's setting: the encoder comes from a file (here a plain state dict, as ckpt/All.pth) and stays fixed;
    the restorer and the head train."""
    init = small_model(queue_size=10)
    path = tmp_path / "All.pth"
    torch.save(init.state_dict(), path)
    tr = _train(tmp_path, "frozen", 2, {"encoder": "frozen", "pretrained": str(path)})
    assert not tr.moco and tr.step == 2
    assert tr.pretrained.missing_head_keys  # the file has no uncertainty head: it starts fresh
    for k, v in init.E.state_dict().items():
        assert torch.equal(tr.model.E.state_dict()[k], v), k  # parameters and BatchNorm statistics alike
    assert not torch.equal(tr.model.R.head[0].weight, init.R.head[0].weight)
    with pytest.raises(ValueError, match="train.encoder_pretrain: only a model with a contrastive encoder"):
        _train(tmp_path, "bad", 1, {"encoder": "frozen"}, {"encoder_pretrain": 1})
    with pytest.raises(ValueError, match="model.queue_size: the MoCo queue width 12 must be a multiple of the "
                                         "batch per forward 5"):
        _train(tmp_path, "bad2", 1, {"encoder": "moco", "queue_size": 12})


# ------------------------------------------------------------------------------------------------ deployment

def _photos(folder: Path) -> dict:
    return write_photos(folder, {"small.png": (23, 31), "photo.png": (70, 95)})


@pytest.fixture(scope="module")
def released_export(tmp_path_factory):
    """A TUR-release-layout file (head under ``R.var_conv``) of the small model, exported with ``tur export --arch
    airnet --weights`` (head dropped) to TorchScript."""
    folder = tmp_path_factory.mktemp("airnet_export")
    model = small_model(uncertainty=True)
    release = {(RELEASE_HEAD + k[len("var_conv."):] if k.startswith("var_conv.") else k): v
               for k, v in model.state_dict().items()}
    torch.save({"params": release}, folder / "AirNet_TUR.pth")
    config = [x for k, v in SMALL.items() for x in ("--config", f"{k}={v}")]
    assert deploy_cli.main(["export", "--arch", "airnet", "--weights", str(folder / "AirNet_TUR.pth"), *config,
                            "--format", "torchscript", "--out", str(folder / "airnet.pt"), "--tasks", "3task"]) == 0
    return model, folder


@needs_dcn
def test_torchscript_export_is_scripted_with_the_dcn_op_and_restores_like_eager(released_export):
    model, folder = released_export
    restorer = load_restorer(folder / "airnet.pt")
    meta = restorer.metadata
    assert meta["torchscript_mode"] == "script" and meta["arch"] == "airnet" and meta["size_multiple"] == 1
    assert meta["config"]["features"] == SMALL["features"] and len(meta["tasks"]) == 5  # 3task: three sigmas, rain, haze
    assert "tur::deform_conv2d" in str(torch.jit.load(str(folder / "airnet.pt")).inlined_graph)
    plain = strip_uncertainty(model)
    for h, w in ((1, 1), (9, 14), (33, 20)):
        x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h))
        with torch.no_grad():
            expected = plain(x).clamp(0, 1)
        assert (restorer(x) - expected).abs().max().item() <= 1e-5


@needs_dcn
@needs_runner
def test_runner_and_tur_restore_agree_on_the_torchscript_export(released_export, tmp_path):
    _, folder = released_export
    photos = _photos(tmp_path)
    assert deploy_cli.main(["restore", "--model", str(folder / "airnet.pt"), *map(str, photos.values()),
                            "--out", str(tmp_path / "py")]) == 0
    for name, image in photos.items():
        cpp = run_runner(folder / "airnet.pt", image, tmp_path / f"cpp_{name}")
        py = cv2.imread(str(tmp_path / "py" / name)).astype(np.int64)
        assert py.shape == cpp.shape == cv2.imread(str(image)).shape
        assert np.abs(py - cpp).max() <= 1, name
        assert py.std() > 1  # not a constant image
    # Tiles: AirNet is translation-equivariant only away from tile borders, so compare runner and tur restore with
    # the same tiling, not tiled with whole.
    photo = photos["photo.png"]
    assert deploy_cli.main(["restore", "--model", str(folder / "airnet.pt"), str(photo), "--tile", "32",
                            "--out", str(tmp_path / "py_tiled")]) == 0
    cpp = run_runner(folder / "airnet.pt", photo, tmp_path / "cpp_tiled.png", "--tile", "32")
    assert np.abs(cv2.imread(str(tmp_path / "py_tiled" / "photo.png")).astype(np.int64) - cpp).max() <= 1


@needs_dcn
@needs_runner
def test_aoti_export_restore_and_runner(tmp_path):
    """AOTInductor with the DCN op as an extern kernel: Python and the runner (which links tur_ops) agree."""
    result = export_aoti(small_model(uncertainty=True), tmp_path / "airnet.pt2")
    assert max(result.parity.values()) <= 1e-4
    image = _photos(tmp_path)["photo.png"]
    assert deploy_cli.main(["restore", "--model", str(result.path), str(image), "--out", str(tmp_path / "py")]) == 0
    cpp = run_runner(result.path, image, tmp_path / "cpp.png")
    assert np.abs(cv2.imread(str(tmp_path / "py" / image.name)).astype(np.int64) - cpp).max() <= 1


@needs_dcn
def test_onnx_export_maps_the_op_to_deform_conv_and_onnxruntime_runs_it(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = small_model(uncertainty=True)
    result = export_onnx(model, tmp_path / "airnet.onnx", tasks="3task")
    assert result.metadata["opset"] == 19 and max(result.parity.values()) <= 1e-4
    proto = onnx.load(str(result.path))
    assert sum(n.op_type == "DeformConv" for n in proto.graph.node) == 2  # a DCN per DGM, two DGMs per DGB, one DGB
    net = load_onnx(result.path)
    plain = strip_uncertainty(model)
    for shape in ((1, 3, 1, 1), (3, 3, 17, 9), (1, 3, 40, 61)):
        x = torch.rand(shape, generator=torch.Generator().manual_seed(shape[2]))
        with torch.no_grad():
            assert (net(x) - plain(x)).abs().max().item() <= 1e-4, shape
    with pytest.raises(ValueError, match=r"opset: expected an int >= 19 \(airnet needs it\), got 18"):
        export_onnx(model, tmp_path / "old.onnx", opset=18)
    with pytest.raises(ValueError, match="exporter: airnet exports to ONNX with the 'torchscript' exporter only"):
        export_onnx(model, tmp_path / "dyn.onnx", exporter="dynamo")
    assert not (tmp_path / "old.onnx").exists() and not (tmp_path / "dyn.onnx").exists()
