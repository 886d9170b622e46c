"""Run configs: a YAML file, ``--set a.b=value`` overrides, defaults, and validation with errors naming the key.

The schema below is the whole list of keys the trainer reads. Sections marked *open* (``model``, ``loss``,
``data``) also take keys of their own, which are passed on (as keyword arguments to ``tur_ext.models.build`` and
``tur_ext.baselines.build_loss``, and as the config dict of the ``tur_ext.data`` builders), which check them.
"""
from __future__ import annotations

import copy
import difflib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import yaml


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range; the message names the key."""


@dataclass(frozen=True)
class Field:
    """One leaf of the schema: allowed types (``None`` in ``types`` allows null), default, optional check."""

    types: tuple
    default: Any
    choices: Optional[tuple] = None
    check: Optional[Callable[[Any], Optional[str]]] = None  # returns an error text or None
    doc: str = ""


@dataclass(frozen=True)
class Section:
    fields: dict
    open: bool = False  # takes extra keys (checked downstream)
    nullable: bool = False


def _positive(v):
    return None if v is None or v > 0 else "expected > 0"


def _non_negative(v):
    return None if v is None or v >= 0 else "expected >= 0"


def _betas(v):
    if len(v) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in v):
        return "expected two numbers in [0, 1)"
    return None


def _tasks(v):
    if isinstance(v, list) and not all(isinstance(t, str) for t in v):
        return "expected a task-set name or a list of task names"
    return None


SCHEMA = Section({
    "name": Field((str, None), None, doc="run name (default: the config file's stem)"),
    "seed": Field((int,), 0),
    "tasks": Field((str, list), "3task", check=_tasks, doc="task-set name (3task/5task/7task) or list of names"),
    "output_dir": Field((str, None), None, doc="run folder (default: runs/<name>)"),
    "device": Field((str,), "auto", doc="auto, cpu, cuda or cuda:N"),
    "model": Section({
        "name": Field((str,), "nafnet-tiny", doc="a tur_ext.models preset"),
        "uncertainty": Field((bool, str), "auto", doc="auto: the uncertainty head iff the loss needs it"),
        "pretrained": Field((str, None), None,
                            doc="weights to start from (any layout load_weights reads: BasicSR, Lightning, a release)"),
        "pretrained_strict": Field((bool,), False,
                                   doc="also require the file's uncertainty head to match (false: fresh head if absent)"),
        "pretrained_key": Field((str,), "auto", choices=("auto", "params_ema", "params"),
                                doc="which weights of a BasicSR file (auto: params_ema when present)"),
    }, open=True),
    "loss": Section({
        "name": Field((str,), "tur", choices=("tur", "l1", "uw", "dwa", "famo")),
        "sync": Field((str,), "local", choices=("local", "global"),
                      doc="under DDP: per-task statistics (TUR's U_k, uw/dwa's task L1) of each process's batch "
                          "(local, as the published code) or of the global batch (global: the same objective "
                          "on any number of processes)"),
    }, open=True),
    "data": Section({
        "batch_size": Field((int,), 8, check=_positive, doc="total batch size over all processes"),
        "num_workers": Field((int,), 0, check=_non_negative),
        "eval_batch_size": Field((int,), 1, check=_positive),
    }, open=True),
    "optim": Section({
        "name": Field((str,), "adamw", choices=("adamw", "adam"),
                      doc="adamw (decoupled weight decay) or adam (L2 weight decay, as BasicSR's Adam)"),
        "lr": Field((float,), 2e-4, check=_positive),
        "betas": Field((list,), [0.9, 0.999], check=_betas),
        "weight_decay": Field((float,), 0.0, check=_non_negative),
        "eps": Field((float,), 1e-8, check=_positive),
        "loss_lr": Field((float, None), None, check=_positive,
                         doc="learning rate of the loss's own parameters (uw); default optim.lr"),
    }),
    "schedule": Section({
        "name": Field((str,), "cosine", choices=("cosine", "cosine_restarts", "piecewise"),
                      doc="cosine: warmup then one half cosine; cosine_restarts: BasicSR's CosineAnnealingRestartLR; "
                          "piecewise: constant lr factors from milestones on (AirNet's step decays)"),
        "unit": Field((str,), "steps", choices=("steps", "epochs")),
        "warmup": Field((int, float), 0, check=_non_negative, doc="linear warmup length, in schedule.unit"),
        "cosine_end": Field((int, float, None), None, check=_positive,
                            doc="where the cosine reaches min_lr, in schedule.unit (default: end of training)"),
        "min_lr": Field((float,), 0.0, check=_non_negative, doc="lr at the end of each cosine (eta_min)"),
        "periods": Field((list, None), None, doc="cosine_restarts: cycle lengths, in schedule.unit"),
        "restart_weights": Field((list, None), None, doc="cosine_restarts: lr weight at each cycle start (default 1)"),
        "milestones": Field((list, None), None, doc="piecewise: where each lr factor starts, in schedule.unit"),
        "factors": Field((list, None), None, doc="piecewise: the lr factor (of optim.lr) from each milestone on"),
    }),
    "train": Section({
        "steps": Field((int, None), None, check=_positive, doc="training length in optimizer steps"),
        "epochs": Field((int, float, None), None, check=_positive, doc="training length in epochs"),
        "accumulate": Field((int,), 1, check=_positive,
                            doc="micro-batches per optimizer step: each process's batch is split in this many "
                                "forward/backward passes (to fit memory); the statistics are then per micro-batch"),
        "grad_clip": Field((float, None), None, check=_positive, doc="max gradient norm (null: no clipping)"),
        "amp": Field((str,), "none", choices=("none", "bf16", "fp16"), doc="autocast dtype on CUDA"),
        "channels_last": Field((bool,), False),
        "compile": Field((bool,), False),
        "ema_decay": Field((float,), 0.999, check=lambda v: None if 0 <= v < 1 else "expected in [0, 1)"),
        "ema_warmup": Field((bool,), False),
        "log_every": Field((int,), 10, check=_positive),
        "validate": Field((bool,), True, doc="per-task validation on the eval set at the end (and every val_every)"),
        "val_every": Field((int, None), None, check=_positive, doc="validate every N steps (and at the end)"),
        "checkpoint_every": Field((int,), 1000, check=_positive),
        "keep_last": Field((int,), 3, check=_non_negative, doc="checkpoints kept (0: all)"),
        "resume": Field((str, None), None, doc="null, 'auto' or a checkpoint path"),
        "progress": Field((bool,), True, doc="tqdm progress bar"),
        "tensorboard": Field((bool,), True),
        "val_convention": Field((str,), "promptir", choices=("promptir", "basicsr")),
        "val_crop_border": Field((int,), 0, check=_non_negative, doc="basicsr: pixels cropped on every side"),
        "val_y_channel": Field((bool,), False, doc="basicsr: PSNR/SSIM on the BT.601 luma only"),
        "val_task_metrics": Field((dict, None), None,
                                  doc="per-task overrides {task: {convention, crop_border, y_channel}}"),
        "threads": Field((int, None), None, check=_positive, doc="torch CPU threads (null: torch's default)"),
        # AirNet with model.encoder=moco (its own training; see tur_ext.models.airnet): the MoCo loss of the encoder.
        "contrastive_weight": Field((float,), 0.1, check=_non_negative,
                                    doc="moco encoder: weight of the contrastive loss beside the restoration loss"),
        "encoder_pretrain": Field((int, float), 0, check=_non_negative,
                                  doc="moco encoder: length of the first stage, the encoder alone with the "
                                      "contrastive loss (weight 1), in schedule.unit"),
        "key_crop": Field((float,), 0.75, check=lambda v: None if 0 < v <= 1 else "expected in (0, 1]",
                          doc="moco encoder: side of the key view (a random crop of each training patch), as a "
                              "fraction of the patch side"),
    }),
})


# --- value parsing ------------------------------------------------------------------------------------------------

_INT_RE = re.compile(r"^[+-]?\d+$")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_value(text: str) -> Any:
    """Type a ``--set`` value: null/none, true/false, int, float (``1e-4`` too), ``[a, b]``/``{k: v}``, else str."""
    s = text.strip()
    low = s.lower()
    if low in ("null", "none", "~", ""):
        return None
    if low == "true":
        return True
    if low == "false":
        return False
    if _INT_RE.match(s):
        return int(s)
    if _FLOAT_RE.match(s) or low in ("inf", "+inf", "-inf", "nan"):
        return float(s)
    if s[:1] in "[{":
        try:
            return _fix_floats(yaml.safe_load(s))
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse {text!r} as a list/mapping: {e}") from None
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    return s


def _fix_floats(v: Any) -> Any:
    """PyYAML (YAML 1.1) reads ``2e-4`` as a string; turn such strings into floats."""
    if isinstance(v, dict):
        return {k: _fix_floats(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_fix_floats(x) for x in v]
    if isinstance(v, str) and _FLOAT_RE.match(v.strip()) and ("e" in v or "E" in v):
        return float(v)
    return v


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], typed value)."""
    if "=" not in item:
        raise ConfigError(f"--set: expected KEY=VALUE (e.g. train.steps=100), got {item!r}")
    key, value = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"--set: bad key {key!r} in {item!r}")
    return parts, parse_value(value)


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """Set each ``a.b=value`` in a copy of the raw config (validation comes after). A numeric part indexes a list:
    ``data.datasets.1.root=/data/GoPro``."""
    out = copy.deepcopy(raw)
    for item in overrides:
        parts, value = parse_override(item)
        node: Any = out
        for i, p in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"--set {item}: {where!r}: expected a list index below {len(node)}")
                key: Any = int(p)
                nxt = node[key]
            elif isinstance(node, dict):
                key = p
                nxt = node.get(p)
            else:
                raise ConfigError(f"--set {item}: {'.'.join(parts[:i])!r} is a value, not a section")
            if last:
                if isinstance(nxt, dict) and not isinstance(value, dict):
                    raise ConfigError(f"--set {item}: {where!r} is a section, not a value; set one of its keys, "
                                      f"e.g. --set {where}.{next(iter(nxt), 'KEY')}=...")
                node[key] = value
            else:
                if nxt is None:
                    nxt = node[key] = {}
                node = nxt
    return out


