"""The trainer on tiny real runs (nafnet-tiny, embedded scikit-image data, 16x16 patches): exact resume, the
non-finite stop, logs and validation, the uw parameters in the optimizer; plus the LR schedule and the EMA."""
import csv
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tur_ext.train.checkpoint import CheckpointManager, load_checkpoint
from tur_ext.train.config import load_config
from tur_ext.train.ema import ModelEMA
from tur_ext.train.schedule import WarmupCosineSchedule, warmup_cosine_factor
from tur_ext.train.trainer import NonFiniteLossError, Trainer

ROOT = Path(__file__).resolve().parents[1]


def tiny(out: Path, *overrides: str) -> dict:
    raw = {
        "name": "tiny", "seed": 0, "output_dir": str(out), "tasks": "3task",
        "model": {"name": "nafnet-tiny", "width": 8},
        "loss": {"name": "tur"},
        # 20 items / batch 5 = 4 steps per epoch, so 6 steps cross an epoch boundary.
        "data": {"type": "embedded", "patch_size": 16, "length": 20, "eval_crop": 16, "eval_crops_per_task": 1,
                 "batch_size": 5, "eval_batch_size": 5},
        "optim": {"lr": 1e-3},
        "schedule": {"warmup": 2},
        "train": {"steps": 6, "log_every": 1, "checkpoint_every": 3, "progress": False, "tensorboard": False,
                  "validate": False, "ema_decay": 0.9},
    }
    return load_config(raw=raw, overrides=list(overrides))


def _train(cfg, max_steps=None):
    with Trainer(cfg) as tr:
        tr.train(max_steps=max_steps)
    return tr


