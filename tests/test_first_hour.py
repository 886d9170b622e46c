"""What a researcher reaches for first: training from released weights, scoring a downloaded file, x8
self-ensemble, comma task lists, "did you mean", the version, a readable results table."""
import json

import numpy as np
import pytest
import torch
import yaml

from tur_ext import __version__, models
from tur_ext.models.head import HEAD_NAME
from tur_ext.cli import main
from tur_ext.data import build_eval_dataset
from tur_ext.tasks import TaskSet
from tur_ext.train.config import ConfigError, load_config
from tur_ext.train.evaluate import format_table, restore
from tur_ext.train.trainer import Trainer

TINY = {
    "name": "ft", "tasks": "3task",
    "model": {"name": "nafnet-tiny", "width": 8},
    "loss": {"name": "tur"},
    "data": {"type": "embedded", "patch_size": 16, "length": 10, "eval_crop": 16, "eval_crops_per_task": 1,
             "batch_size": 5, "eval_batch_size": 5},
    "train": {"steps": 2, "log_every": 1, "checkpoint_every": 2, "progress": False, "tensorboard": False},
}


def _backbone_file(tmp_path, name="release.pth", seed=1, layout="basicsr"):
    """A head-less nafnet-tiny (width 8) saved as a release would be: params and params_ema that differ."""
    torch.manual_seed(seed)
    net = models.build("nafnet-tiny", width=8)
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in net.state_dict().items()}
    path = tmp_path / name
    if layout == "basicsr":
        torch.save({"params": net.state_dict(), "params_ema": ema}, path)
    else:  # a Lightning file as the PromptIR release
        torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "epoch": 3}, path)
    return path, net.state_dict(), ema


def _cfg(tmp_path, **model):
    raw = json.loads(json.dumps(TINY))
    raw["model"].update(model)
    raw["output_dir"] = str(tmp_path / "run")
    return load_config(raw=raw)


@pytest.mark.parametrize("key", ["auto", "params"])
def test_pretrained_backbone_gets_a_fresh_head(tmp_path, key):
    path, params, ema = _backbone_file(tmp_path)
    trainer = Trainer(_cfg(tmp_path, pretrained=str(path), pretrained_key=key))
    want = ema if key == "auto" else params  # auto prefers params_ema, as load_weights does
    sd = trainer.model.state_dict()
    for k, v in want.items():
        assert torch.equal(sd[k], v), k
    head = [k for k in sd if k.startswith(HEAD_NAME + ".")]
    assert head and all(torch.isfinite(sd[k]).all() for k in head)
    assert trainer.pretrained.missing_head_keys == tuple(head)
    # The EMA starts from the loaded weights, not from the random initialisation.
    ema_sd = trainer.ema.module.state_dict()
    assert all(torch.equal(ema_sd[k], want[k]) for k in want)
    trainer.close()


