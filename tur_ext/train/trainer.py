"""The training loop: one config in, a run folder out (checkpoints, CSV/TensorBoard logs, per-task validation).

Run folder layout::

    <output_dir>/config.yaml            the validated config of the run
    <output_dir>/checkpoints/step_*.pt  the last ``train.keep_last`` checkpoints (see checkpoint.py)
    <output_dir>/log.csv                training log: lr, images/s, and per task: loss, plain L1, mean uncertainty, weight
    <output_dir>/val.csv                per-task PSNR/SSIM of the EMA model at each validation
    <output_dir>/metrics.json           the last validation, {task: {"psnr", "ssim", "count"}}
    <output_dir>/tb/                    TensorBoard events

Multi-GPU: launched by ``torchrun``, each process trains on ``data.batch_size / WORLD_SIZE`` samples per step
(DistributedDataParallel), in ``train.accumulate`` micro-batches; only rank 0 logs, validates and writes checkpoints.
``loss.sync: global`` takes the loss's per-task statistics over the global batch (tur_ext.distributed_loss), so
that a recipe's total batch gives the same objective on any number of processes.
"""
from __future__ import annotations

import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn

from ..baselines import build_loss
from ..models.value_range import from_model_range, model_ranges, to_model_range
from ..tasks import TaskSet
from . import distributed as D
from .checkpoint import CheckpointManager, find_checkpoint, load_checkpoint, model_spec, rng_state, set_rng_state
from .config import dump_config
from .ema import ModelEMA
from .evaluate import evaluate, task_metric_settings, write_json
from .logs import VAL_COLUMNS, CSVLog, TensorBoardLog, train_columns
from .schedule import build_optimizer, build_schedule

#: data-section keys the trainer reads itself; the rest of ``data:`` goes to the dataset builders.
TRAINER_DATA_KEYS = ("batch_size", "num_workers", "eval_batch_size")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the step and the task(s). No checkpoint was written for it."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} was asked for but CUDA is not available")
    return dev


def dataset_config(cfg: dict) -> dict:
    """The ``data:`` section minus the keys the trainer keeps, with the run seed as the default data seed."""
    data = {k: v for k, v in cfg["data"].items() if k not in TRAINER_DATA_KEYS}
    data.setdefault("seed", cfg["seed"])
    return data


def model_uncertainty(cfg: dict) -> bool:
    unc = cfg["model"]["uncertainty"]
    if unc == "auto":
        from ..baselines import LOSSES

        return bool(LOSSES[cfg["loss"]["name"]].needs_uncertainty)
    return bool(unc)


#: model-section keys the trainer reads itself; the rest of ``model:`` goes to ``tur_ext.models.build``.
TRAINER_MODEL_KEYS = ("name", "uncertainty", "pretrained", "pretrained_strict", "pretrained_key")


def model_kwargs(cfg: dict) -> dict:
    return {k: v for k, v in cfg["model"].items() if k not in TRAINER_MODEL_KEYS}