def _assert_same_tree(a, b, path="ckpt"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_same_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("loss", ["tur", "dwa"])
def test_resume_continues_exactly(tmp_path, loss):
    """2N steps in one go == N steps, a fresh process-like restart with resume=auto, N more: bitwise on CPU."""
    extra = ["loss.period=2"] if loss == "dwa" else []
    straight = tiny(tmp_path / "straight", f"loss.name={loss}", *extra)
    _train(straight)
    split = tiny(tmp_path / "split", f"loss.name={loss}", *extra)
    _train(split, max_steps=3)
    assert CheckpointManager(tmp_path / "split" / "checkpoints").latest().name == "step_00000003.pt"
    torch.manual_seed(12345)  # a restarted process would not share the first one's RNG state
    _train(tiny(tmp_path / "split", f"loss.name={loss}", "train.resume=auto", *extra))

    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "step_00000006.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "step_00000006.pt")
    for key in ("params", "params_ema", "optimizer", "scheduler", "ema", "loss", "step", "model", "tasks"):
        _assert_same_tree(a[key], b[key], key)
    if loss == "dwa":
        assert int(a["loss"]["periods_done"]) == 3  # the weights did move during the run

    def rows(p):
        with open(p, newline="") as f:
            return [{k: v for k, v in r.items() if k != "images_per_s"} for r in csv.DictReader(f)]

    ra, rb = rows(tmp_path / "straight" / "log.csv"), rows(tmp_path / "split" / "log.csv")
    assert [r["step"] for r in rb] == ["1", "2", "3", "4", "5", "6"]
    assert ra == rb


def test_non_finite_loss_stops_naming_step_and_task_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    _train(tiny(out, "train.steps=2", "train.checkpoint_every=2"))
    good = out / "checkpoints" / "step_00000002.pt"
    before = good.read_bytes()
    # A learning rate of 1e30 blows the weights up at step 3; the loss of step 4 overflows to inf/nan.
    cfg = tiny(out, "train.steps=8", "train.checkpoint_every=2", "train.resume=auto", "optim.lr=1e30",
               "schedule.warmup=0")
    with Trainer(cfg) as tr:
        with pytest.raises(NonFiniteLossError) as info:
            tr.train()
    msg = str(info.value)
    assert "step 4" in msg
    assert any(t in msg for t in ("denoise_15", "denoise_25", "denoise_50", "derain", "dehaze"))
    assert "step_00000002.pt" in msg  # says which checkpoint is the last good one
    assert [s for s, _ in CheckpointManager(out / "checkpoints").list()] == [2]
    assert good.read_bytes() == before
    ck = load_checkpoint(good)
    assert all(torch.isfinite(v).all() for v in ck["params"].values())


def test_logs_validation_and_summary(tmp_path):
    out = tmp_path / "run"
    cfg = tiny(out, "train.steps=4", "train.validate=true", "train.val_every=2", "train.tensorboard=true",
               "train.log_every=2")
    with Trainer(cfg) as tr:
        summary = tr.train()
    tasks = ["denoise_15", "denoise_25", "denoise_50", "derain", "dehaze"]
    with open(out / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["2", "4"]
    for r in rows:
        assert float(r["images_per_s"]) > 0 and 0 < float(r["lr"]) <= 1e-3
        for t in tasks:
            assert float(r[f"l1/{t}"]) > 0 and float(r[f"uncertainty/{t}"]) > 0
            assert math.isfinite(float(r[f"loss/{t}"]))
    with open(out / "val.csv", newline="") as f:
        val = list(csv.DictReader(f))
    assert [(v["step"], v["task"]) for v in val] == [(s, t) for s in ("2", "4") for t in tasks]
    assert all(5 < float(v["psnr"]) < 60 and -1 < float(v["ssim"]) <= 1 for v in val)
    assert set(summary["metrics"]) == set(tasks) and summary["step"] == 4
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert (out / "metrics.json").is_file() and (out / "summary.json").is_file() and (out / "config.yaml").is_file()


def test_uw_log_variances_are_trained_without_weight_decay(tmp_path):
    cfg = tiny(tmp_path / "run", "loss.name=uw", "train.steps=2", "optim.weight_decay=0.1")
    with Trainer(cfg) as tr:
        assert not tr.uncertainty  # uw does not need the uncertainty head
        start = tr.loss_fn.log_var.detach().clone()
        tr.train()
        groups = tr.optimizer.param_groups
        assert any(g["weight_decay"] == 0.0 and any(p is tr.loss_fn.log_var for p in g["params"]) for g in groups)
        assert not torch.equal(tr.loss_fn.log_var.detach(), start)
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000002.pt")
    assert torch.equal(ck["loss"]["log_var"], tr.loss_fn.log_var.detach())


def test_fresh_start_over_an_existing_run_is_refused(tmp_path):
    _train(tiny(tmp_path / "run", "train.steps=1", "train.checkpoint_every=1"))
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume auto"):
        _train(tiny(tmp_path / "run", "train.steps=2"))


def test_epochs_schedule_units_and_cpu_options(tmp_path):
    cfg = tiny(tmp_path / "run", "train.steps=null", "train.epochs=2", "schedule.unit=epochs", "schedule.warmup=0.5",
               "schedule.cosine_end=3", "train.amp=bf16", "train.channels_last=true", "train.grad_clip=0.5")
    with pytest.warns(UserWarning, match="CUDA only"):
        tr = Trainer(cfg)
    with tr:
        assert tr.steps_per_epoch == 4 and tr.total_steps == 8
        assert tr.scheduler.warmup_steps == 2 and tr.scheduler.cosine_steps == 12
        summary = tr.train(max_steps=2)
    assert summary["step"] == 2


# --- schedule and EMA ------------------------------------------------------------------------------------------------

def test_warmup_cosine_values():
    f = lambda s, **kw: warmup_cosine_factor(s, 10, 110, **kw)
    assert f(0) == 0.0 and f(5) == 0.5 and f(10) == 1.0
    assert f(60) == pytest.approx(0.5)  # halfway down the cosine
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(110) == pytest.approx(0.0) and f(500) == pytest.approx(0.0)
    assert f(60, min_factor=0.1) == pytest.approx(0.55)
    assert warmup_cosine_factor(3, 0, 0) == 1.0


def test_schedule_drives_the_optimizer_and_resumes_with_the_configured_lr():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=0.1)
    sch = WarmupCosineSchedule(opt, warmup_steps=4, cosine_steps=8)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        sch.step()
    assert lrs[:5] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
    assert lrs[6] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    # A resumed run built with another lr continues at the same step with the new base lr.
    opt2 = torch.optim.AdamW([p], lr=0.2)
    sch2 = WarmupCosineSchedule(opt2, warmup_steps=4, cosine_steps=8)
    opt2.load_state_dict(opt.state_dict())
    sch2.load_state_dict(sch.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.2 * warmup_cosine_factor(8, 4, 8))
    assert sch2.step_count == 8


def test_ema_update_formula():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(net, decay=0.9)
    w0 = ema.module[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.fill_(0.7)
    ema.update(net)
    torch.testing.assert_close(ema.module[0].weight, 0.9 * w0 + 0.1 * net[0].weight.detach())
    assert torch.equal(ema.module[1].running_mean, net[1].running_mean)  # buffers copied, not averaged
    assert not any(p.requires_grad for p in ema.module.parameters())
    warm = ModelEMA(net, decay=0.999, warmup=True)
    assert warm.current_decay() == pytest.approx(1 / 10)
    warm.num_updates = 90
    assert warm.current_decay() == pytest.approx(91 / 100)
    with pytest.raises(ValueError, match="ema.decay"):
        ModelEMA(net, decay=1.0)


#: Run under torchrun in place of `python -m tur_ext`: the `tur` command line, with an audit hook (PEP 578) that
#: records every file this rank opens for writing, renames, removes or creates under the run folder (all of the
#: trainer's writes go through Python's open/os.replace: checkpoints, logs, config, JSON). Instrumentation only.
AUDITED_TRAIN = """
import json, os, sys
run_dir, record = os.path.abspath(sys.argv[1]), sys.argv[2]
events = []
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def under_run(path):
    return isinstance(path, (str, os.PathLike)) and os.path.abspath(os.fspath(path)).startswith(run_dir)

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE)
        if writes and under_run(path):
            events.append([event, os.fspath(path)])
    elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.truncate", "shutil.rmtree"):
        if any(under_run(a) for a in args[:2]):
            events.append([event] + [os.fspath(a) for a in args[:2] if isinstance(a, (str, os.PathLike))])

sys.addaudithook(hook)
from tur_ext.cli import main
code = main(sys.argv[3:])
with open(f"{record}.rank{os.environ['RANK']}.json", "w") as f:
    json.dump(events, f)
sys.exit(code)
"""


def _torchrun(tmp_path: Path, cfg: dict, nproc: int = 2, timeout: float = 240) -> dict:
    """Train ``cfg`` with torchrun (CPU, gloo) through AUDITED_TRAIN; returns {rank: the writes it made}."""
    import yaml

    config, wrapper, record = tmp_path / "cfg.yaml", tmp_path / "audited_train.py", tmp_path / "writes"
    config.write_text(yaml.safe_dump(cfg))
    wrapper.write_text(AUDITED_TRAIN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(wrapper), cfg["output_dir"], str(record), "train", str(config)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers: nothing left running
        proc.communicate()
        pytest.fail(f"torchrun training did not finish in {timeout} s")
    assert proc.returncode == 0, err[-3000:]
    import json

    return {r: json.loads(Path(f"{record}.rank{r}.json").read_text()) for r in range(nproc)}


def _one_process_reference_step(cfg: dict, world_size: int = 2):
    """What one step of a ``world_size``-rank run must give, computed in this process: the model's gradients on
    each rank's batch (global batches 0 .. world_size-1 of the same sequence, see TaskBalancedBatchSampler),
    averaged, then one optimizer step. Returns (params before, after, the single-batch gradients, the trainer)."""
    tr = Trainer(cfg)
    params = [p for g in tr.optimizer.param_groups for p in g["params"]]
    before = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
    batches = [b for _, b in zip(range(world_size), tr.loader)]
    grads = []
    tr.model.train()
    tr.loss_fn.train()
    for b in batches:
        tr.optimizer.zero_grad(set_to_none=True)
        pred, unc = tr._forward(b["lq"])
        loss, _ = tr.loss_fn(pred, b["gt"].float(), unc, b["task_id"])
        loss.backward()
        grads.append([p.grad.detach().clone() for p in params])
    for i, p in enumerate(params):
        p.grad = sum(g[i] for g in grads) / world_size
    tr.optimizer.step()
    return before, grads, tr


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["tur", "uw", "dwa"])
def test_two_process_training_with_torchrun_averages_gradients_and_writes_on_rank_zero_only(tmp_path, loss):
    """WORLD_SIZE=2 on CPU (gloo), one step of a global batch of 10 (5 per rank). The weights after the step equal,
    within 1e-4 of the update's size, those of one process that averages the gradients of the two ranks' batches
    and steps once (uw's log-variances and dwa's loss averages are all-reduced as well); the summed or rank 0's
    own gradients would be 0.3 to 1.0 away. Adam's eps is set to 1, far above |grad|, so that the update is
    about lr * grad (with the default eps Adam's first step is lr * sign(grad), blind to a wrong scale).
    Rank 1 makes no write at all under the run folder, rank 0 writes the checkpoint, logs and config."""
    overrides = ["data.batch_size=10", "train.steps=1", "train.checkpoint_every=1", "schedule.warmup=0",
                 "optim.eps=1.0", "optim.lr=0.01", f"loss.name={loss}"]
    extra = ["loss.period=1"] if loss == "dwa" else []
    writes = _torchrun(tmp_path, tiny(tmp_path / "ddp", *overrides, *extra))
    run = tmp_path / "ddp"
    assert writes[1] == [], writes[1]
    written = {Path(e[-1]).relative_to(run).as_posix() for e in writes[0]}
    assert {"log.csv", "config.yaml", "checkpoints/step_00000001.pt"} <= written, sorted(written)
    ck = load_checkpoint(run / "checkpoints" / "step_00000001.pt")
    assert ck["step"] == 1

    # dwa: one period of two calls here accumulates the two batches as the all-reduce does in one call there.
    ref_extra = ["loss.period=2"] if loss == "dwa" else []
    before, grads, tr = _one_process_reference_step(
        tiny(tmp_path / "ref", *overrides, "data.batch_size=5", *ref_extra))
    with tr:
        after = tr.model.state_dict()
        names = [n for n, _ in tr.model.named_parameters()]
        got = torch.cat([(ck["params"][n] - before[n]).flatten() for n in names])
        want = torch.cat([(after[n] - before[n]).flatten() for n in names])
        assert want.norm() > 0
        assert (got - want).norm() <= 1e-4 * want.norm(), ((got - want).norm(), want.norm())
        # The comparison can tell: an update from the summed gradients, or from rank 0's alone, is far off.
        # Adam's first step is exactly -lr * g / (|g| + eps) (bias corrections cancel); for the averaged gradient it
        # gives the reference update, for the summed gradients or rank 0's alone it is far off.
        lr, n_model = tr.optimizer.param_groups[0]["lr"], len(names)

        def first_adam_step(gradients) -> torch.Tensor:
            return torch.cat([(-lr * g / (g.abs() + 1.0)).flatten() for g in gradients[:n_model]])

        mean = [(g0 + g1) / 2 for g0, g1 in zip(*grads)]
        assert (first_adam_step(mean) - want).norm() <= 1e-4 * want.norm()
        for what, wrong in (("summed", [g0 + g1 for g0, g1 in zip(*grads)]), ("rank 0's", grads[0])):
            off = ((first_adam_step(wrong) - want).norm() / want.norm()).item()
            assert off > 0.3, f"the {what} gradients give an update only {off:.3f} away"
        if loss == "uw":
            ref_log_var = tr.loss_fn.log_var.detach()
            assert not torch.equal(ref_log_var, torch.zeros_like(ref_log_var))
            torch.testing.assert_close(ck["loss"]["log_var"], ref_log_var, rtol=0, atol=1e-7)
        if loss == "dwa":
            assert int(ck["loss"]["periods_done"]) == 1
            # rtol: the ranks ran with one thread each, this process with more (convolutions sum in another order).
            torch.testing.assert_close(ck["loss"]["history"], tr.loss_fn.history, rtol=1e-5, atol=0)


@pytest.mark.slow
def test_torch_compile_option_trains_like_eager_and_saves_plain_keys(tmp_path):
    """train.compile=true (inductor on CPU: about a minute to compile) against the same run in eager mode: per-step
    losses within 1e-4 relative, and the weights after 2 steps within 1e-3 of the update's size (inductor fuses
    and reorders float32 sums; Adam's eps is 1 so that the update is about lr * grad, which such rounding moves
    by as little, instead of lr * sign(grad)). Checkpoints hold the uncompiled keys."""
    common = ["train.steps=2", "train.checkpoint_every=2", "optim.eps=1.0", "optim.lr=0.01", "schedule.warmup=0"]
    with Trainer(tiny(tmp_path / "init", *common)) as tr:
        start = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
    for mode in ("eager", "compiled"):
        _train(tiny(tmp_path / mode, *common, f"train.compile={mode == 'compiled'}"))
    ck = load_checkpoint(tmp_path / "compiled" / "checkpoints" / "step_00000002.pt")
    eager = load_checkpoint(tmp_path / "eager" / "checkpoints" / "step_00000002.pt")
    assert not any(k.startswith("_orig_mod") for k in ck["params"])
    assert set(ck["params"]) == set(ck["params_ema"]) == set(eager["params"])
    update = max((eager["params"][k] - start[k]).abs().max().item() for k in start)
    diff = max((ck["params"][k] - eager["params"][k]).abs().max().item() for k in start)
    assert update > 1e-3 and diff <= 1e-3 * update, (diff, update)

    def losses(run):
        with open(tmp_path / run / "log.csv", newline="") as f:
            return [float(r["loss"]) for r in csv.DictReader(f)]

    assert losses("compiled") == pytest.approx(losses("eager"), rel=1e-4) and len(losses("eager")) == 2
