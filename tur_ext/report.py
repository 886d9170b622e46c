"""``report.md`` for one run folder or a folder of compared runs, with PNG plots (matplotlib, Agg backend).

A *run* is a folder with the trainer's ``log.csv`` (see :mod:`tur_ext.train.trainer`). ``write_report(folder)``
takes the folder itself if it is a run, else every run directly inside it (the demo's ``runs/demo/{tur,l1}``), and
writes into ``folder``:

    report.md          summary table, per-task PSNR/SSIM table, the plots below
    report.html        (``html=True``) the same in one self-contained page, samples as slider viewers
    curves.png         per-task plain L1 over training, one line per run (comparable whatever the loss)
    uncertainty.png    per-task mean predicted uncertainty over training (runs with an uncertainty head)
    psnr.png           per-task PSNR of the compared runs (final validation)
    samples.png        degraded / restored by each run / clean, one row per task (held-out eval set)
"""
from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

PathLike = Union[str, os.PathLike]


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # never needs a display; set before pyplot is imported anywhere in this process
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 110) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    _plt().close(fig)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def find_runs(folder: PathLike) -> dict[str, Path]:
    """``{name: run folder}``: the folder itself when it is a run, else its run sub-folders (sorted, 'tur' first)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"run_dir: no such folder {str(folder)!r}")
    if (folder / "log.csv").is_file():
        return {folder.name: folder}
    subs = sorted((p for p in folder.iterdir() if p.is_dir() and (p / "log.csv").is_file()),
                  key=lambda p: (p.name != "tur", p.name))
    if not subs:
        raise FileNotFoundError(f"run_dir: {str(folder)!r} holds no log.csv and no run folders with one")
    return {p.name: p for p in subs}


def _run_tasks(run: Path) -> list[str]:
    import yaml

    from .tasks import TaskSet

    cfg_path = run / "config.yaml"
    if cfg_path.is_file():
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
        return list(TaskSet(cfg.get("tasks", "3task")))
    from .train.logs import read_csv

    cols = read_csv(run / "log.csv")
    return [c.split("/", 1)[1] for c in cols if c.startswith("l1/")]


def load_metrics(run: Path) -> dict:
    """The run's last per-task validation ``{task: {"psnr", "ssim", ...}}`` (empty if it has none)."""
    p = run / "metrics.json"
    if not p.is_file():
        return {}
    data = json.loads(p.read_text(encoding="utf-8"))
    return data.get("tasks", data)


def _smooth(y: np.ndarray, n: int) -> np.ndarray:
    if n <= 1 or len(y) < n:
        return y
    k = np.ones(n) / n
    pad = np.concatenate([np.full(n - 1, y[0]), y])
    return np.convolve(pad, k, mode="valid")


def plot_curves(logs: dict, tasks: list[str], key: str, ylabel: str, path: Path, *, logy: bool = False) -> bool:
    """One panel per task, one line per run, of column ``key/<task>``; False if no run has that column."""
    plt = _plt()
    have = [r for r, log in logs.items() if any(_has_values(log.get(f"{key}/{t}")) for t in tasks)]
    if not have:
        return False
    cols = min(len(tasks), 3)
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for i, task in enumerate(tasks):
        ax = axes[i // cols][i % cols]
        for run in have:
            log = logs[run]
            y = np.asarray(log.get(f"{key}/{task}", []), dtype=float)
            x = np.asarray(log["step"], dtype=float)
            ok = np.isfinite(y)
            if ok.any():
                ax.plot(x[ok], _smooth(y[ok], max(1, ok.sum() // 25)), label=run, lw=1.4)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for j in range(len(tasks), rows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend()
    fig.tight_layout()
    _save(fig, path)
    return True


def _has_values(col) -> bool:
    return col is not None and any(isinstance(v, float) and math.isfinite(v) for v in col)


def plot_psnr(metrics: dict, tasks: list[str], path: Path) -> bool:
    """Grouped bars: per task, one bar per run."""
    plt = _plt()
    runs = [r for r in metrics if metrics[r]]
    if not runs:
        return False
    x = np.arange(len(tasks))
    w = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 2, 3.6))
    for i, r in enumerate(runs):
        vals = [metrics[r].get(t, {}).get("psnr", np.nan) for t in tasks]
        vals = [np.nan if v is None else v for v in vals]
        bars = ax.bar(x + (i - (len(runs) - 1) / 2) * w, vals, w, label=r)
        for b, v in zip(bars, vals):
            if np.isfinite(v):
                ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, tasks)
    ax.set_ylabel("PSNR (dB)")
    finite = [metrics[r][t]["psnr"] for r in runs for t in tasks
              if t in metrics[r] and metrics[r][t].get("psnr") is not None and math.isfinite(metrics[r][t]["psnr"])]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 3), max(finite) + 1.5)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_samples(runs: dict[str, Path], path: Path, *, device: str = "cpu") -> bool:
    """One held-out sample per task: degraded, each run's restoration (EMA weights, PSNR in the title), clean."""
    from . import data as tdata
    from . import metrics as M
    from .tasks import TaskSet
    from .train.checkpoint import build_model_from_checkpoint, find_checkpoint, load_checkpoint
    from .train.evaluate import restore
    from .train.trainer import TRAINER_DATA_KEYS

    models, ref_cfg, tasks = {}, None, None
    for name, run in runs.items():
        try:
            ckpt = load_checkpoint(find_checkpoint(run))
        except FileNotFoundError:
            continue
        models[name] = build_model_from_checkpoint(ckpt, use_ema=True).to(device)
        if ref_cfg is None:
            ref_cfg, tasks = ckpt.get("config") or {}, TaskSet(list(ckpt["tasks"]))
    if not models:
        return False
    data_cfg = {k: v for k, v in (ref_cfg.get("data") or {}).items() if k not in TRAINER_DATA_KEYS}
    data_cfg.setdefault("seed", ref_cfg.get("seed", 0))
    eval_set = tdata.build_eval_dataset(data_cfg, tasks)
    picked: dict[str, dict] = {}
    for i in range(len(eval_set)):
        task = eval_set.task_of(i)
        if task not in picked:
            picked[task] = eval_set[i]
        if len(picked) == len(eval_set.tasks_present):
            break
    order = [t for t in tasks if t in picked]
    plt = _plt()
    ncols = 2 + len(models)
    fig, axes = plt.subplots(len(order), ncols, figsize=(2.3 * ncols, 2.4 * len(order)), squeeze=False)
    for r, task in enumerate(order):
        item = picked[task]
        lq, gt = item["lq"].unsqueeze(0), item["gt"].unsqueeze(0)
        panels = [("degraded", lq, M.psnr(lq[0], gt[0]))]
        for name, model in models.items():
            out = restore(model, lq.to(device)).cpu()
            panels.append((name, out, M.psnr(out[0], gt[0])))
        panels.append(("clean", gt, None))
        for c, (title, img, p) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(img[0].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title if p is None else f"{title}\n{p:.2f} dB", fontsize=8)
            if c == 0:
                ax.set_ylabel(task, fontsize=9)
    fig.tight_layout()
    _save(fig, path, dpi=80)
    return True


