"""``tur study CONFIG``: does TUR help, and when? Train one backbone on one data set with several losses, budgets and
seeds (plus TUR knob variants), evaluate every run per task on the held-out set, and write a study folder::

    <out>/runs/<run id>/          the trainer's run folder (config, logs; checkpoints while the run is unfinished)
    <out>/results/<run id>.json   the run's per-task PSNR/SSIM, written atomically once it has finished
    <out>/study.json              every run's metrics and the aggregates (deterministic: no timings)
    <out>/study.md                the tables and the outcome stated in figures
    <out>/psnr_vs_steps.png       mean and worst-task PSNR vs training steps, per method, spread over seeds
    <out>/knobs.png               each TUR knob's effect on mean PSNR at the knob budget, per seed
    <out>/timing.json             wall time of the last invocation that trained, and per-run training seconds

A study config (YAML) holds ``base`` (a run config as for ``tur train``, without loss name, seed and steps),
``methods`` (losses), ``budgets`` (steps; each budget is its own run with its own schedule), ``seeds``, and
``knobs`` (name -> {dotted config key: value}, applied to the ``tur`` runs at ``knob_budget``, default the largest).

Resuming: a run whose result file exists (for the same config) is skipped; an unfinished run continues from its
newest checkpoint (``train.resume=auto``). Runs are trained single-threaded (``train.threads=1`` unless the config
sets it), so the numbers do not depend on ``--jobs``: the same config and seeds give the same bits on the same CPU.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import yaml

PathLike = Union[str, os.PathLike]

#: Reference method for the differences in the tables, and the method the knobs modify.
BASELINE = "l1"
KNOB_METHOD = "tur"
STUDY_KEYS = ("name", "base", "methods", "budgets", "seeds", "knobs", "knob_budget", "keep_checkpoints")
#: Run-config keys that do not change a run's numbers (left out of the digest that decides whether a result is stale).
_VOLATILE = (("output_dir",), ("name",), ("train", "resume"), ("train", "progress"), ("train", "tensorboard"))
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


from .train.config import ConfigError


class StudyError(ConfigError):
    """A study config value is missing or wrong; the message names the key (``tur study`` exits with status 2)."""


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study."""

    method: str
    steps: int
    seed: int
    variant: str = ""  # a knob name ("" = the method as published)
    sets: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def label(self) -> str:
        return f"{self.method}+{self.variant}" if self.variant else self.method

    @property
    def id(self) -> str:
        return f"{self.label}_steps{self.steps}_seed{self.seed}"


# --- config -------------------------------------------------------------------------------------------------------

def _int_list(study: dict, key: str, minimum: int) -> list[int]:
    v = study.get(key)
    if not isinstance(v, list) or not v or any(isinstance(x, bool) or not isinstance(x, int) or x < minimum for x in v):
        raise StudyError(f"study key {key!r}: expected a non-empty list of integers >= {minimum}, got {v!r}")
    if len(set(v)) != len(v):
        raise StudyError(f"study key {key!r}: expected distinct values, got {v!r}")
    return sorted(v)


