"""Every recipe in configs/ is valid and trains for a couple of steps on tiny folders generated in the public layouts
(paths, patch, batch and model size overridden with --set, through the CLI)."""
import copy
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from tur_ext.cli import QUICKSTART, main
from tur_ext.train.checkpoint import CheckpointManager, load_checkpoint
from tur_ext.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

TINY_PROMPTIR = ["model.dim=8", "model.num_blocks=[1,1,1,1]", "model.num_refinement_blocks=1",
                 "model.heads=[1,1,1,1]", "model.prompt_dims=[8,16,32]", "model.prompt_sizes=[4,4,4]",
                 "model.prompt_len=2"]
TINY_NAFNET = ["model.width=8", "model.enc_blocks=[1,1]", "model.middle_blocks=1", "model.dec_blocks=[1,1]"]
SHORT = ["train.steps=2", "train.epochs=null", "schedule.unit=steps", "schedule.warmup=1", "schedule.cosine_end=null",
         "train.progress=false", "train.tensorboard=false", "data.num_workers=0", "data.patch_size=16",
         "train.checkpoint_every=2"]


def _img(rng, h=40, w=48):
    """A smooth random colour image (noise upsampled), uint8 BGR for cv2.imwrite."""
    small = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _write(path: Path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img), path


def make_promptir3(root: Path, rng):
    for i in range(2):
        _write(root / "Train" / "Denoise" / f"clean{i}.png", _img(rng))
        gt = _img(rng)
        _write(root / "Train" / "Derain" / "gt" / f"norain-{i}.png", gt)
        _write(root / "Train" / "Derain" / "rainy" / f"rain-{i}.png", np.clip(gt.astype(int) + 40, 0, 255).astype(np.uint8))
        gt = _img(rng)
        _write(root / "Train" / "Dehaze" / "original" / f"000{i}.jpg", gt)
        _write(root / "Train" / "Dehaze" / "synthetic" / f"000{i}_0.8_0.2.jpg", (gt * 0.5 + 100).astype(np.uint8))
    _write(root / "test" / "denoise" / "bsd68" / "t0.png", _img(rng))
    gt = _img(rng)
    _write(root / "test" / "derain" / "Rain100L" / "target" / "1.png", gt)
    _write(root / "test" / "derain" / "Rain100L" / "input" / "1.png", np.clip(gt.astype(int) + 30, 0, 255).astype(np.uint8))
    gt = _img(rng)
    _write(root / "test" / "dehaze" / "target" / "0001.png", gt)
    _write(root / "test" / "dehaze" / "input" / "0001_0.8_0.2.jpg", (gt * 0.6 + 90).astype(np.uint8))


def make_pairs(root: Path, split_names, lq: str, gt: str, rng, nested: bool):
    for split in split_names:
        base = root / split / "SEQ_A" if nested else root / split
        for i in range(2):
            clean = _img(rng)
            _write(base / gt / f"{i:04d}.png", clean)
            _write(base / lq / f"{i:04d}.png", cv2.GaussianBlur(clean, (5, 5), 2) // 2)


def make_clean(root: Path, rng):
    for split in ("train", "test"):
        for i in range(2):
            _write(root / split / f"img{i}.png", _img(rng, 48, 48))


def _run(config: str, out: Path, *overrides: str) -> Path:
    rc = main(["train", str(CONFIGS / config), "--set", f"output_dir={out}", *[x for o in overrides for x in ("--set", o)]])
    assert rc == 0
    ck = CheckpointManager(out / "checkpoints").latest()
    assert ck is not None and ck.name == "step_00000002.pt"
    return ck


def test_every_recipe_is_listed_and_valid():
    # Study configs are not training recipes; tests/test_study.py validates them.
    names = sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("study_"))
    assert names == ["airnet_3task.yaml", "nafnet_7task.yaml", "promptir_3task.yaml", "promptir_3task_finetune.yaml",
                     "promptir_5task.yaml", "quickstart.yaml",
                     "transweather_5task.yaml", "transweather_allweather.yaml", "transweather_real.yaml",
                     "uformer_7task.yaml"]
    for n in names:
        load_config(CONFIGS / n)


def test_promptir_3task_is_the_published_recipe():
    cfg = load_config(CONFIGS / "promptir_3task.yaml")
    assert cfg["model"]["name"] == "promptir" and cfg["tasks"] == "3task" and cfg["loss"]["name"] == "tur"
    assert cfg["data"]["patch_size"] == 128 and cfg["data"]["batch_size"] == 32
    assert cfg["optim"]["name"] == "adamw" and cfg["optim"]["lr"] == 2e-4
    assert cfg["schedule"] == {"name": "cosine", "unit": "epochs", "warmup": 15, "cosine_end": 150, "min_lr": 0.0,
                               "periods": None, "restart_weights": None, "milestones": None, "factors": None}
    assert cfg["train"]["epochs"] == 120 and cfg["train"]["steps"] is None