def test_pretrained_from_the_command_line_trains_and_says_what_it_loaded(tmp_path, capsys):
    path, _, _ = _backbone_file(tmp_path, layout="lightning")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "finetune"
    assert main(["train", str(cfg), "--pretrained", str(path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"started from {path} (lightning, prefixes net. removed)" in text
    assert "uncertainty head: fresh" in text
    assert (out / "checkpoints" / "step_00000002.pt").is_file()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["pretrained"] == str(path) and saved["output_dir"] == str(out)


def test_pretrained_strict_requires_the_head_and_errors_name_the_key(tmp_path, capsys):
    path, _, _ = _backbone_file(tmp_path)
    with pytest.raises(ValueError, match=r"model.pretrained: .*release.pth.*missing keys"):
        Trainer(_cfg(tmp_path, pretrained=str(path), pretrained_strict=True))
    with pytest.raises(ValueError, match=r"model.pretrained_key: .* no 'params_ema' entry"):
        lightning, _, _ = _backbone_file(tmp_path, "l.ckpt", layout="lightning")
        Trainer(_cfg(tmp_path, pretrained=str(lightning), pretrained_key="params_ema"))
    wider = tmp_path / "w16.pth"
    torch.save(models.build("nafnet-tiny").state_dict(), wider)
    with pytest.raises(ValueError, match=r"model.pretrained: .*w16.pth.*shape mismatches"):
        Trainer(_cfg(tmp_path, pretrained=str(wider)))
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(cfg), "--pretrained", str(tmp_path / "nope.pth")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"tur train: error: --pretrained: no such file {str(tmp_path / 'nope.pth')!r}"
    with pytest.raises(ConfigError, match="model.pretrained_key"):
        _cfg(tmp_path, pretrained=str(path), pretrained_key="ema")


def test_eval_of_a_weights_file_equals_eval_of_its_checkpoint(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run)]) == 0
    ckpt = torch.load(run / "checkpoints" / "step_00000002.pt", weights_only=True)
    weights = tmp_path / "downloaded.pth"
    torch.save({"params_ema": ckpt["params_ema"]}, weights)  # head included: eval drops it
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["eval", str(run), "--out", str(a)]) == 0
    assert main(["eval", "--arch", "nafnet-tiny", "--config", "width=8", "--weights", str(weights),
                 "--data", str(cfg), "--out", str(b)]) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert list(rb["tasks"]) == list(TaskSet("3task"))
    for t, m in ra["tasks"].items():
        assert rb["tasks"][t]["psnr"] == pytest.approx(m["psnr"], abs=1e-9)
        assert rb["tasks"][t]["ssim"] == pytest.approx(m["ssim"], abs=1e-12)
    assert "nafnet-tiny PSNR" in capsys.readouterr().out