# --- validation ---------------------------------------------------------------------------------------------------

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true/false", list: "a list",
               dict: "a mapping", None: "null"}


def _coerce(key: str, f: Field, v: Any) -> Any:
    if v is None:
        if None in f.types:
            return None
        raise ConfigError(f"config key {key!r}: expected {_expected(f)}, got null")
    if isinstance(v, bool):
        ok = bool in f.types
    elif isinstance(v, int):
        ok = int in f.types or float in f.types
        if ok and int not in f.types:
            v = float(v)
    elif isinstance(v, float):
        ok = float in f.types
        if not ok and int in f.types and v.is_integer():
            v, ok = int(v), True
    elif isinstance(v, str):
        ok = str in f.types
        if not ok and float in f.types and _FLOAT_RE.match(v.strip()):
            v, ok = float(v), True
    else:
        ok = type(v) in f.types
        if ok and isinstance(v, list):
            v = _fix_floats(v)
    if not ok:
        raise ConfigError(f"config key {key!r}: expected {_expected(f)}, got {type(v).__name__} {v!r}")
    if isinstance(v, float) and not math.isfinite(v):
        raise ConfigError(f"config key {key!r}: expected a finite number, got {v}")
    if f.choices is not None and v not in f.choices:
        raise ConfigError(f"config key {key!r}: expected one of {list(f.choices)}, got {v!r}")
    if f.check is not None:
        msg = f.check(v)
        if msg:
            raise ConfigError(f"config key {key!r}: {msg}, got {v!r}")
    return v