def validate_study(raw: Any, *, name: Optional[str] = None) -> dict:
    """Check a study config and fill in defaults; returns a new dict. Errors name the key."""
    from .baselines import LOSSES

    if not isinstance(raw, dict):
        raise StudyError(f"study: expected a mapping at the top level, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(STUDY_KEYS))
    if unknown:
        raise StudyError(f"study: unknown key(s) {unknown}; expected some of {list(STUDY_KEYS)}")
    s = copy.deepcopy(raw)
    s["name"] = s.get("name") or name or "study"
    if not isinstance(s["name"], str) or not _NAME_RE.match(s["name"]):
        raise StudyError(f"study key 'name': expected letters, digits, '_', '.', '-', got {s['name']!r}")
    if not isinstance(s.get("base"), dict):
        raise StudyError(f"study key 'base': expected a run config mapping (as for `tur train`), got {s.get('base')!r}")
    methods = s.get("methods")
    if not isinstance(methods, list) or not methods or any(m not in LOSSES for m in methods) \
            or len(set(methods)) != len(methods):
        raise StudyError(f"study key 'methods': expected distinct losses from {sorted(LOSSES)}, got {methods!r}")
    s["budgets"] = _int_list(s, "budgets", 1)
    s["seeds"] = _int_list(s, "seeds", 0)
    knobs = s.get("knobs") or {}
    if not isinstance(knobs, dict):
        raise StudyError(f"study key 'knobs': expected a mapping name -> {{config.key: value}}, got {knobs!r}")
    for k, sets in knobs.items():
        if not isinstance(k, str) or not _NAME_RE.match(k):
            raise StudyError(f"study key 'knobs': bad knob name {k!r} (letters, digits, '_', '.', '-')")
        if not isinstance(sets, dict) or not sets or not all(isinstance(x, str) and x for x in sets):
            raise StudyError(f"study key 'knobs.{k}': expected a non-empty mapping of dotted config keys to values")
    if knobs and KNOB_METHOD not in methods:
        raise StudyError(f"study key 'knobs': the knobs modify the {KNOB_METHOD!r} runs; add it to 'methods'")
    s["knobs"] = knobs
    kb = s.get("knob_budget")
    s["knob_budget"] = max(s["budgets"]) if kb is None or not knobs else kb
    if s["knob_budget"] not in s["budgets"]:
        raise StudyError(f"study key 'knob_budget': expected one of the budgets {s['budgets']}, got {kb!r}")
    keep = s.get("keep_checkpoints", False)
    if not isinstance(keep, bool):
        raise StudyError(f"study key 'keep_checkpoints': expected true/false, got {keep!r}")
    s["keep_checkpoints"] = keep
    for key in ("steps", "epochs"):
        if (s["base"].get("train") or {}).get(key) is not None:
            raise StudyError(f"study key 'base.train.{key}': the budgets set the training length; remove it")
    # Every run config must validate: build them now so a typo fails before hours of training.
    from .baselines import build_loss

    for spec in plan(s):
        try:
            cfg = run_config(s, spec, Path("."))
            build_loss(spec.method, cfg["tasks"], **{k: v for k, v in cfg["loss"].items() if k != "name"})
        except (ConfigError, TypeError, ValueError) as e:
            raise StudyError(f"study: the run config of {spec.id} is invalid: {e}") from None
    return s


def load_study(path: PathLike, overrides: Sequence[str] = ()) -> dict:
    """Read a study YAML, apply ``--set key=value`` overrides (``base.data.length=100``, ``seeds=[0,1]``), validate."""
    from .train.config import _fix_floats, apply_overrides, read_yaml_mapping

    raw = read_yaml_mapping(path, "study config", StudyError)
    return validate_study(apply_overrides(_fix_floats(raw), overrides), name=Path(path).stem)


def plan(study: dict) -> list[RunSpec]:
    """Every run of the study: methods x budgets x seeds, then the knob variants at the knob budget."""
    runs = [RunSpec(m, b, sd) for m in study["methods"] for b in study["budgets"] for sd in study["seeds"]]
    runs += [RunSpec(KNOB_METHOD, study["knob_budget"], sd, k, dict(sets))
             for k, sets in study["knobs"].items() for sd in study["seeds"]]
    return runs


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise StudyError(f"knob key {key!r}: {p!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = copy.deepcopy(value)


def run_config(study: dict, spec: RunSpec, out: PathLike) -> dict:
    """The validated trainer config of one run."""
    from .train.config import load_config

    raw = copy.deepcopy(study["base"])
    for key, value in spec.sets.items():
        _set_dotted(raw, key, value)
    _set_dotted(raw, "loss.name", spec.method)
    _set_dotted(raw, "seed", spec.seed)
    _set_dotted(raw, "train.steps", spec.steps)
    _set_dotted(raw, "name", f"{study['name']}-{spec.id}")
    _set_dotted(raw, "output_dir", str(Path(out) / "runs" / spec.id))
    _set_dotted(raw, "train.resume", "auto")
    _set_dotted(raw, "train.progress", False)
    train = raw["train"]
    if train.get("threads") is None:
        train["threads"] = 1  # results independent of --jobs (and of how many cores the machine has)
    return load_config(raw=raw)


def config_digest(cfg: dict) -> str:
    """A hash of everything in a run config that changes its numbers."""
    c = copy.deepcopy(cfg)
    for path in _VOLATILE:
        node = c
        for p in path[:-1]:
            node = node.get(p) or {}
        node.pop(path[-1], None)
    return hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest()[:16]


# --- running ------------------------------------------------------------------------------------------------------

def _same_run_config(run_dir: Path, cfg: dict) -> bool:
    p = run_dir / "config.yaml"
    if not p.is_file():
        return True
    try:
        old = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return False
    return isinstance(old, dict) and config_digest(old) == config_digest(cfg)


def train_run(cfg: dict, spec: dict, result_path: str, keep_checkpoints: bool = False) -> dict:
    """Train (or finish) one run, evaluate it, write its result file; the body of a study worker process."""
    from .train.evaluate import write_json
    from .train.trainer import train_and_evaluate

    run_dir = Path(cfg["output_dir"])
    if run_dir.exists() and not _same_run_config(run_dir, cfg):
        shutil.rmtree(run_dir)  # a run of an earlier, different config: its checkpoints must not be resumed
    started = time.perf_counter()
    metrics = train_and_evaluate(cfg, threads=cfg["train"]["threads"])
    if not metrics:
        raise RuntimeError(f"run {spec['id']}: no evaluation metrics (is train.validate off?)")
    result = {**spec, "config_digest": config_digest(cfg), "tasks": metrics,
              "seconds": round(time.perf_counter() - started, 3)}
    write_json(result_path, result)
    if not keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return result


def _spec_dict(spec: RunSpec) -> dict:
    d = asdict(spec)
    d.pop("sets")
    d["id"], d["label"] = spec.id, spec.label
    return d


def _load_result(path: Path, digest: str) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if res.get("config_digest") != digest:
        return None
    return res


def default_jobs(pending: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(pending, cores))


def run_study(study: dict, out: PathLike, *, jobs: Optional[int] = None,
              log: Callable[[str], None] = print) -> dict:
    """Train what is missing, aggregate, write the study files; returns ``{"trained", "skipped", "study", ...}``."""
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"--jobs: expected an integer >= 1, got {jobs!r}")
    started = time.perf_counter()
    out = Path(out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    specs = plan(study)
    cfgs = {s.id: run_config(study, s, out) for s in specs}
    results: dict[str, dict] = {}
    pending: list[RunSpec] = []
    for s in specs:
        res = _load_result(out / "results" / f"{s.id}.json", config_digest(cfgs[s.id]))
        if res is None:
            pending.append(s)
        else:
            results[s.id] = res
    pending.sort(key=lambda s: (-s.steps, s.id))  # longest first: the parallel runs end closer together
    n_jobs = min(jobs, max(1, len(pending))) if jobs is not None else default_jobs(len(pending))
    log(f"[tur] study {study['name']}: {len(specs)} runs, {len(results)} already done, {len(pending)} to train "
        f"({n_jobs} at a time, single-threaded) -> {out}")
    errors: list[str] = []

    def done(s: RunSpec, res: dict) -> None:
        results[s.id] = res
        mean = sum(m["psnr"] for m in res["tasks"].values()) / len(res["tasks"])
        log(f"[tur] study: {len(results)}/{len(specs)} {s.id}: mean PSNR {mean:.2f} dB ({res['seconds']:.0f} s)")

    args = {s.id: (cfgs[s.id], _spec_dict(s), str(out / "results" / f"{s.id}.json"), study["keep_checkpoints"])
            for s in pending}
    if n_jobs == 1:
        for s in pending:
            done(s, train_run(*args[s.id]))
    elif pending:
        import multiprocessing as mp

        # Single-threaded processes, as in `tur demo`: small convolutions scale poorly across threads.
        with ProcessPoolExecutor(max_workers=n_jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(train_run, *args[s.id]): s for s in pending}
            try:
                for fut in as_completed(futures):
                    s = futures[fut]
                    try:
                        done(s, fut.result())
                    except Exception as e:  # the other runs go on; the study reports the failures at the end
                        errors.append(f"{s.id}: {type(e).__name__}: {e}")
                        log(f"[tur] study: run {s.id} failed: {errors[-1]}")
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    if errors:
        raise RuntimeError(f"study: {len(errors)} run(s) failed (finished runs are kept; rerun to retry): "
                           + "; ".join(errors))
    summary = aggregate(study, [results[s.id] for s in specs])
    write_outputs(out, summary)
    wall = time.perf_counter() - started
    from .train.evaluate import write_json

    if pending or not (out / "timing.json").exists():  # a rerun that only re-aggregates keeps the training times
        write_json(out / "timing.json", {"wall_seconds": round(wall, 1), "jobs": n_jobs, "trained": len(pending),
                                         "run_seconds": {s.id: results[s.id].get("seconds") for s in specs}})
    log(f"[tur] study: wrote {out / 'study.md'}, {out / 'study.json'} and plots in {wall:.0f} s")
    return {"trained": len(pending), "skipped": len(specs) - len(pending), "study": summary, "wall_seconds": wall}


# --- aggregation --------------------------------------------------------------------------------------------------

def stats(values: Sequence[float]) -> dict:
    """mean, sample standard deviation (n-1; 0 for one value), min, max and the values, in seed order."""
    v = [float(x) for x in values]
    n = len(v)
    mean = sum(v) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(v), "max": max(v), "n": n, "values": v}


def _run_scores(res: dict, tasks: Sequence[str]) -> tuple[float, float]:
    ps = [res["tasks"][t]["psnr"] for t in tasks]
    return sum(ps) / len(ps), min(ps)


def aggregate(study: dict, results: Sequence[dict]) -> dict:
    """Per (method or knob variant, budget): mean-over-tasks PSNR, worst-task PSNR and per-task PSNR/SSIM, each as
    :func:`stats` over seeds; differences to ``l1`` (methods) and to default ``tur`` (knobs), paired by seed."""
    tasks = list(results[0]["tasks"])
    by: dict[tuple[str, int], dict[int, dict]] = {}
    for r in results:
        if list(r["tasks"]) != tasks:
            raise ValueError(f"results: run {r['id']} has tasks {list(r['tasks'])}, expected {tasks}")
        by.setdefault((r["label"], r["steps"]), {})[r["seed"]] = r
    seeds = study["seeds"]

    def group(label: str, steps: int) -> dict:
        runs = [by[(label, steps)][sd] for sd in seeds]
        scores = [_run_scores(r, tasks) for r in runs]
        return {
            "mean_psnr": stats([m for m, _ in scores]),
            "worst_psnr": stats([w for _, w in scores]),
            "worst_task": [min(tasks, key=lambda t: r["tasks"][t]["psnr"]) for r in runs],
            "tasks": {t: {"psnr": stats([r["tasks"][t]["psnr"] for r in runs]),
                          "ssim": stats([r["tasks"][t]["ssim"] for r in runs])} for t in tasks},
        }

    def delta(a: dict, b: dict) -> dict:
        d = {key: stats([x - y for x, y in zip(a[key]["values"], b[key]["values"])])
             for key in ("mean_psnr", "worst_psnr")}
        d["tasks"] = {t: stats([x - y for x, y in zip(a["tasks"][t]["psnr"]["values"], b["tasks"][t]["psnr"]["values"])])
                      for t in tasks}
        return d

    methods = {m: {str(b): group(m, b) for b in study["budgets"]} for m in study["methods"]}
    vs_baseline = {}
    if BASELINE in methods:
        vs_baseline = {m: {b: delta(methods[m][b], methods[BASELINE][b]) for b in methods[m]}
                       for m in methods if m != BASELINE}
    kb = str(study["knob_budget"])
    knobs = {}
    for k, sets in study["knobs"].items():
        g = group(f"{KNOB_METHOD}+{k}", study["knob_budget"])
        knobs[k] = {"sets": sets, **g, "vs_default": delta(g, methods[KNOB_METHOD][kb])}
        if BASELINE in methods:
            knobs[k]["vs_" + BASELINE] = delta(g, methods[BASELINE][kb])
    base = study["base"]
    return {
        "study": study["name"],
        "tasks": tasks,
        "methods": list(study["methods"]),
        "budgets": list(study["budgets"]),
        "seeds": list(seeds),
        "knob_budget": study["knob_budget"],
        "config": {k: study[k] for k in STUDY_KEYS if k in study},
        "setup": {"model": base.get("model"), "data": base.get("data"), "tasks": base.get("tasks", "3task"),
                  "optim": base.get("optim"), "schedule": base.get("schedule"), "train": base.get("train")},
        "summary": methods,
        "vs_" + BASELINE: vs_baseline,
        "knobs": knobs,
        "runs": {r["id"]: {"method": r["method"], "variant": r["variant"], "steps": r["steps"], "seed": r["seed"],
                           "tasks": r["tasks"]} for r in results},
    }


# --- outputs ------------------------------------------------------------------------------------------------------

def _pm(s: dict, signed: bool = False) -> str:
    f = "{:+.2f}" if signed else "{:.2f}"
    return f"{f.format(s['mean'])} ± {s['std']:.2f}"


def _wins(s: dict) -> str:
    return f"{sum(1 for x in s['values'] if x > 0)}/{s['n']}"


def outcome_lines(summary: dict) -> list[str]:
    """The outcome in figures, one line per method and budget (and per knob), generated from the numbers."""
    lines = []
    vs = summary.get("vs_" + BASELINE) or {}
    for m, per_budget in vs.items():
        for b, d in per_budget.items():
            mp, wp = d["mean_psnr"], d["worst_psnr"]
            verdict = "better" if mp["mean"] > 0 else "worse"
            lines.append(f"- **{m} vs {BASELINE}, {b} steps**: {verdict} by {abs(mp['mean']):.2f} dB mean PSNR "
                         f"({_pm(mp, True)} dB over seeds, higher on {_wins(mp)} seeds); worst task "
                         f"{_pm(wp, True)} dB (higher on {_wins(wp)}).")
    for k, kn in summary["knobs"].items():
        d = kn["vs_default"]["mean_psnr"]
        text = (f"- **knob {k}** ({_sets_text(kn['sets'])}), {summary['knob_budget']} steps: "
                f"{_pm(d, True)} dB mean PSNR vs default {KNOB_METHOD} (higher on {_wins(d)} seeds)")
        b = kn.get("vs_" + BASELINE)
        if b is not None:
            text += (f"; vs {BASELINE}: {_pm(b['mean_psnr'], True)} dB mean (higher on {_wins(b['mean_psnr'])}), "
                     f"{_pm(b['worst_psnr'], True)} dB worst task")
        lines.append(text + ".")
    return lines


def _sets_text(sets: dict) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in sets.items())