def load_pretrained(model: nn.Module, m: dict):
    """Load ``model.pretrained`` into ``model`` (``model.pretrained_key``, ``model.pretrained_strict``): the
    :class:`~tur_ext.models.LoadReport`. Without ``pretrained_strict`` a file without an uncertainty head leaves the
    model's head freshly initialised, and a file's head is dropped when the model has none."""
    from ..models import load_weights

    path = m["pretrained"]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.pretrained: no such file {path!r}")
    source: Any = path
    if m["pretrained_key"] != "auto":
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or not isinstance(payload.get(m["pretrained_key"]), dict):
            keys = ", ".join(map(repr, list(payload)[:8])) if isinstance(payload, dict) else type(payload).__name__
            raise ValueError(f"model.pretrained_key: {path!r} has no {m['pretrained_key']!r} entry (top-level keys: "
                             f"{keys})")
        source = {m["pretrained_key"]: payload[m["pretrained_key"]]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fresh head is said in the trainer's own report line
            report = load_weights(model, source, strict_head=m["pretrained_strict"])
    except ValueError as e:
        raise ValueError(f"model.pretrained: {path}: {e}" if source is not path else f"model.pretrained: {e}") from None
    return report._replace(source=path)


def describe_pretrained(report) -> str:
    """One log line saying what :func:`load_pretrained` loaded."""
    head = ("; uncertainty head: fresh (the file has none)" if report.missing_head_keys else
            "; the file's uncertainty head dropped (the model has none)" if report.dropped_head_keys else "")
    prefixes = f", prefixes {'+'.join(report.prefixes_stripped)} removed" if report.prefixes_stripped else ""
    return f"started from {report.source} ({report.format}{prefixes}): {report.num_loaded} tensors{head}"


def uses_moco(model: nn.Module) -> bool:
    """Whether ``model`` trains its encoder contrastively (AirNet with ``encoder="moco"``)."""
    return getattr(model, "encoder_mode", None) == "moco"


def key_view(lq: torch.Tensor, fraction: float) -> torch.Tensor:
    """The MoCo key of each training patch: a random crop of ``fraction`` of its sides (global torch RNG).

    AirNet's loader cuts two patches from each degraded image, the query and the key; the data pipeline here gives
    one patch per image, so the key is another, overlapping crop of the same degraded patch (same degradation,
    shifted content). The encoder pools globally, so the key may be smaller than the query.
    """
    b, _, h, w = lq.shape
    kh, kw = max(1, round(h * fraction)), max(1, round(w * fraction))
    ys = torch.randint(0, h - kh + 1, (b,)).tolist()
    xs = torch.randint(0, w - kw + 1, (b,)).tolist()
    return torch.stack([lq[i, :, y:y + kh, x:x + kw] for i, (y, x) in enumerate(zip(ys, xs))])


class Trainer:
    """Builds everything a run needs from a validated config (see :mod:`tur_ext.train.config`)."""

    def __init__(self, cfg: dict, *, progress_position: Optional[int] = None):
        """``progress_position``: the tqdm line of this run (several runs printing side by side)."""
        from .. import data as tdata
        from .. import models

        self.cfg = cfg
        t = cfg["train"]
        self.device = resolve_device(cfg["device"])
        self.dist = D.init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if t["threads"] is not None:
            torch.set_num_threads(t["threads"])
        self.run_dir = Path(cfg["output_dir"])
        self.tasks = TaskSet(cfg["tasks"])
        # Every RNG the checkpoints store is seeded (as BasicSR does), so user transforms drawing from numpy's or
        # Python's global generators are reproducible too.
        torch.manual_seed(cfg["seed"])
        np.random.seed(cfg["seed"] % 2 ** 32)
        random.seed(cfg["seed"])

        # --- data
        bs = cfg["data"]["batch_size"]
        if bs % self.dist.world_size:
            raise ValueError(f"data.batch_size: the total batch {bs} must divide by WORLD_SIZE={self.dist.world_size}")
        self.batch_per_rank = bs // self.dist.world_size
        self.accumulate = t["accumulate"]
        if self.batch_per_rank % self.accumulate:
            raise ValueError(f"train.accumulate: the per-process batch {self.batch_per_rank} (data.batch_size {bs} / "
                             f"{self.dist.world_size} processes) must divide by train.accumulate={self.accumulate}")
        if self.batch_per_rank < len(self.tasks):
            warnings.warn(f"data.batch_size: {self.batch_per_rank} samples per process cannot hold all "
                          f"{len(self.tasks)} tasks in every batch")
        dcfg = dataset_config(cfg)
        self.train_set = tdata.build_train_dataset(dcfg, self.tasks)
        self.loader = tdata.build_train_loader(
            self.train_set, self.batch_per_rank, seed=cfg["seed"], num_workers=cfg["data"]["num_workers"],
            rank=self.dist.rank, world_size=self.dist.world_size, pin_memory=self.device.type == "cuda")
        self.loader.batch_sampler.set_epoch(0)
        self.steps_per_epoch = max(1, len(self.loader))
        self.total_steps = t["steps"] if t["steps"] is not None else max(1, math.ceil(t["epochs"] * self.steps_per_epoch))
        self.eval_loader = None
        if t["validate"]:
            self.eval_set = tdata.build_eval_dataset(dcfg, self.tasks)
            self.eval_loader = tdata.build_eval_loader(self.eval_set, cfg["data"]["eval_batch_size"])

        # --- model, loss, optimizer
        self.uncertainty = model_uncertainty(cfg)
        self.model = models.build(cfg["model"]["name"], uncertainty=self.uncertainty, **model_kwargs(cfg))
        self.pretrained = load_pretrained(self.model, cfg["model"]) if cfg["model"]["pretrained"] else None
        self.model.to(self.device)
        self.moco = uses_moco(self.model)
        if self.moco:
            queue = int(self.model.E.E.K)
            micro = self.batch_per_rank // self.accumulate  # each forward enqueues one micro-batch of keys
            if queue % micro:
                raise ValueError(f"model.queue_size: the MoCo queue width {queue} must be a multiple of the batch "
                                 f"per forward {micro} (data.batch_size per process / train.accumulate)")
        self.encoder_pretrain_steps = int(round(t["encoder_pretrain"] * (
            self.steps_per_epoch if cfg["schedule"]["unit"] == "epochs" else 1)))
        if self.encoder_pretrain_steps and not self.moco:
            raise ValueError("train.encoder_pretrain: only a model with a contrastive encoder (airnet with "
                             "model.encoder=moco) has an encoder stage")
        loss_cfg = {k: v for k, v in cfg["loss"].items() if k != "name"}
        if self.dist.enabled:  # loss.sync=global: statistics over the global batch of all processes
            loss_cfg["process_group"] = torch.distributed.group.WORLD
        if cfg["loss"]["name"] == "dwa":
            loss_cfg.setdefault("period", self.steps_per_epoch)  # DWA averages over epochs
        self.loss_fn = build_loss(cfg["loss"]["name"], self.tasks, **loss_cfg).to(self.device)
        if cfg["loss"]["name"] == "tur":
            self.loss_fn.inner.check_finite = False  # the trainer checks, naming the step as well as the task
        if self.loss_fn.needs_uncertainty and not self.uncertainty:
            raise ValueError(f"model.uncertainty: the {cfg['loss']['name']!r} loss needs the uncertainty head")
        if t["channels_last"]:
            self.model.to(memory_format=torch.channels_last)
        self.ema = ModelEMA(self.model, t["ema_decay"], warmup=t["ema_warmup"])

        o = cfg["optim"]
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "weight_decay": o["weight_decay"]}]
        self.loss_params = loss_params = [p for p in self.loss_fn.parameters() if p.requires_grad]
        if loss_params:  # uw's log-variances: no weight decay, which would pull them towards sigma = 1
            groups.append({"params": loss_params, "weight_decay": 0.0, "lr": o["loss_lr"] or o["lr"]})
        self.optimizer = build_optimizer(groups, o)
        self.scheduler = build_schedule(self.optimizer, cfg["schedule"], lr=o["lr"],
                                        steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps)

        # --- precision and compilation
        self.amp_dtype = None
        if t["amp"] != "none":
            if self.device.type == "cuda":
                self.amp_dtype = torch.bfloat16 if t["amp"] == "bf16" else torch.float16
            else:
                warnings.warn(f"train.amp={t['amp']!r} applies on CUDA only; training in float32 on {self.device}")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DDP(self.model, device_ids=ids)
        self._ddp = self.train_model if self.dist.enabled else None
        if t["compile"]:
            self.train_model = torch.compile(self.train_model)

        self.step = 0
        self.ckpts = CheckpointManager(self.run_dir / "checkpoints", t["keep_last"])
        self.last_checkpoint: Optional[Path] = None
        self.last_metrics: Optional[dict] = None
        self.last_val_step: Optional[int] = None
        self._started = False
        self.progress_position = progress_position

    # ------------------------------------------------------------------------------------------------ state
    def state(self) -> dict:
        """Everything a checkpoint holds (see checkpoint.py), for the current step."""
        return {
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "model": model_spec(self.model, self.uncertainty),
            "params": self.model.state_dict(),
            "params_ema": self.ema.module.state_dict(),
            "tasks": list(self.tasks),
            "config": self.cfg,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "rng": rng_state(),
        }

    def load_state(self, ckpt: dict) -> None:
        spec = model_spec(self.model, self.uncertainty)
        if ckpt["model"] != spec:
            raise ValueError(f"resume: the checkpoint's model {ckpt['model']} differs from this run's {spec}")
        if list(ckpt["tasks"]) != list(self.tasks):
            raise ValueError(f"resume: the checkpoint's tasks {ckpt['tasks']} differ from this run's {list(self.tasks)}")
        self.model.load_state_dict(ckpt["params"])
        self.ema.module.load_state_dict(ckpt["params_ema"])
        self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])  # after the optimizer: re-applies this config's lr
        self.scaler.load_state_dict(ckpt["scaler"])
        self.loss_fn.load_state_dict(ckpt["loss"])
        set_rng_state(ckpt["rng"])
        self.step = int(ckpt["step"])

    def resume(self, what: Optional[str]) -> Optional[Path]:
        """``None``: fresh start; ``"auto"``: the newest checkpoint of this run folder if any; else a path."""
        if what is None:
            return None
        if what == "auto":
            if self.dist.is_main:
                for p in self.ckpts.remove_stale_temps():
                    print(f"[tur] removed {p.name}, left by a write that was killed", flush=True)
            # A damaged newest checkpoint (a crash mid-copy, a full disk) falls back to the one before it.
            found = self.ckpts.latest_loadable(log=lambda m: print(m, flush=True), map_location=self.device)
            if found is None:
                return None
            path, ckpt = found
        else:
            path = find_checkpoint(what)
            ckpt = load_checkpoint(path, map_location=self.device)
        self.load_state(ckpt)
        return path

    def save_checkpoint(self) -> Optional[Path]:
        if self.dist.is_main:
            self.last_checkpoint = self.ckpts.save(self.step, self.state())
        D.barrier(self.dist)
        return self.last_checkpoint

    # ------------------------------------------------------------------------------------------------ steps
    def _forward(self, lq: torch.Tensor, key: Optional[torch.Tensor] = None):
        # Batches are in [0, 1]: the model sees its own input range, the loss compares in [0, 1].
        input_range, output_range = model_ranges(self.model)
        ctx = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()
        with ctx:
            if key is None:
                out = self.train_model(to_model_range(lq, input_range))
            else:
                out = self.train_model(to_model_range(lq, input_range), x_key=to_model_range(key, input_range))
        if self.uncertainty:
            pred, unc = out
            return from_model_range(pred.float(), output_range), unc.float()
        return from_model_range(out.float(), output_range), None

    def _check_finite(self, loss: torch.Tensor, logs: dict, step: int) -> None:
        finite = torch.isfinite(loss.detach())
        if self.dist.enabled:
            # Every rank must stop together: one leaving alone would hang the others in the gradient all-reduce.
            flag = (~finite).to(torch.int32).reshape(1)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            finite = flag[0] == 0
        if bool(finite):
            return
        present = logs["count"] > 0
        bad = [self.tasks[k] for k in range(len(self.tasks))
               if bool(present[k]) and not (math.isfinite(float(logs["loss"][k])) and math.isfinite(float(logs["l1"][k])))]
        if bad:
            where = ", ".join(bad)
        elif bool(torch.isfinite(loss.detach())):
            where = f"in another process's batch (this is rank {self.dist.rank})"
        else:
            where = "none alone (the total is not finite)"
        kept = f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
        raise NonFiniteLossError(f"non-finite loss ({float(loss.detach())}) at step {step}, task(s): {where}. "
                                 f"Stopping without saving{kept}.")

    def _add_contrastive(self, loss: torch.Tensor, logs: dict) -> torch.Tensor:
        """AirNet's objective: the contrastive loss alone during the encoder stage, then the restoration loss plus
        ``contrastive_weight`` times it. In the encoder stage the restoration loss is kept at weight 0, so that the
        restorer gets zero gradients (nothing moves it under Adam without weight decay) and DDP sees every parameter
        used."""
        contrastive = self.model.pop_contrastive()
        if contrastive is None:
            raise RuntimeError("model: the moco encoder produced no contrastive logits in a training forward")
        logits, labels = contrastive
        ce = nn.functional.cross_entropy(logits.float(), labels)
        logs["contrastive"] = ce.detach()
        if self.step < self.encoder_pretrain_steps:
            return loss * 0.0 + ce
        return loss + self.cfg["train"]["contrastive_weight"] * ce

    def train_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        nb = self.device.type == "cuda"
        lq = batch["lq"].to(self.device, non_blocking=nb)
        gt = batch["gt"].to(self.device, non_blocking=nb)
        ids = batch["task_id"].to(self.device, non_blocking=nb)
        if self.cfg["train"]["channels_last"]:
            lq = lq.contiguous(memory_format=torch.channels_last)
        self.model.train()
        self.loss_fn.train()
        self.optimizer.zero_grad(set_to_none=True)
        a = self.accumulate
        parts = []
        for i, (lq_i, gt_i, ids_i) in enumerate(zip(lq.chunk(a), gt.chunk(a), ids.chunk(a))):
            # DDP all-reduces the gradients in the last micro-batch's backward only.
            quiet = self._ddp.no_sync() if self._ddp is not None and i < a - 1 else nullcontext()
            with quiet:
                key = key_view(lq_i, self.cfg["train"]["key_crop"]) if self.moco else None
                pred, unc = self._forward(lq_i, key)
                loss, logs = self.loss_fn(pred, gt_i.float(), unc, ids_i)
                if self.moco:
                    loss = self._add_contrastive(loss, logs)
                self._check_finite(loss, logs, self.step + 1)
                self.scaler.scale(loss if a == 1 else loss / a).backward()
            parts.append((loss.detach(), logs))
        loss, logs = parts[0] if a == 1 else merge_micro_batches(parts)
        if self.dist.enabled and self.loss_params:
            # DDP averages the model's gradients only; the loss's own parameters (uw) are averaged here.
            for p in self.loss_params:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.dist.world_size
        clip = self.cfg["train"]["grad_clip"]
        if clip is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the lr of this update (logged)
        self.scheduler.step()
        self.ema.update(self.model)
        self.step += 1
        return loss.detach(), logs

    # ------------------------------------------------------------------------------------------------ validation
    def validate(self) -> dict:
        """Per-task PSNR/SSIM of the EMA model on the eval set (rank 0); logged and written to metrics.json."""
        metrics: dict = {}
        if self.dist.is_main and self.eval_loader is not None:
            metrics = evaluate(self.ema.module, self.eval_loader, self.tasks, device=self.device,
                               per_task=task_metric_settings(self.cfg["train"], self.tasks), amp_dtype=self.amp_dtype)
            # Rows of this step are from an earlier attempt (a finished run re-run with --resume auto): replace them.
            self.val_log.truncate_after(self.step - 1)
            for task, m in metrics.items():
                self.val_log.write({"step": self.step, "task": task, **m})
            self.tb.scalars({f"val_psnr/{k}": m["psnr"] for k, m in metrics.items()}, self.step)
            self.tb.scalars({f"val_ssim/{k}": m["ssim"] for k, m in metrics.items()}, self.step)
            write_json(self.run_dir / "metrics.json", {"step": self.step, "tasks": metrics})
            self.last_metrics = metrics
        self.last_val_step = self.step
        D.barrier(self.dist)
        return metrics

    # ------------------------------------------------------------------------------------------------ loop
    def _open_logs(self, resumed: bool) -> None:
        main = self.dist.is_main
        self.train_log = CSVLog(self.run_dir / "log.csv", train_columns(self.tasks, contrastive=self.moco)) \
            if main else None
        self.val_log = CSVLog(self.run_dir / "val.csv", VAL_COLUMNS) if main else None
        if main:
            if resumed:
                self.train_log.truncate_after(self.step)
                self.val_log.truncate_after(self.step)
            else:
                self.train_log.truncate_after(-1)
                self.val_log.truncate_after(-1)
        self.tb = TensorBoardLog(self.run_dir / "tb", main and self.cfg["train"]["tensorboard"],
                                 purge_step=self.step if resumed else None)

    def _start(self) -> None:
        """Resume (train.resume), write config.yaml, open the logs: once per Trainer."""
        resumed_from = self.resume(self.cfg["train"]["resume"])
        if resumed_from is None and self.ckpts.list():
            raise ValueError(f"output_dir: {str(self.run_dir)!r} already holds checkpoints of a run; continue it with "
                             "--resume auto, or start elsewhere (--set output_dir=...)")
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.run_dir / "config.yaml")
        self._open_logs(resumed_from is not None)
        if self.dist.is_main:
            from ..data import dataset_summary

            # skip_bad_images: the unreadable files were dropped at build time; the count goes into the log.
            print(f"[tur] train data: {dataset_summary(self.train_set)}", flush=True)
            if self.eval_loader is not None:
                print(f"[tur] eval data: {dataset_summary(self.eval_set)}", flush=True)
        if self.dist.is_main:
            print(f"[tur] batch: {describe_batch(self.cfg, self.dist.world_size)}", flush=True)
        if resumed_from is None and self.pretrained is not None and self.dist.is_main:
            print(f"[tur] model: {describe_pretrained(self.pretrained)}", flush=True)
        if resumed_from is not None:
            self.last_checkpoint = resumed_from
            if self.dist.is_main:
                print(f"[tur] resumed from {resumed_from} at step {self.step}", flush=True)
        self._started = True

    def train(self, max_steps: Optional[int] = None) -> dict:
        """Train to ``train.steps``/``train.epochs`` (or stop after ``max_steps`` more steps); returns a summary."""
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)
                                      or max_steps < 1):
            raise ValueError(f"max_steps (--max-steps): expected a positive number of steps, got {max_steps!r}")
        t = self.cfg["train"]
        main = self.dist.is_main
        if not self._started:
            self._start()
        end = self.total_steps if max_steps is None else min(self.total_steps, self.step + max_steps)
        bar = None
        if main and t["progress"]:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=self.cfg["name"], dynamic_ncols=True,
                       position=self.progress_position)
        acc = _LogAccumulator(len(self.tasks))
        t_last, n_last = time.perf_counter(), 0
        started = time.perf_counter()
        try:
            while self.step < end:
                epoch, start_batch = divmod(self.step, self.steps_per_epoch)
                self.loader.batch_sampler.set_epoch(epoch, start_batch=start_batch)
                step_before = self.step
                for batch in self.loader:
                    loss, logs = self.train_step(batch)
                    acc.add(loss, logs)
                    n_last += batch["lq"].shape[0] * self.dist.world_size
                    if bar is not None:
                        bar.update(1)
                    if main and (self.step % t["log_every"] == 0 or self.step == end):
                        now = time.perf_counter()
                        row = acc.row(self.tasks, step=self.step, epoch=self.step / self.steps_per_epoch,
                                      lr=self.last_lr, ips=n_last / max(now - t_last, 1e-9))
                        self.train_log.write(row)
                        self.tb.scalars({k: v for k, v in row.items() if k not in ("step",)}, self.step)
                        if bar is not None:
                            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
                        acc = _LogAccumulator(len(self.tasks))
                        t_last, n_last = now, 0
                    paused = time.perf_counter()
                    if t["val_every"] is not None and self.step % t["val_every"] == 0 and self.step < end:
                        self.validate()
                    if self.step % t["checkpoint_every"] == 0 or self.step == end:
                        self.save_checkpoint()
                    t_last += time.perf_counter() - paused  # images/s counts training time only
                    if self.step >= end:
                        break
                if self.step == step_before:
                    raise RuntimeError(f"data: epoch {epoch} gave no batch (from batch {start_batch}); "
                                       "is the training set smaller than one batch?")
            if self.step >= self.total_steps and self.last_val_step != self.step:
                self.validate()
        finally:
            if bar is not None:
                bar.close()
            self.tb.flush()
        summary = {"step": self.step, "total_steps": self.total_steps, "seconds": time.perf_counter() - started,
                   "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                   "metrics": self.last_metrics, "bad_images": self.train_set.bad_images}
        if main:
            write_json(self.run_dir / "summary.json", summary)
        return summary

    def close(self) -> None:
        """Close the TensorBoard writer and the process group."""
        if self._started:
            self.tb.close()
        D.cleanup(self.dist)

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def describe_batch(cfg: dict, world_size: int) -> str:
    """One log line: how the total batch is split over processes and micro-batches, and where the loss's
    per-task statistics are taken."""
    bs, a = cfg["data"]["batch_size"], cfg["train"]["accumulate"]
    per_rank = bs // world_size
    sync = cfg["loss"]["sync"] if world_size > 1 else "local"
    group = (f"the global micro-batch of {per_rank // a * world_size}" if sync == "global"
             else f"each process's micro-batch of {per_rank // a}")
    return (f"total {bs} = {world_size} process(es) x {per_rank}, in {a} micro-batch(es) of {per_rank // a} "
            f"(gradient accumulation: {'on' if a > 1 else 'off'}); loss.sync={cfg['loss']['sync']}: per-task "
            f"statistics over {group}")


def merge_micro_batches(parts: list) -> tuple[torch.Tensor, dict]:
    """(loss, logs) of one step from those of its micro-batches: the mean loss, summed counts and count-weighted
    per-task values (a per-step value such as uw's weight, where no micro-batch holds the task: the last one's)."""
    loss = torch.stack([p[0] for p in parts]).mean()
    counts = torch.stack([p[1]["count"].double() for p in parts])  # (a, K)
    total = counts.sum(0)
    logs = {"count": total.to(parts[0][1]["count"].dtype)}
    for key, last in parts[-1][1].items():
        if key == "count":
            continue
        v = torch.stack([p[1][key].double() for p in parts])
        if v.dim() == 1:  # a per-micro-batch scalar (AirNet's contrastive loss)
            logs[key] = v.mean().to(last.dtype)
            continue
        mean = torch.where(counts > 0, v, torch.zeros_like(v)).mul(counts).sum(0) / total.clamp_min(1)
        logs[key] = torch.where(total > 0, mean, last.double()).to(last.dtype)
    return loss, logs


class _LogAccumulator:
    """Per-task means over the steps of one logging interval (a task counts only in the steps it was present)."""

    def __init__(self, k: int):
        self.k = k
        self.n = 0
        self.loss = 0.0
        self.sums: dict[str, torch.Tensor] = {}
        self.present = torch.zeros(k, dtype=torch.float64)
        self.weight_n = torch.zeros(k, dtype=torch.float64)  # steps with a defined weight (TUR's: task present)
        self.contrastive: Optional[float] = None  # AirNet's MoCo loss, when the model has one

    def add(self, loss: torch.Tensor, logs: dict) -> None:
        self.n += 1
        self.loss += float(loss)
        if "contrastive" in logs:
            self.contrastive = (self.contrastive or 0.0) + float(logs["contrastive"])
        present = (logs["count"].detach().cpu() > 0).double()
        self.present += present
        for key in ("loss", "l1", "uncertainty", "weight"):
            if key in logs:
                v = logs[key].detach().cpu().double()
                if key == "weight":
                    defined = torch.isfinite(v)
                    self.weight_n += defined.double()
                    v = torch.where(defined, v, torch.zeros_like(v))
                else:
                    v = v * present
                self.sums[key] = self.sums.get(key, torch.zeros(self.k, dtype=torch.float64)) + v

    def row(self, tasks: TaskSet, *, step: int, epoch: float, lr: float, ips: float) -> dict:
        row = {"step": step, "epoch": round(epoch, 4), "lr": lr, "images_per_s": round(ips, 3),
               "loss": self.loss / max(self.n, 1)}
        if self.contrastive is not None:
            row["contrastive"] = self.contrastive / max(self.n, 1)
        denom = self.present.clamp_min(1)
        if "l1" in self.sums:
            row["l1"] = float((self.sums["l1"] / denom)[self.present > 0].mean()) if bool((self.present > 0).any()) else None
        for key, vals in self.sums.items():
            mean = vals / (self.weight_n.clamp_min(1) if key == "weight" else denom)
            for i, name in enumerate(tasks):
                if (self.weight_n[i] if key == "weight" else self.present[i]) > 0:
                    row[f"{key}/{name}"] = float(mean[i])
        return row


def train_and_evaluate(cfg: dict, *, progress_position: Optional[int] = None,
                       threads: Optional[int] = None) -> Dict[str, Dict[str, float]]:
    """Train ``cfg`` to its end (resuming what its output folder holds) and return the final validation's
    ``{task: {"psnr", "ssim"}}``: one run of ``tur demo`` and of a ``tur study`` worker. ``threads`` sets torch's
    intra-op threads first (side-by-side runs in worker processes share the cores)."""
    if threads is not None:
        torch.set_num_threads(threads)
    with Trainer(cfg, progress_position=progress_position) as trainer:
        summary = trainer.train()
    return {t: {"psnr": m["psnr"], "ssim": m["ssim"]} for t, m in (summary["metrics"] or {}).items()}
