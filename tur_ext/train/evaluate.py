"""Per-task PSNR/SSIM of a model (or of a checkpoint) on an evaluation set."""
from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from .. import metrics
from ..tasks import TaskSet


def write_json(path: Union[str, os.PathLike], obj) -> None:
    """JSON through a temp file + rename (NaN/inf written as null: strict JSON readers reject them)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(_finite(obj), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, p)


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _dihedral(x: torch.Tensor, i: int) -> torch.Tensor:
    """The ``i``-th of the 8 flips/rotations of the square's symmetry group (0 is the identity)."""
    if i >= 4:
        x = torch.flip(x, (-1,))
    return torch.rot90(x, i % 4, (-2, -1))


def _dihedral_inverse(x: torch.Tensor, i: int) -> torch.Tensor:
    x = torch.rot90(x, -(i % 4), (-2, -1))
    return torch.flip(x, (-1,)) if i >= 4 else x


def _restore_once(model: nn.Module, lq: torch.Tensor, amp_dtype: Optional[torch.dtype]) -> torch.Tensor:
    from ..models import crop_to, from_model_range, model_ranges, pad_to_multiple, to_model_range

    input_range, output_range = model_ranges(model)
    x, size = pad_to_multiple(to_model_range(lq, input_range), int(getattr(model, "size_multiple", 1)),
                              min_size=int(getattr(model, "min_size", 1)))
    ctx = torch.autocast(lq.device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    with ctx:
        out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return from_model_range(crop_to(out.float(), size), output_range)


@torch.no_grad()
def restore(model: nn.Module, lq: torch.Tensor, amp_dtype: Optional[torch.dtype] = None, *,
            self_ensemble: bool = False) -> torch.Tensor:
    """The restored image of a (B, C, H, W) batch in [0, 1]: mapped to the model's input range, padded to its size
    rule, run, cropped back, mapped back from its output range and clamped to [0, 1]. The uncertainty map of a TUR
    model is dropped. ``self_ensemble``: the mean over the 8 flips/rotations of the input, each undone on its
    output (the x8 test-time augmentation restoration papers report as "+"), clamped after averaging."""
    if not self_ensemble:
        return _restore_once(model, lq, amp_dtype).clamp_(0.0, 1.0)
    acc = torch.zeros(lq.shape, dtype=torch.float32, device=lq.device)
    for i in range(8):
        acc += _dihedral_inverse(_restore_once(model, _dihedral(lq, i), amp_dtype), i)
    return acc.div_(8).clamp_(0.0, 1.0)


#: Keys of one per-task metric setting (``train.val_task_metrics.<task>``) and their ``train.val_*`` defaults.
_METRIC_KEYS = {"convention": "val_convention", "crop_border": "val_crop_border", "y_channel": "val_y_channel"}


def task_metric_settings(train: Optional[Mapping], tasks) -> dict[str, dict]:
    """The metric convention of every task of a run, ``{task: {"convention", "crop_border", "test_y_channel"}}``:
    the recipe's ``train.val_convention`` / ``val_crop_border`` / ``val_y_channel``, overridden per task by
    ``train.val_task_metrics`` (``{task: {convention, crop_border, y_channel}}``, every key optional). A
    ValueError names the config key of a bad setting (the promptir convention takes no crop and no Y channel)."""
    train = train or {}
    tasks = TaskSet(tasks)
    base = {"convention": train.get("val_convention", "promptir"), "crop_border": train.get("val_crop_border", 0),
            "y_channel": train.get("val_y_channel", False)}
    overrides = train.get("val_task_metrics") or {}
    if not isinstance(overrides, Mapping):
        raise TypeError(f"config key 'train.val_task_metrics': expected a mapping {{task: {{...}}}}, "
                        f"got {type(overrides).__name__}")
    unknown = [t for t in overrides if t not in tasks]
    if unknown:
        raise ValueError(f"config key 'train.val_task_metrics': {unknown} not among the run's tasks {list(tasks)}")
    out = {}
    for task in tasks:
        spec = dict(base)
        extra = overrides.get(task) or {}
        where = f"train.val_task_metrics.{task}"
        if not isinstance(extra, Mapping):
            raise TypeError(f"config key {where!r}: expected a mapping, got {type(extra).__name__}")
        bad = sorted(set(extra) - set(_METRIC_KEYS))
        if bad:
            raise ValueError(f"config key {where!r}: unknown key(s) {bad}; expected some of {sorted(_METRIC_KEYS)}")
        spec.update(extra)
        keys = {k: (f"{where}.{k}" if k in extra else f"train.{v}") for k, v in _METRIC_KEYS.items()}
        if spec["convention"] not in metrics.CONVENTIONS:
            raise ValueError(f"config key {keys['convention']!r}: expected one of {list(metrics.CONVENTIONS)}, "
                             f"got {spec['convention']!r}")
        cb = spec["crop_border"]
        if isinstance(cb, bool) or not isinstance(cb, int) or cb < 0:
            raise ValueError(f"config key {keys['crop_border']!r}: expected an int >= 0, got {cb!r}")
        if not isinstance(spec["y_channel"], bool):
            raise ValueError(f"config key {keys['y_channel']!r}: expected true/false, got {spec['y_channel']!r}")
        if spec["convention"] == "promptir" and (cb or spec["y_channel"]):
            raise ValueError(f"config key {keys['convention']!r}: the promptir convention (RGB, whole image) takes "
                             f"no crop_border and no y_channel; use basicsr (crop_border={cb}, "
                             f"y_channel={spec['y_channel']})")
        out[task] = {"convention": spec["convention"], "crop_border": cb, "test_y_channel": spec["y_channel"]}
    return out


def describe_metric(setting: Mapping) -> str:
    """A short label of one metric setting, e.g. ``basicsr Y crop 4`` or ``promptir RGB``."""
    label = f"{setting['convention']} {'Y' if setting.get('test_y_channel') else 'RGB'}"
    return label + (f" crop {setting['crop_border']}" if setting.get("crop_border") else "")


@torch.no_grad()
def evaluate(model: nn.Module, loader, tasks, *, device: Union[str, torch.device] = "cpu",
             convention: str = "promptir", crop_border: int = 0, test_y_channel: bool = False,
             per_task: Optional[Mapping[str, Mapping]] = None, amp_dtype: Optional[torch.dtype] = None,
             self_ensemble: bool = False) -> dict:
    """Mean PSNR/SSIM per task over ``loader`` (batches of ``{"lq", "gt", "task_id"}``), in the run's task order:
    ``{task: {"psnr": float, "ssim": float, "count": int}}`` for the tasks present. ``per_task`` maps a task to
    its own ``{"convention", "crop_border", "test_y_channel"}`` (:func:`task_metric_settings`); other tasks use
    ``convention`` / ``crop_border`` / ``test_y_channel``. ``self_ensemble``: see :func:`restore`."""
    tasks = TaskSet(tasks)
    default = dict(convention=convention, crop_border=crop_border, test_y_channel=test_y_channel)
    settings = {t: dict((per_task or {}).get(t) or default) for t in tasks}
    was_training = model.training
    model.eval()
    sums: dict[str, list] = {}
    try:
        for batch in loader:
            lq = batch["lq"].to(device)
            pred = restore(model, lq, amp_dtype, self_ensemble=self_ensemble).cpu()
            gt = batch["gt"].float()
            for i, tid in enumerate(batch["task_id"].tolist()):
                kw = settings[tasks[tid]]
                p = metrics.psnr(pred[i], gt[i], **kw)
                s_ = metrics.ssim(pred[i], gt[i], **kw)
                acc = sums.setdefault(tasks[tid], [0.0, 0.0, 0])
                acc[0] += p
                acc[1] += s_
                acc[2] += 1
    finally:
        model.train(was_training)
    return {t: {"psnr": sums[t][0] / sums[t][2], "ssim": sums[t][1] / sums[t][2], "count": sums[t][2]}
            for t in tasks if t in sums}


def _metric_settings(train: Optional[Mapping], tasks: TaskSet, convention: Optional[str]) -> tuple[dict, str]:
    """Per-task settings of a run's ``train:`` section, with ``convention`` (if given) replacing the run's."""
    settings = task_metric_settings(train, tasks)
    if convention is not None:
        if convention not in metrics.CONVENTIONS:
            raise ValueError(f"convention: expected one of {list(metrics.CONVENTIONS)}, got {convention!r}")
        for s in settings.values():
            s["convention"] = convention
            if convention == "promptir":
                s.update(crop_border=0, test_y_channel=False)
    return settings, convention or (train or {}).get("val_convention", "promptir")


def _device(device: Union[str, torch.device, None]) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _score(model: nn.Module, data_cfg: dict, tasks: TaskSet, settings: dict, dev: torch.device, batch_size: int,
           self_ensemble: bool) -> dict:
    from .. import data as tdata

    loader = tdata.build_eval_loader(tdata.build_eval_dataset(data_cfg, tasks), batch_size)
    return evaluate(model.to(dev), loader, tasks, device=dev, per_task=settings, self_ensemble=self_ensemble)


def evaluate_checkpoint(path: Union[str, os.PathLike], *, data: Optional[dict] = None, use_ema: bool = True,
                        device: Union[str, torch.device, None] = None, convention: Optional[str] = None,
                        batch_size: Optional[int] = None, self_ensemble: bool = False) -> dict:
    """Per-task metrics of a checkpoint (a file, or a run folder: its newest checkpoint).

    The eval set is the checkpoint's own ``data:`` section unless ``data`` replaces it; the tasks are the
    checkpoint's; each task is scored in the run's convention (:func:`task_metric_settings`) unless
    ``convention`` replaces it (``promptir`` then drops crop and Y channel; ``basicsr`` keeps the run's).
    Returns ``{"checkpoint", "step", "convention", "self_ensemble", "metrics": {task: setting},
    "tasks": {task: {...}}}``.
    """
    from .checkpoint import build_model_from_checkpoint, find_checkpoint, load_checkpoint
    from .trainer import TRAINER_DATA_KEYS

    ckpt_path = find_checkpoint(path)
    ckpt = load_checkpoint(ckpt_path)
    cfg = ckpt.get("config") or {}
    tasks = TaskSet(list(ckpt["tasks"]))
    run_data = dict(cfg.get("data") or {})
    data_cfg = dict(data) if data is not None else {k: v for k, v in run_data.items() if k not in TRAINER_DATA_KEYS}
    data_cfg.setdefault("seed", cfg.get("seed", 0))
    settings, conv = _metric_settings(cfg.get("train"), tasks, convention)
    model = build_model_from_checkpoint(ckpt, use_ema=use_ema)
    bs = batch_size or int(run_data.get("eval_batch_size", 1))
    result = _score(model, data_cfg, tasks, settings, _device(device), bs, self_ensemble)
    return {"checkpoint": str(ckpt_path), "step": int(ckpt.get("step", 0)), "convention": conv,
            "self_ensemble": self_ensemble, "metrics": {t: settings[t] for t in result}, "tasks": result}


def evaluate_weights(arch: str, weights: Union[str, os.PathLike], *, data: Mapping[str, Any], tasks,
                     config: Optional[Mapping[str, Any]] = None, train: Optional[Mapping[str, Any]] = None,
                     device: Union[str, torch.device, None] = None, convention: Optional[str] = None,
                     batch_size: int = 1, self_ensemble: bool = False) -> dict:
    """Per-task metrics of a weights file of any layout :func:`~tur_ext.models.load_weights` reads (a downloaded
    release, say), built as ``arch`` with ``config`` overrides and scored on the ``data:`` section ``data`` for
    ``tasks``. ``train`` (a run config's ``train:`` section) gives the metric conventions; ``convention`` replaces
    them. Returns the dict of :func:`evaluate_checkpoint`, ``"weights"`` in place of ``"checkpoint"``."""
    from ..export import model_from_weights

    tasks = tasks if isinstance(tasks, TaskSet) else TaskSet(tasks)
    settings, conv = _metric_settings(train, tasks, convention)
    model = model_from_weights(arch, weights, dict(config or {}))
    result = _score(model, dict(data), tasks, settings, _device(device), batch_size, self_ensemble)
    return {"weights": os.fspath(weights), "arch": arch, "convention": conv, "self_ensemble": self_ensemble,
            "metrics": {t: settings[t] for t in result}, "tasks": result}


def format_table(results: dict, tasks=None) -> str:
    """A plain-text table, one row per task, PSNR/SSIM per run: ``results = {run: {task: {"psnr", "ssim"}}}``.
    Columns are as wide as their headers, with a space between any two."""
    runs = list(results)
    if tasks is None:
        tasks = []
        for r in runs:
            for t in results[r]:
                if t not in tasks:
                    tasks.append(t)
    tw = max([12] + [len(t) + 1 for t in tasks])
    widths = {r: (max(11, len(r) + 5), max(10, len(r) + 5)) for r in runs}
    head = f"{'task':<{tw}}" + "".join(f" {r + ' PSNR':>{widths[r][0]}} {r + ' SSIM':>{widths[r][1]}}" for r in runs)
    lines = [head, "-" * len(head)]
    means = {r: [[], []] for r in runs}

    def cells(r: str, p: Optional[float], s_: Optional[float]) -> str:
        wp, ws = widths[r]
        if p is None:
            return f" {'-':>{wp}} {'-':>{ws}}"
        return f" {p:>{wp}.2f} {s_:>{ws}.4f}"

    for t in tasks:
        row = f"{t:<{tw}}"
        for r in runs:
            m = results[r].get(t)
            if m is None:
                row += cells(r, None, None)
                continue
            row += cells(r, m["psnr"], m["ssim"])
            means[r][0].append(m["psnr"])
            means[r][1].append(m["ssim"])
        lines.append(row)
    row = f"{'mean':<{tw}}"
    for r in runs:
        p, s_ = means[r]
        row += cells(r, sum(p) / len(p), sum(s_) / len(s_)) if p else cells(r, None, None)
    lines += ["-" * len(head), row]
    return "\n".join(lines)