def test_quickstart_yaml_matches_the_demo_config():
    from_file = load_config(CONFIGS / "quickstart.yaml")
    built_in = load_config(raw=copy.deepcopy(QUICKSTART))
    assert from_file == built_in


def test_quickstart_runs(tmp_path):
    ck = _run("quickstart.yaml", tmp_path / "q", *SHORT, *TINY_NAFNET, "data.batch_size=5", "data.length=10",
              "data.eval_crop=16", "data.eval_crops_per_task=1")
    assert load_checkpoint(ck)["model"]["config"]["uncertainty"] is True


def test_promptir_3task_runs_on_the_promptir_layout(tmp_path):
    rng = np.random.default_rng(0)
    make_promptir3(tmp_path / "data", rng)
    ck = _run("promptir_3task.yaml", tmp_path / "p3", *SHORT, *TINY_PROMPTIR, f"data.root={tmp_path / 'data'}",
              "data.batch_size=5")
    metrics = yaml.safe_load((tmp_path / "p3" / "metrics.json").read_text())["tasks"]
    assert set(metrics) == {"denoise_15", "denoise_25", "denoise_50", "derain", "dehaze"}
    assert load_checkpoint(ck)["model"]["name"] == "promptir"


def test_promptir_3task_finetune_starts_from_a_lightning_release(tmp_path, capsys):
    import torch

    from tur_ext import models

    cfg = load_config(CONFIGS / "promptir_3task_finetune.yaml")
    base = load_config(CONFIGS / "promptir_3task.yaml")
    assert cfg["model"]["pretrained"] and cfg["optim"]["lr"] == base["optim"]["lr"] / 10
    assert {k: cfg["data"][k] for k in base["data"]} == base["data"] and cfg["train"]["epochs"] == 20
    rng = np.random.default_rng(0)
    make_promptir3(tmp_path / "data", rng)
    tiny = {s.split("=")[0][len("model."):]: yaml.safe_load(s.split("=")[1]) for s in TINY_PROMPTIR}
    release = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"net." + k: v for k, v in models.build("promptir", **tiny).state_dict().items()}},
               release)
    _run("promptir_3task_finetune.yaml", tmp_path / "ft", *SHORT, *TINY_PROMPTIR, f"data.root={tmp_path / 'data'}",
         "data.batch_size=5", f"model.pretrained={release}")
    assert f"started from {release} (lightning, prefixes net. removed)" in capsys.readouterr().out


def test_promptir_5task_runs_on_promptir_gopro_and_lol_layouts(tmp_path):
    rng = np.random.default_rng(1)
    make_promptir3(tmp_path / "p3", rng)
    make_pairs(tmp_path / "gopro", ("train", "test"), "blur", "sharp", rng, nested=True)
    make_pairs(tmp_path / "lol", ("our485", "eval15"), "low", "high", rng, nested=False)
    _run("promptir_5task.yaml", tmp_path / "p5", *SHORT, *TINY_PROMPTIR, "data.batch_size=7",
         f"data.datasets.0.root={tmp_path / 'p3'}", f"data.datasets.1.root={tmp_path / 'gopro'}",
         f"data.datasets.2.root={tmp_path / 'lol'}")
    metrics = yaml.safe_load((tmp_path / "p5" / "metrics.json").read_text())["tasks"]
    assert {"deblur", "lowlight", "derain"} <= set(metrics)


def test_nafnet_7task_runs_on_clean_images(tmp_path):
    make_clean(tmp_path / "df2k", np.random.default_rng(2))
    with pytest.warns(UserWarning, match="CUDA only"):  # the recipe asks for bf16 autocast, a GPU setting
            _run("nafnet_7task.yaml", tmp_path / "n7", *SHORT, *TINY_NAFNET, f"data.root={tmp_path / 'df2k'}",
             "data.batch_size=7", "data.eval_crop=32")
    metrics = yaml.safe_load((tmp_path / "n7" / "metrics.json").read_text())["tasks"]
    assert set(metrics) == {"blur", "noise", "jpeg", "rain", "haze", "dark", "sr"}


def test_unreadable_image_stops_the_run_or_is_skipped_and_counted(tmp_path, capsys):
    rng = np.random.default_rng(3)
    make_promptir3(tmp_path / "data", rng)
    bad = tmp_path / "data" / "Train" / "Denoise" / "broken.png"
    bad.write_bytes(b"not a png at all")
    common = [*SHORT, *TINY_PROMPTIR, f"data.root={tmp_path / 'data'}", "data.batch_size=5"]
    rc = main(["train", str(CONFIGS / "promptir_3task.yaml"), *[x for o in [*common, f"output_dir={tmp_path / 'a'}"]
                                                                 for x in ("--set", o)]])
    assert rc == 1 and "broken.png" in capsys.readouterr().err
    _run("promptir_3task.yaml", tmp_path / "b", *common, "data.skip_bad_images=true")
    assert "1 unreadable image(s) skipped" in capsys.readouterr().out
    summary = yaml.safe_load((tmp_path / "b" / "summary.json").read_text())
    assert [Path(p).name for p in summary["bad_images"]] == ["broken.png"]
