"""The trainer's optimizer / schedule options the TUR and MiOIR recipes need (Adam, BasicSR's cosine annealing with
restarts) and the per-recipe / per-task metric conventions (crop border, Y channel) the evaluator honours."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from tur_ext import metrics
from tur_ext.train import Trainer, evaluate_checkpoint
from tur_ext.train.config import ConfigError, load_config
from tur_ext.train.evaluate import describe_metric, evaluate, task_metric_settings
from tur_ext.train.schedule import (CosineRestartSchedule, build_optimizer, build_schedule, cosine_restart_factor)


def _lrs_of_torch_warm_restarts(period: int, lr: float, eta_min: float, n: int) -> list[float]:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sch = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=period, eta_min=eta_min)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    return out


def test_cosine_restarts_against_torch_warm_restarts():
    # Inside a cycle BasicSR's CosineAnnealingRestartLR and torch's CosineAnnealingWarmRestarts agree; they differ
    # at the boundaries only: BasicSR ends cycle i at its minimum on step c[i] and restarts one step later.
    lr, m, period = 0.1, 0.05, 5
    ref = _lrs_of_torch_warm_restarts(period, lr, lr * m, 3 * period)
    for s in range(3 * period):
        f = cosine_restart_factor(s, [period] * 3, [1, 1, 1], min_factor=m)
        if s % period or s == 0:
            assert lr * f == pytest.approx(ref[s], rel=1e-12, abs=1e-15), s
        else:
            assert f == pytest.approx(m) and ref[s] == pytest.approx(lr)
    assert cosine_restart_factor(15, [period] * 3, [1, 1, 1], min_factor=m) == pytest.approx(m)  # last cycle's end
    assert cosine_restart_factor(10**6, [period] * 3, [1, 1, 1], min_factor=m) == m  # held after the last cycle


def test_restart_weights_scale_a_cycle_above_the_minimum_and_warmup_ramps():
    m, periods = 0.1, [4, 6, 3]
    full = [cosine_restart_factor(s, periods, [1, 1, 1], m) for s in range(14)]
    half = [cosine_restart_factor(s, periods, [1, 0.5, 0.25], m) for s in range(14)]
    for s in range(14):
        w = 1 if s <= 4 else 0.5 if s <= 10 else 0.25
        assert half[s] - m == pytest.approx(w * (full[s] - m))
    # each cycle decreases monotonically from its restart to its minimum
    assert all(a > b for a, b in zip(full[5:10], full[6:11]))
    # warmup: linear from 0 over the warmup steps, the cycles counting from step 0 meanwhile
    assert [cosine_restart_factor(s, periods, [1, 1, 1], m, warmup_steps=3) for s in range(3)] == [0, 1 / 3, 2 / 3]
    assert cosine_restart_factor(3, periods, [1, 1, 1], m, warmup_steps=3) == full[3]
    with pytest.raises(ValueError, match="step"):
        cosine_restart_factor(-1, periods, [1, 1, 1])


def test_restart_schedule_drives_the_optimizer_and_resumes_with_the_configured_lr():
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p], lr=1e-4)
    sch = CosineRestartSchedule(opt, periods=[3, 3], restart_weights=[1, 1], min_lr_ratio=1e-3)
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        sch.step()
    assert seen == pytest.approx([1e-4 * cosine_restart_factor(s, [3, 3], [1, 1], 1e-3) for s in range(7)])
    opt2 = torch.optim.Adam([p], lr=2e-4)
    sch2 = CosineRestartSchedule(opt2, periods=[3, 3], restart_weights=[1, 1], min_lr_ratio=1e-3)
    sch2.load_state_dict(sch.state_dict())
    assert sch2.step_count == 7 and opt2.param_groups[0]["lr"] == pytest.approx(2e-4 * sch.factor(7))
    with pytest.raises(ValueError, match="one weight per period"):
        CosineRestartSchedule(opt, periods=[3, 3], restart_weights=[1])
    with pytest.raises(ValueError, match="positive integers"):
        CosineRestartSchedule(opt, periods=[3, 0], restart_weights=[1, 1])


def test_build_optimizer_adam_is_l2_adamw_decoupled():
    torch.manual_seed(0)
    w0, g = torch.randn(5), torch.randn(5)
    cfg = {"lr": 1e-2, "betas": [0.9, 0.99], "eps": 1e-8}
    out = {}
    for name in ("adam", "adamw"):
        p = nn.Parameter(w0.clone())
        opt = build_optimizer([{"params": [p], "weight_decay": 0.1}], {"name": name, **cfg})
        assert opt.defaults["betas"] == (0.9, 0.99)
        p.grad = g.clone()
        opt.step()
        out[name] = p.detach().clone()
    ref = {}
    for name, cls in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        p = nn.Parameter(w0.clone())
        o = cls([p], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
        p.grad = g.clone()
        o.step()
        ref[name] = p.detach()
    assert torch.equal(out["adam"], ref["adam"]) and torch.equal(out["adamw"], ref["adamw"])
    assert not torch.allclose(out["adam"], out["adamw"])
    with pytest.raises(ValueError, match="optim.name"):
        build_optimizer([{"params": [nn.Parameter(w0)]}], {"name": "sgd", **cfg})


def _raw(**sections):
    raw = {"tasks": "3task", "model": {"name": "nafnet-tiny"}, "train": {"steps": 10}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v) if isinstance(v, dict) else raw.__setitem__(k, v)
    return raw


def test_config_schedule_and_optimizer_keys():
    cfg = load_config(raw=_raw(optim={"name": "adam", "lr": 1e-4, "betas": [0.9, 0.99]},
                               schedule={"name": "cosine_restarts", "periods": [4, 6], "min_lr": 1e-7}))
    assert cfg["optim"]["name"] == "adam" and cfg["schedule"]["restart_weights"] == [1.0, 1.0]
    assert load_config(raw=_raw())["schedule"]["name"] == "cosine"
    bad = [({"name": "cosine_restarts"}, "schedule.periods"),
           ({"name": "cosine_restarts", "periods": [4, 6], "restart_weights": [1]}, "schedule.restart_weights"),
           ({"name": "cosine_restarts", "periods": [4.5]}, "schedule.periods"),
           ({"name": "cosine_restarts", "periods": [4], "restart_weights": [1.5]}, "schedule.restart_weights"),
           ({"periods": [4]}, "apply to schedule.name 'cosine_restarts' only"),
           ({"name": "step"}, "schedule.name")]
    for sched, msg in bad:
        with pytest.raises(ConfigError, match=msg.replace(".", r"\.")):
            load_config(raw=_raw(schedule=sched))
    # fractional cycle lengths are fine in epochs
    cfg = load_config(raw=_raw(schedule={"name": "cosine_restarts", "unit": "epochs", "periods": [0.5, 1.5]}))
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1e-3)
    sch = build_schedule(opt, cfg["schedule"], lr=1e-3, steps_per_epoch=10, total_steps=20)
    assert isinstance(sch, CosineRestartSchedule) and sch.periods == [5, 15]


def test_task_metric_settings_and_their_errors():
    tasks = "allweather"
    assert task_metric_settings({}, tasks)["snow"] == {"convention": "promptir", "crop_border": 0,
                                                       "test_y_channel": False}
    s = task_metric_settings({"val_convention": "basicsr", "val_y_channel": True,
                              "val_task_metrics": {"raindrop": {"y_channel": False, "crop_border": 4}}}, tasks)
    assert s["snow"] == s["rain_fog"] == {"convention": "basicsr", "crop_border": 0, "test_y_channel": True}
    assert s["raindrop"] == {"convention": "basicsr", "crop_border": 4, "test_y_channel": False}
    assert describe_metric(s["snow"]) == "basicsr Y" and describe_metric(s["raindrop"]) == "basicsr RGB crop 4"
    cases = [({"val_y_channel": True}, "'train.val_convention': the promptir convention"),
             ({"val_convention": "basicsr", "val_task_metrics": {"derain": {}}}, "not among the run's tasks"),
             ({"val_convention": "basicsr", "val_task_metrics": {"snow": {"y": True}}}, "unknown key"),
             ({"val_task_metrics": {"snow": {"convention": "matlab"}}}, "val_task_metrics.snow.convention"),
             ({"val_convention": "basicsr", "val_task_metrics": {"snow": {"crop_border": -1}}}, "crop_border")]
    for train, msg in cases:
        with pytest.raises((ValueError, TypeError), match=msg):
            task_metric_settings(train, tasks)
    with pytest.raises(ConfigError, match="val_task_metrics.snow.crop_border"):
        load_config(raw=_raw(tasks="allweather", train={"val_convention": "basicsr",
                                                        "val_task_metrics": {"snow": {"crop_border": 1.5}}}))


class _Identity(nn.Module):
    size_multiple = 1

    def forward(self, x):
        return x


def test_evaluate_scores_each_task_in_its_own_convention():
    torch.manual_seed(0)
    gt = torch.rand(4, 3, 24, 24)
    lq = (gt + 0.1 * torch.randn_like(gt)).clamp(0, 1)
    loader = [{"lq": lq, "gt": gt, "task_id": torch.tensor([0, 1, 2, 0])}]
    per_task = task_metric_settings({"val_convention": "basicsr", "val_y_channel": True,
                                     "val_task_metrics": {"rain_fog": {"y_channel": False, "crop_border": 4},
                                                          "raindrop": {"convention": "promptir",
                                                                       "y_channel": False}}}, "allweather")
    res = evaluate(_Identity(), loader, "allweather", per_task=per_task)
    for task, rows in (("snow", [0, 3]), ("rain_fog", [1]), ("raindrop", [2])):
        kw = per_task[task]
        want = np.mean([metrics.psnr(lq[i], gt[i], **kw) for i in rows])
        assert res[task]["psnr"] == pytest.approx(want, abs=1e-12) and res[task]["count"] == len(rows)
        assert res[task]["ssim"] == pytest.approx(np.mean([metrics.ssim(lq[i], gt[i], **kw) for i in rows]))
    # the conventions differ in value: Y-channel PSNR is not the RGB one
    assert res["snow"]["psnr"] != pytest.approx(np.mean([metrics.psnr(lq[i], gt[i], "basicsr") for i in (0, 3)]))


def test_trainer_with_adam_restarts_and_checkpoint_eval_keeps_the_run_conventions(tmp_path):
    raw = {"name": "t", "output_dir": str(tmp_path / "run"), "tasks": "3task", "device": "cpu",
           "model": {"name": "nafnet-tiny", "width": 8}, "loss": {"name": "tur"},
           "data": {"type": "embedded", "patch_size": 16, "length": 10, "eval_crop": 32, "eval_crops_per_task": 1,
                    "batch_size": 5, "eval_batch_size": 5},
           "optim": {"name": "adam", "lr": 1e-3, "betas": [0.9, 0.99]},
           "schedule": {"name": "cosine_restarts", "unit": "epochs", "periods": [1, 1], "min_lr": 1e-6},
           "train": {"steps": 3, "log_every": 1, "checkpoint_every": 3, "progress": False, "tensorboard": False,
                     "val_convention": "basicsr", "val_crop_border": 2,
                     "val_task_metrics": {"derain": {"y_channel": True}}}}
    cfg = load_config(raw=raw)
    with Trainer(cfg) as tr:
        assert type(tr.optimizer) is torch.optim.Adam and tr.optimizer.defaults["betas"] == (0.9, 0.99)
        assert isinstance(tr.scheduler, CosineRestartSchedule) and tr.scheduler.periods == [2, 2]
        lrs = []
        for _ in range(3):
            lrs.append(tr.optimizer.param_groups[0]["lr"])
            tr.train(max_steps=1)
    assert lrs == pytest.approx([1e-3 * cosine_restart_factor(s, [2, 2], [1, 1], 1e-3) for s in range(3)])
    res = evaluate_checkpoint(tmp_path / "run", device="cpu")
    assert res["metrics"]["derain"] == {"convention": "basicsr", "crop_border": 2, "test_y_channel": True}
    assert res["metrics"]["dehaze"] == {"convention": "basicsr", "crop_border": 2, "test_y_channel": False}
    assert set(res["tasks"]) == {"denoise_15", "denoise_25", "denoise_50", "derain", "dehaze"}
    assert all(math.isfinite(m["psnr"]) for m in res["tasks"].values())
    promptir = evaluate_checkpoint(tmp_path / "run", device="cpu", convention="promptir")
    assert promptir["metrics"]["derain"] == {"convention": "promptir", "crop_border": 0, "test_y_channel": False}