def study_markdown(summary: dict) -> str:
    tasks, budgets, methods = summary["tasks"], summary["budgets"], summary["methods"]
    S = summary["summary"]
    setup = summary["setup"]
    model = (setup.get("model") or {}).get("name", "?")
    data = setup.get("data") or {}
    n = len(summary["seeds"])
    out = [f"# Fidelity study `{summary['study']}`: does TUR help, and when?", ""]
    out.append(f"Backbone `{model}`, tasks `{setup.get('tasks')}` ({', '.join(tasks)}), data `{data.get('type')}` "
               f"(patch {data.get('patch_size')}, batch {data.get('batch_size')}); every run evaluated per task on "
               f"the same held-out set (PSNR in dB, PromptIR convention, EMA weights). Each budget is its own run "
               f"(its own warm-up + cosine schedule). Seeds {summary['seeds']}; figures are mean ± sample sd over "
               f"the {n} seeds; differences are paired by seed.")
    out += ["", "## Outcome", ""] + outcome_lines(summary)
    head = "| method | " + " | ".join(f"{b} steps" for b in budgets) + " |"
    sep = "|---" * (len(budgets) + 1) + "|"
    for key, title in (("mean_psnr", "Mean PSNR over tasks"), ("worst_psnr", "Worst-task PSNR")):
        out += ["", f"## {title} (dB, mean ± sd over seeds [min, max])", "", head, sep]
        for m in methods:
            cells = [f"{_pm(S[m][str(b)][key])} [{S[m][str(b)][key]['min']:.2f}, {S[m][str(b)][key]['max']:.2f}]"
                     for b in budgets]
            out.append(f"| {m} | " + " | ".join(cells) + " |")
    vs = summary.get("vs_" + BASELINE) or {}
    if vs:
        out += ["", f"## Difference to uniform {BASELINE} (dB, paired by seed; seeds where higher)", "",
                "| method | " + " | ".join(f"{b} steps: mean | {b} steps: worst task" for b in budgets) + " |",
                "|---" * (2 * len(budgets) + 1) + "|"]
        for m, d in vs.items():
            cells = [f"{_pm(d[str(b)]['mean_psnr'], True)} ({_wins(d[str(b)]['mean_psnr'])}) | "
                     f"{_pm(d[str(b)]['worst_psnr'], True)} ({_wins(d[str(b)]['worst_psnr'])})" for b in budgets]
            out.append(f"| {m} | " + " | ".join(cells) + " |")
    out += ["", "![mean and worst-task PSNR vs steps](psnr_vs_steps.png)"]
    out += ["", "## Per-task PSNR at each budget (dB, mean ± sd over seeds)"]
    for b in budgets:
        out += ["", f"### {b} steps", "", "| method | " + " | ".join(tasks) + " | mean |",
                "|---" * (len(tasks) + 2) + "|"]
        for m in methods:
            g = S[m][str(b)]
            out.append(f"| {m} | " + " | ".join(_pm(g["tasks"][t]["psnr"]) for t in tasks)
                       + f" | {_pm(g['mean_psnr'])} |")
        if vs:
            for m, d in vs.items():
                out.append(f"| {m} − {BASELINE} | " + " | ".join(_pm(d[str(b)]["tasks"][t], True) for t in tasks)
                           + f" | {_pm(d[str(b)]['mean_psnr'], True)} |")
    if summary["knobs"]:
        kb = str(summary["knob_budget"])
        default = S[KNOB_METHOD][kb]
        out += ["", f"## TUR knobs at {kb} steps (each changes one option of the published method)", "",
                "| variant | options | mean PSNR | worst-task PSNR | Δ mean vs default tur (seeds higher) "
                f"| Δ worst vs default tur | Δ mean vs {BASELINE} (seeds higher) |", "|---|---|---|---|---|---|---|",
                f"| tur (published defaults) | – | {_pm(default['mean_psnr'])} | {_pm(default['worst_psnr'])} | – | – "
                f"| {_pm(vs[KNOB_METHOD][kb]['mean_psnr'], True) if KNOB_METHOD in vs else '–'} |"]
        if BASELINE in S:
            base = S[BASELINE][kb]
            d = vs[KNOB_METHOD][kb] if KNOB_METHOD in vs else None
            neg = (f"{-d['mean_psnr']['mean']:+.2f}" if d else "–")
            out.append(f"| {BASELINE} (reference) | – | {_pm(base['mean_psnr'])} | {_pm(base['worst_psnr'])} "
                       f"| {neg} | – | – |")
        for k, kn in summary["knobs"].items():
            d = kn["vs_default"]
            b = kn.get("vs_" + BASELINE)
            vb = f"{_pm(b['mean_psnr'], True)} ({_wins(b['mean_psnr'])})" if b else "–"
            out.append(f"| tur+{k} | {_sets_text(kn['sets'])} | {_pm(kn['mean_psnr'])} | {_pm(kn['worst_psnr'])} "
                       f"| {_pm(d['mean_psnr'], True)} ({_wins(d['mean_psnr'])}) | {_pm(d['worst_psnr'], True)} | {vb} |")
        out += ["", "![knob effects](knobs.png)"]
    out += ["", "## Reproduce", "",
            f"`tur study <config> --out <dir>` (the study config is in study.json under `config`). Runs are "
            "single-threaded, so the numbers do not depend on `--jobs`; the same seeds give the same numbers on the "
            "same kind of CPU (another CPU or library build may change the last digits). An interrupted study "
            "resumes: finished runs are skipped, an unfinished run continues from its newest checkpoint.", ""]
    return "\n".join(out)