def _expected(f: Field) -> str:
    return " or ".join(_TYPE_NAMES.get(t, str(t)) for t in f.types)


def _validate_section(prefix: str, sec: Section, raw: Any) -> Optional[dict]:
    if raw is None:
        if sec.nullable:
            return None
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config key {prefix or '<root>'!r}: expected a mapping, got {type(raw).__name__} {raw!r}")
    out = {}
    for k in raw:
        if not isinstance(k, str):
            raise ConfigError(f"config key {prefix + '.' if prefix else ''}{k!r}: keys must be strings")
        if k not in sec.fields and not sec.open:
            full = f"{prefix}.{k}" if prefix else k
            close = difflib.get_close_matches(k, list(sec.fields), n=1)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint} (valid keys here: {sorted(sec.fields)})")
    for k, spec in sec.fields.items():
        full = f"{prefix}.{k}" if prefix else k
        if isinstance(spec, Section):
            out[k] = _validate_section(full, spec, raw.get(k))
        else:
            out[k] = _coerce(full, spec, raw[k]) if k in raw else copy.deepcopy(spec.default)
    if sec.open:
        for k, v in raw.items():
            if k not in sec.fields:
                out[k] = _fix_floats(v)
    return out


def validate(raw: dict, *, name: Optional[str] = None) -> dict:
    """Defaults filled in, types checked and coerced, cross-key rules checked; returns a new nested dict."""
    cfg = _validate_section("", SCHEMA, raw)
    if cfg["name"] is None:
        cfg["name"] = name or "run"
    if cfg["output_dir"] is None:
        cfg["output_dir"] = str(Path("runs") / cfg["name"])
    t = cfg["train"]
    if (t["steps"] is None) == (t["epochs"] is None):
        raise ConfigError("config keys 'train.steps' / 'train.epochs': set exactly one of them "
                          f"(got steps={t['steps']!r}, epochs={t['epochs']!r})")
    unc = cfg["model"]["uncertainty"]
    if isinstance(unc, str) and unc != "auto":
        raise ConfigError(f"config key 'model.uncertainty': expected true, false or 'auto', got {unc!r}")
    if cfg["loss"]["name"] == "tur" and unc is False:
        raise ConfigError("config key 'model.uncertainty': the 'tur' loss needs the uncertainty head "
                          "(set it to true or auto)")
    dev = cfg["device"]
    if not (dev in ("auto", "cpu", "cuda") or re.match(r"^cuda:\d+$", dev)):
        raise ConfigError(f"config key 'device': expected auto, cpu, cuda or cuda:N, got {dev!r}")
    r = t["resume"]
    if r is not None and r != "auto" and not r:
        raise ConfigError("config key 'train.resume': expected null, 'auto' or a checkpoint path")
    from ..tasks import TaskSet

    try:
        tasks = TaskSet(cfg["tasks"])
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config key 'tasks': {e}") from None
    _validate_schedule(cfg["schedule"])
    from .evaluate import task_metric_settings

    try:
        task_metric_settings(t, tasks)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    return cfg