def test_eval_of_a_weights_file_on_a_folder_pair_with_comma_tasks(tmp_path):
    import cv2

    rng = np.random.default_rng(0)
    for split in ("test",):
        for sub in ("lq", "gt"):
            (tmp_path / "pairs" / split / sub).mkdir(parents=True)
        for i in range(2):
            gt = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            lq = np.clip(gt.astype(int) + rng.integers(-20, 21, gt.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(str(tmp_path / "pairs" / split / "gt" / f"{i}.png"), gt)
            cv2.imwrite(str(tmp_path / "pairs" / split / "lq" / f"{i}.png"), lq)
    weights, _, _ = _backbone_file(tmp_path)
    out = tmp_path / "r.json"
    argv = ["eval", "--arch", "nafnet-tiny", "--config", "width=8", "--weights", str(weights),
            "--set", "data.type=paired", "--set", f"data.root={tmp_path / 'pairs'}", "--set", "data.task=derain",
            "--tasks", "derain,dehaze", "--out", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert list(res["tasks"]) == ["derain"] and res["tasks"]["derain"]["count"] == 2
    assert main(argv[:-2] + ["--self-ensemble", "--out", str(out)]) == 0
    res8 = json.loads(out.read_text())
    assert res8["self_ensemble"] is True
    assert res8["tasks"]["derain"]["psnr"] != res["tasks"]["derain"]["psnr"]


def test_eval_argument_errors_are_one_line(tmp_path, capsys):
    weights, _, _ = _backbone_file(tmp_path)
    cases = [
        (["eval", "--arch", "nafnet-tiny"], "eval: --arch and --weights go together"),
        (["eval", "--arch", "nafnet-tiny", "--weights", str(tmp_path / "x.pth")], "--weights: no such file"),
        (["eval", "--arch", "nafnet-tiny", "--config", "width=8", "--weights", str(weights)],
         "eval: --arch/--weights need an eval set"),
        (["eval", str(tmp_path), "--tasks", "derain"], "--tasks: only with --arch/--weights"),
    ]
    for argv, msg in cases:
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err, err


class _Model(torch.nn.Module):
    """A fixed convolution: not equivariant to flips/rotations, so the x8 mean differs from one pass."""

    size_multiple = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return x + 0.1 * self.conv(x)


def test_self_ensemble_is_the_mean_of_the_eight_undone_transforms():
    model = _Model().eval()
    lq = torch.rand(2, 3, 13, 21)  # odd, non-square: rotated copies pad to the size multiple the other way round
    got = restore(model, lq, self_ensemble=True)
    # Independently: numpy's rot90/flip on each image, the model on its own padded copy, undone, averaged.
    want = np.zeros(lq.shape, dtype=np.float64)
    for flip in (False, True):
        for k in range(4):
            x = lq.numpy()
            x = x[..., ::-1] if flip else x
            x = np.rot90(x, k, axes=(-2, -1)).copy()
            h, w = x.shape[-2:]
            xp = torch.nn.functional.pad(torch.from_numpy(x), (0, -w % 8, 0, -h % 8), mode="reflect")
            with torch.no_grad():
                y = model(xp)[..., :h, :w].numpy()
            y = np.rot90(y, -k, axes=(-2, -1))
            want += (y[..., ::-1] if flip else y)
    want = np.clip(want / 8, 0, 1)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=2e-6)
    assert (got - restore(model, lq)).abs().max() > 1e-3


def test_comma_task_lists_and_did_you_mean():
    assert list(TaskSet("derain, dehaze")) == ["derain", "dehaze"]
    raw = json.loads(json.dumps(TINY))
    raw["tasks"] = "denoise_25,derain"
    assert load_config(raw=raw)["tasks"] == "denoise_25,derain"
    with pytest.raises(ValueError, match=r"unknown task set '3tsak'; did you mean '3task'\?"):
        TaskSet("3tsak")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['pach_size'\]; did you mean 'pach_size' -> "
                                         r"'patch_size'\?"):
        build_eval_dataset({"type": "embedded", "pach_size": 16}, TaskSet("3task"))
    with pytest.raises(ValueError, match=r"unknown data type 'pared'; did you mean 'paired'\?"):
        build_eval_dataset({"type": "pared"}, TaskSet("3task"))


def test_version_and_report_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"tur_ext {__version__}"
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "a run folder, or a folder of run folders" in capsys.readouterr().out


def test_results_table_columns_never_run_together():
    res = {"quickstart": {"derain": {"psnr": 30.123, "ssim": 0.9}},
           "a-much-longer-run-name": {"derain": {"psnr": 31.0, "ssim": 0.91}}}
    table = format_table(res)
    head, _, row = table.splitlines()[:3]
    assert head.split() == ["task", "quickstart", "PSNR", "quickstart", "SSIM", "a-much-longer-run-name", "PSNR",
                            "a-much-longer-run-name", "SSIM"]
    assert row.split() == ["derain", "30.12", "0.9000", "31.00", "0.9100"]
    assert all(len(line) == len(head) for line in table.splitlines())


def test_tur_logs_the_effective_task_weight():
    from tur_ext.baselines import build_loss

    loss_fn = build_loss("tur", TaskSet("3task"))
    torch.manual_seed(0)
    pred, gt = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    ids = torch.tensor([0, 0, 3, 4])  # denoise_25 and denoise_50 absent
    # One uncertainty value per task: the effective weight of its L1 is then exactly 1 / (u + eps).
    u = torch.tensor([0.5, 0.5, 2.0, 0.25]).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous()
    _, logs = loss_fn(pred, gt, u, ids)
    w = logs["weight"].double()
    assert torch.isnan(w[[1, 2]]).all()
    torch.testing.assert_close(w[[0, 3, 4]], 1 / (torch.tensor([0.5, 2.0, 0.25], dtype=torch.float64) + 1e-6),
                               rtol=1e-5, atol=0)


def test_log_csv_weight_columns_are_filled_for_tur(tmp_path):
    import csv

    with Trainer(_cfg(tmp_path)) as trainer:
        trainer.train()
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert rows and all(float(rows[-1][f"weight/{t}"]) > 0 for t in TaskSet("3task"))


def test_demo_side_by_side_draws_one_progress_bar(tmp_path, capfd):
    sets = ["model.width=8", "data.patch_size=16", "data.length=10", "data.batch_size=5", "data.eval_crop=16",
            "data.eval_crops_per_task=1", "train.tensorboard=false", "train.log_every=1"]
    argv = ["demo", "--out", str(tmp_path / "d"), "--steps", "2", "--jobs", "2", "--no-deploy"]
    assert main(argv + [x for s in sets for x in ("--set", s)]) == 0
    err = capfd.readouterr().err
    assert "demo (tur + l1)" in err
    assert "4/4" in err
    assert "demo-tur:" not in err and "demo-l1:" not in err  # the runs' own bars (desc = run name) stay off