_COLORS = {"l1": "tab:gray", "tur": "tab:red", "uw": "tab:blue", "dwa": "tab:green"}


def plot_psnr_vs_steps(summary: dict, path: Path) -> None:
    from .report import _plt, _save

    plt = _plt()
    budgets = summary["budgets"]
    vs = summary.get("vs_" + BASELINE) or {}
    fig, axes = plt.subplots(1, 3 if vs else 2, figsize=(13 if vs else 9, 3.4))
    for ax, key, title in zip(axes, ("mean_psnr", "worst_psnr"), ("mean PSNR over tasks", "worst-task PSNR")):
        for i, m in enumerate(summary["methods"]):
            g = [summary["summary"][m][str(b)][key] for b in budgets]
            c = _COLORS.get(m, f"C{i}")
            ax.plot(budgets, [s["mean"] for s in g], "-o", color=c, label=m, ms=4)
            ax.fill_between(budgets, [s["min"] for s in g], [s["max"] for s in g], color=c, alpha=0.15, lw=0)
        ax.set_xscale("log")
        ax.set_xticks(budgets)
        ax.set_xticklabels([str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("training steps (one run per budget)")
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(f"{title}: mean, band = min–max of {len(summary['seeds'])} seeds", fontsize=9)
        ax.grid(alpha=0.3)
    if vs:
        ax = axes[2]
        for i, m in enumerate(summary["methods"]):
            if m not in vs:
                continue
            g = [vs[m][str(b)]["mean_psnr"] for b in budgets]
            c = _COLORS.get(m, f"C{i}")
            ax.plot(budgets, [s["mean"] for s in g], "-o", color=c, label=m, ms=4)
            ax.fill_between(budgets, [s["min"] for s in g], [s["max"] for s in g], color=c, alpha=0.15, lw=0)
        ax.axhline(0, color=_COLORS[BASELINE], lw=1)
        ax.set_xscale("log")
        ax.set_xticks(budgets)
        ax.set_xticklabels([str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("training steps (one run per budget)")
        ax.set_ylabel(f"Δ mean PSNR vs {BASELINE} (dB)")
        ax.set_title("paired by seed: mean, band = min–max", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, dpi=90)


def plot_knobs(summary: dict, path: Path) -> None:
    from .report import _plt, _save

    plt = _plt()
    rows = [(f"tur+{k}", kn["vs_default"]["mean_psnr"]["values"]) for k, kn in summary["knobs"].items()]
    kb = str(summary["knob_budget"])
    vs = (summary.get("vs_" + BASELINE) or {}).get(KNOB_METHOD)
    if vs is not None:
        rows.insert(0, (f"{BASELINE} (reference)", [-x for x in vs[kb]["mean_psnr"]["values"]]))
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(rows) + 1.2))
    for i, (name, vals) in enumerate(rows):
        mean = sum(vals) / len(vals)
        ax.barh(i, mean, color="tab:gray" if name.startswith(BASELINE) else "tab:red", alpha=0.35)
        ax.plot(vals, [i] * len(vals), "k.", ms=6)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"Δ mean PSNR vs default tur at {kb} steps (dB); bar = mean, dots = seeds")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save(fig, path, dpi=90)


def write_outputs(out: PathLike, summary: dict) -> None:
    """study.json, study.md and the plots (each written to a temp file, then renamed)."""
    from .train.evaluate import write_json

    out = Path(out)
    write_json(out / "study.json", summary)
    tmp = out / f".study.md.tmp.{os.getpid()}"
    tmp.write_text(study_markdown(summary), encoding="utf-8")
    os.replace(tmp, out / "study.md")
    plot_psnr_vs_steps(summary, out / "psnr_vs_steps.png")
    if summary["knobs"]:
        plot_knobs(summary, out / "knobs.png")