def _md_table(metrics: dict, tasks: list[str]) -> str:
    runs = [r for r in metrics if metrics[r]]
    if not runs:
        return "_no validation results_\n"
    head = "| task | " + " | ".join(f"{r} PSNR | {r} SSIM" for r in runs) + " |"
    sep = "|---|" + "---:|---:|" * len(runs)
    lines = [head, sep]
    sums = {r: [[], []] for r in runs}
    for t in tasks:
        cells = []
        for r in runs:
            m = metrics[r].get(t)
            if not m or m.get("psnr") is None:
                cells += ["-", "-"]
                continue
            cells += [f"{m['psnr']:.2f}", f"{m['ssim']:.4f}"]
            sums[r][0].append(m["psnr"])
            sums[r][1].append(m["ssim"])
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    mean_cells = []
    for r in runs:
        p, s = sums[r]
        mean_cells += ([f"**{np.mean(p):.2f}**", f"**{np.mean(s):.4f}**"] if p else ["-", "-"])
    lines.append("| **mean** | " + " | ".join(mean_cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(folder: PathLike, *, samples: bool = True, title: Optional[str] = None, html: bool = False) -> Path:
    """Write ``report.md`` and its plots into ``folder``; returns the report's path. ``html``: also write
    ``report.html`` (:mod:`tur_ext.report_html`: the same tables and plots, the samples as slider viewers)."""
    import yaml

    from .train.logs import read_csv

    folder = Path(folder)
    runs = find_runs(folder)
    tasks: list[str] = []
    for run in runs.values():
        for t in _run_tasks(run):
            if t not in tasks:
                tasks.append(t)
    logs = {name: read_csv(run / "log.csv") for name, run in runs.items()}
    metrics = {name: load_metrics(run) for name, run in runs.items()}

    figs = []
    if plot_curves(logs, tasks, "l1", "plain L1 (train)", folder / "curves.png", logy=True):
        figs.append(("Per-task training curves (plain L1 on the training batches, all runs)", "curves.png"))
    if plot_curves(logs, tasks, "uncertainty", "mean uncertainty", folder / "uncertainty.png", logy=True):
        figs.append(("Per-task mean predicted uncertainty over training", "uncertainty.png"))
    if plot_psnr(metrics, tasks, folder / "psnr.png"):
        figs.append(("Per-task PSNR on the held-out set (EMA weights)", "psnr.png"))
    if samples and plot_samples(runs, folder / "samples.png"):
        figs.append(("Held-out samples: degraded / restored by each run / clean", "samples.png"))

    lines = [f"# {title or 'Training report: ' + folder.name}", ""]
    lines += ["| run | model | loss | steps | final train loss | seconds |", "|---|---|---|---:|---:|---:|"]
    for name, run in runs.items():
        cfg = {}
        if (run / "config.yaml").is_file():
            cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
        log = logs[name]
        steps = int(log["step"][-1]) if log.get("step") else 0
        loss = log["loss"][-1] if log.get("loss") else float("nan")
        summary = {}
        if (run / "summary.json").is_file():
            summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
        secs = summary.get("seconds")
        lines.append(f"| {name} | {(cfg.get('model') or {}).get('name', '?')} | {(cfg.get('loss') or {}).get('name', '?')}"
                     f" | {steps} | {loss:.4f} | {'-' if secs is None else f'{secs:.0f}'} |")
    lines += ["", "## Per-task results (held-out set)", "", _md_table(metrics, tasks)]
    for caption, fname in figs:
        lines += [f"## {caption}", "", f"![{caption}]({fname})", ""]
    out = folder / "report.md"
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, out)
    if html:
        from .report_html import write_html_report

        write_html_report(folder, runs, "\n".join(lines), title=title or "Training report: " + folder.name,
                          samples=samples)
    return out