def _validate_schedule(s: dict) -> None:
    from .schedule import check_restarts

    if s["name"] == "cosine_restarts":
        if s["periods"] is None:
            raise ConfigError("config key 'schedule.periods': schedule 'cosine_restarts' needs its cycle lengths")
        if s["restart_weights"] is None:
            s["restart_weights"] = [1.0] * len(s["periods"]) if isinstance(s["periods"], list) else None
        try:
            check_restarts(s["periods"], s["restart_weights"], integer=s["unit"] == "steps")
        except ValueError as e:
            raise ConfigError(f"config key {str(e).split(':')[0]!r}:{str(e).split(':', 1)[1]}") from None
    if s["name"] == "piecewise":
        from .schedule import check_piecewise

        try:
            check_piecewise(s["milestones"], s["factors"], integer=s["unit"] == "steps")
        except ValueError as e:
            raise ConfigError(f"config key {str(e).split(':')[0]!r}:{str(e).split(':', 1)[1]}") from None
    elif s["milestones"] is not None or s["factors"] is not None:
        raise ConfigError("config keys 'schedule.milestones' / 'schedule.factors' apply to schedule.name "
                          f"'piecewise' only (schedule.name is {s['name']!r})")
    if s["name"] != "cosine_restarts" and (s["periods"] is not None or s["restart_weights"] is not None):
        raise ConfigError("config keys 'schedule.periods' / 'schedule.restart_weights' apply to "
                          f"schedule.name 'cosine_restarts' only (schedule.name is {s['name']!r})")


def load_config(path: Union[str, os.PathLike, None] = None, overrides: Sequence[str] = (), *,
                raw: Optional[dict] = None) -> dict:
    """Read a YAML config (or take ``raw``), apply ``--set`` overrides, validate."""
    name = None
    if raw is None:
        if path is None:
            raise ConfigError("config: give a YAML path or a raw dict")
        raw = read_yaml_mapping(path)
        name = Path(path).stem
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    raw = apply_overrides(_fix_floats(raw), overrides)
    return validate(raw, name=name)


def read_yaml_mapping(path: Union[str, os.PathLike], what: str = "config", error=None) -> dict:
    """A YAML file whose top level is a mapping; errors name ``what`` and the file (``error``: the exception type
    for bad content, ConfigError by default)."""
    error = error or ConfigError
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what}: no such file {str(p)!r}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise error(f"{what}: {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise error(f"{what}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def dump_config(cfg: dict, path: Union[str, os.PathLike]) -> None:
    """Write a config as YAML (temp file + rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp.{os.getpid()}")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    os.replace(tmp, p)
