"""The ``tur`` command line: train, eval, report, demo.

    tur train CONFIG [--set a.b=value ...] [--resume auto|PATH] [--pretrained FILE] [--out DIR]
    tur eval CHECKPOINT|RUN_DIR [--set data.key=value ...] [--no-ema] [--convention promptir|basicsr] [--out JSON]
    tur eval --arch NAME --weights FILE [--data CONFIG] [--set data.key=value ...] [--tasks A,B] [--self-ensemble]
    tur report RUN_DIR [--html]
    tur compare A.png B.png ... [--ref CLEAN.png] [--names a,b,...] --out page.html
    tur --version
    tur demo [--out runs/demo] [--steps N] [--jobs N]
    tur study CONFIG [--set key=value ...] [--jobs N] [--out DIR]   (fidelity study, see tur_ext.study)
    tur export ... / tur restore ...      (deployment, see tur_ext.deploy_cli)

``python -m tur_ext ...`` is the same command.
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .cli_support import Parser, run_command

#: The quickstart recipe (configs/quickstart.yaml holds the same values; a test keeps them equal). Sized so that
#: both demo trainings, evaluation and the report fit in a few minutes on 2 CPU cores.
QUICKSTART: dict = {
    "name": "quickstart",
    "seed": 0,
    "tasks": "3task",
    "output_dir": "runs/quickstart",
    "model": {"name": "nafnet-tiny", "uncertainty": "auto"},
    "loss": {"name": "tur"},
    "data": {
        "type": "embedded",
        "patch_size": 64,
        "length": 1000,
        "eval_crop": 128,
        "eval_crops_per_task": 4,
        "batch_size": 10,
        "eval_batch_size": 4,
        "num_workers": 0,
    },
    "optim": {"lr": 1.0e-3, "betas": [0.9, 0.9], "weight_decay": 0.0},
    "schedule": {"unit": "steps", "warmup": 50, "min_lr": 1.0e-6},
    "train": {
        "steps": 600,
        "grad_clip": 1.0,
        "ema_decay": 0.999,
        "ema_warmup": True,
        "log_every": 10,
        "checkpoint_every": 200,
        "keep_last": 1,
        "tensorboard": True,
    },
}

DEMO_LOSSES = ("tur", "l1")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = Parser(prog="tur", description="All-in-one image restoration trained with Task Uncertainty Regularization.")
    p.add_argument("--version", action="version", version=f"tur_ext {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="train from a YAML config")
    t.add_argument("config", help="YAML config (see configs/)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100 (repeatable)")
    t.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="'auto': continue from the run folder's newest checkpoint (fresh start if none); or a path")
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many more steps (checkpointed)")
    t.add_argument("--pretrained", default=None, metavar="FILE",
                   help="start from these weights (model.pretrained: a release, a BasicSR or Lightning file; "
                        "a fresh uncertainty head when the file has none)")
    t.add_argument("--out", default=None, metavar="DIR", help="run folder (output_dir; default runs/<name>)")

    e = sub.add_parser("eval", help="per-task PSNR/SSIM of a checkpoint (or of a weights file) on an eval set")
    e.add_argument("checkpoint", nargs="?", default=None,
                   help="a checkpoint file, or a run folder (its newest checkpoint); or use --arch with --weights")
    e.add_argument("--arch", default=None, help="model name (tur_ext.models.available()), with --weights")
    e.add_argument("--weights", default=None,
                   help="weights of any layout load_weights reads (a downloaded release, a BasicSR/Lightning file)")
    e.add_argument("--config", dest="model_config", action="append", default=[], metavar="KEY=VALUE",
                   help="with --arch: a model configuration value, e.g. --config width=16 (repeatable)")
    e.add_argument("--data", dest="data_config", default=None, metavar="CONFIG",
                   help="with --arch: a run config whose data:, tasks: and metric conventions (train.val_*) are used")
    e.add_argument("--tasks", default=None,
                   help="with --arch: a task set or names separated by commas (default: the --data config's, or 3task)")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the checkpoint's (or --data's) config, e.g. --set data.eval_crops_per_task=8")
    e.add_argument("--self-ensemble", action="store_true",
                   help="average over the 8 flips/rotations of every input (x8 test-time augmentation)")
    e.add_argument("--no-ema", action="store_true", help="evaluate params instead of params_ema")
    e.add_argument("--convention", choices=("promptir", "basicsr"), default=None,
                   help="metric convention (default: the run's train.val_convention)")
    e.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    e.add_argument("--out", default=None, help="also write the results as JSON here")

    r = sub.add_parser("report", help="write report.md + plots for a run folder or a folder of runs")
    r.add_argument("run_dir", help="a run folder, or a folder of run folders (a demo's, a study's) to compare")
    r.add_argument("--no-samples", action="store_true", help="skip the restored-samples grid")
    r.add_argument("--html", action="store_true",
                   help="also write report.html: one self-contained page with before/after sliders per task")

    c = sub.add_parser("compare", help="one self-contained HTML page comparing images with a before/after slider")
    c.add_argument("images", nargs="+", help="image files of one scene, all the same size")
    c.add_argument("--out", required=True, help="the HTML file to write")
    c.add_argument("--ref", default=None, help="the clean reference: PSNR/SSIM of every image against it")
    c.add_argument("--names", default=None, help="comma-separated labels, one per image (default: file names)")
    c.add_argument("--title", default=None, help="page title")

    d = sub.add_parser("demo", help="quickstart: TUR vs uniform L1 on the embedded data, evaluated and reported")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--steps", type=int, default=None, help=f"training steps per run (default {QUICKSTART['train']['steps']})")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the quickstart config of both runs")
    d.add_argument("--jobs", type=int, default=None,
                   help="runs trained at the same time, one core each (default: 2 where 2 cores are free)")
    d.add_argument("--no-deploy", dest="deploy", action="store_false",
                   help="skip the deployment step (export to TorchScript and AOTI, restore an image with the runner)")

    st = sub.add_parser("study", help="fidelity study: losses x budgets x seeds (+ TUR knobs), tables and plots")
    st.add_argument("config", help="study YAML (see configs/study_cpu.yaml)")
    st.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a study value, e.g. --set seeds=[0,1] or --set base.data.length=200 (repeatable)")
    st.add_argument("--jobs", type=int, default=None,
                    help="runs trained at the same time, one core each (default: the free cores)")
    st.add_argument("--out", default=None, help="study folder (default runs/<study name>); rerun to resume")

    from . import deploy_cli  # export / restore: each subparser sets ``func``

    deploy_cli.register(sub)
    return p


# --- commands -----------------------------------------------------------------------------------------------------

def cmd_train(args) -> int:
    from .train.config import load_config
    from .train.trainer import Trainer

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"train.resume={args.resume}")
    if args.pretrained is not None:
        if not Path(args.pretrained).is_file():
            raise FileNotFoundError(f"--pretrained: no such file {args.pretrained!r}")
        overrides.append(f"model.pretrained='{args.pretrained}'")
    if args.out is not None:
        overrides.append(f"output_dir='{args.out}'")
    cfg = load_config(args.config, overrides)
    with Trainer(cfg) as trainer:
        summary = trainer.train(max_steps=args.max_steps)
    if trainer.dist.is_main:
        _print_summary(cfg["name"], summary)
    return 0


def _print_summary(name: str, summary: dict) -> None:
    from .train.evaluate import format_table

    print(f"[tur] {name}: {summary['step']}/{summary['total_steps']} steps in {summary['seconds']:.1f} s; "
          f"checkpoint {summary['checkpoint']}")
    if summary.get("metrics"):
        print(format_table({name: summary["metrics"]}))


def cmd_eval(args) -> int:
    from .train.evaluate import format_table, write_json

    if args.arch is not None or args.weights is not None:
        res = _eval_weights(args)
        label = args.arch + ("+" if args.self_ensemble else "")
        print(f"[tur] {res['weights']} ({args.arch}, {res['convention']} convention"
              f"{', x8 self-ensemble' if args.self_ensemble else ''})")
    else:
        res = _eval_checkpoint(args)
        label = ("ema" if not args.no_ema else "params") + ("+" if args.self_ensemble else "")
        print(f"[tur] {res['checkpoint']} (step {res['step']}, {label}, {res['convention']} convention)")
    print(format_table({label: res["tasks"]}))
    if args.out:
        write_json(args.out, res)
    return 0


def _eval_checkpoint(args) -> dict:
    from .train.checkpoint import find_checkpoint, load_checkpoint
    from .train.config import apply_overrides
    from .train.evaluate import evaluate_checkpoint
    from .train.trainer import TRAINER_DATA_KEYS

    if args.checkpoint is None:
        raise ValueError("eval: expected a CHECKPOINT (file or run folder), or --arch NAME --weights FILE")
    for flag, value in (("--config", args.model_config), ("--data", args.data_config), ("--tasks", args.tasks)):
        if value:
            raise ValueError(f"{flag}: only with --arch/--weights (a checkpoint carries its own)")
    data = None
    if args.overrides:
        ckpt = load_checkpoint(find_checkpoint(args.checkpoint))
        cfg = apply_overrides(copy.deepcopy(ckpt.get("config") or {}), args.overrides)
        data = {k: v for k, v in (cfg.get("data") or {}).items() if k not in TRAINER_DATA_KEYS}
        data.setdefault("seed", cfg.get("seed", 0))
    return evaluate_checkpoint(args.checkpoint, data=data, use_ema=not args.no_ema, device=args.device,
                               convention=args.convention, self_ensemble=args.self_ensemble)


def _eval_weights(args) -> dict:
    from .deploy_cli import _parse_config
    from .tasks import TaskSet
    from .train.config import apply_overrides, read_yaml_mapping
    from .train.evaluate import evaluate_weights
    from .train.trainer import TRAINER_DATA_KEYS

    if args.checkpoint is not None:
        raise ValueError("eval: give either CHECKPOINT or --arch with --weights, not both")
    if args.arch is None or args.weights is None:
        raise ValueError("eval: --arch and --weights go together")
    if not Path(args.weights).is_file():
        raise FileNotFoundError(f"--weights: no such file {args.weights!r}")
    if args.no_ema:
        raise ValueError("--no-ema: only with a CHECKPOINT (a weights file holds one set of weights)")
    raw = read_yaml_mapping(args.data_config, "--data") if args.data_config else {}
    raw = apply_overrides(raw, args.overrides)
    data = raw.get("data")
    if not isinstance(data, dict) or not data:
        raise ValueError("eval: --arch/--weights need an eval set: --data CONFIG (its data: section) or "
                         "--set data.type=... (e.g. --set data.type=paired --set data.root=DIR --set data.task=derain)")
    data = {k: v for k, v in data.items() if k not in TRAINER_DATA_KEYS}
    data.setdefault("seed", raw.get("seed", 0))
    tasks = TaskSet(args.tasks if args.tasks is not None else raw.get("tasks", "3task"))
    train = raw.get("train") if isinstance(raw.get("train"), dict) else None
    batch = int((raw.get("data") or {}).get("eval_batch_size", 1))
    return evaluate_weights(args.arch, args.weights, data=data, tasks=tasks, config=_parse_config(args.model_config),
                            train=train, device=args.device, convention=args.convention, batch_size=batch,
                            self_ensemble=args.self_ensemble)


def cmd_report(args) -> int:
    from .report import write_report

    path = write_report(args.run_dir, samples=not args.no_samples, html=args.html)
    print(f"[tur] wrote {path}" + (f" and {path.with_name('report.html')}" if args.html else ""))
    return 0


def cmd_compare(args) -> int:
    from .report_html import compare_images

    names = [n.strip() for n in args.names.split(",")] if args.names is not None else None
    path = compare_images(args.images, args.out, names=names, ref=args.ref, title=args.title)
    print(f"[tur] wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def demo_config(loss: str, out: Path, steps: Optional[int], overrides: Sequence[str] = ()) -> dict:
    from .train.config import load_config

    sets = [f"loss.name={loss}", f"name=demo-{loss}", f"output_dir={out / loss}"]
    if steps is not None:
        sets.append(f"train.steps={steps}")
    return load_config(raw=copy.deepcopy(QUICKSTART), overrides=[*overrides, *sets])


def _demo_worker(cfg: dict, position: int, threads: int, queue) -> None:
    from .train.trainer import train_and_evaluate

    try:
        queue.put((cfg["loss"]["name"], train_and_evaluate(cfg, progress_position=position, threads=threads), None))
    except BaseException as e:  # reported by the parent, which owns the exit status
        queue.put((cfg["loss"]["name"], None, f"{type(e).__name__}: {e}"))


def _demo_jobs(requested: Optional[int]) -> int:
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--jobs: expected >= 1, got {requested}")
        return min(requested, len(DEMO_LOSSES))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(len(DEMO_LOSSES), max(1, cores))


def _logged_step(run_dir) -> int:
    """The last step a run wrote to its log.csv (0 before its first row)."""
    try:
        with open(Path(run_dir) / "log.csv", "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            last = f.read().decode("utf-8", "replace").strip().splitlines()[-1]
        return int(float(last.split(",", 1)[0]))
    except (OSError, IndexError, ValueError):
        return 0


def cmd_demo(args) -> int:
    from .report import write_report
    from .train.evaluate import format_table, write_json
    from .train.trainer import train_and_evaluate

    started = time.perf_counter()
    out = Path(args.out)
    cfgs = {loss: demo_config(loss, out, args.steps, args.overrides) for loss in DEMO_LOSSES}
    jobs = _demo_jobs(args.jobs)
    for cfg in cfgs.values():
        run_dir = Path(cfg["output_dir"])
        if run_dir.exists():
            shutil.rmtree(run_dir)  # the demo's own run folders: every demo starts both runs afresh
    steps = cfgs[DEMO_LOSSES[0]]["train"]["steps"]
    print(f"[tur] demo: nafnet-tiny, 3-task embedded data, {steps} steps per run, losses {', '.join(DEMO_LOSSES)} "
          f"({'side by side, one core each' if jobs > 1 else 'one after the other'})", flush=True)
    results: dict = {}
    if jobs == 1:
        for loss in DEMO_LOSSES:
            results[loss] = train_and_evaluate(cfgs[loss])
    else:
        # Two single-threaded processes use two cores better than one process with two threads: the small
        # convolutions of nafnet-tiny scale poorly across threads, and badly when another program takes a core.
        import multiprocessing as mp
        import queue as queue_mod

        from tqdm import tqdm

        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        # One bar for both runs (two bars redrawn by two processes interleave on one terminal): the workers keep
        # quiet and the parent follows their log.csv files.
        quiet = {loss: {**cfg, "train": {**cfg["train"], "progress": False}} for loss, cfg in cfgs.items()}
        procs = {loss: ctx.Process(target=_demo_worker, args=(quiet[loss], i, 1, queue), name=f"tur-demo-{loss}")
                 for i, loss in enumerate(DEMO_LOSSES)}
        bar = tqdm(total=steps * len(procs), desc="demo (" + " + ".join(procs) + ")", unit="step", dynamic_ncols=True,
                   disable=not cfgs[DEMO_LOSSES[0]]["train"]["progress"])
        errors = []
        finished = False
        try:
            for p in procs.values():
                p.start()
            pending = set(procs)
            while pending:
                bar.update(sum(_logged_step(cfgs[l]["output_dir"]) for l in procs) - bar.n)
                try:
                    loss, res, err = queue.get(timeout=1.0)
                except queue_mod.Empty:
                    # A worker killed outright (out of memory, say) never reports: notice it by its exit code.
                    dead = [l for l in pending if procs[l].exitcode not in (None, 0)]
                    for l in dead:
                        errors.append(f"{l}: the training process died (exit code {procs[l].exitcode})")
                        pending.discard(l)
                    continue
                pending.discard(loss)
                if err is not None:
                    errors.append(f"{loss}: {err}")
                else:
                    results[loss] = res
            finished = True
        finally:
            if finished and not errors:
                bar.update(bar.total - bar.n)
            bar.close()
            for p in procs.values():
                if p.is_alive() and (errors or not finished):
                    p.terminate()  # a failed or interrupted demo does not leave the other run training
                p.join()
        if errors:
            raise RuntimeError("demo run failed: " + "; ".join(errors))
    results = {loss: results[loss] for loss in DEMO_LOSSES}
    write_json(out / "metrics.json", results)
    report = write_report(out, title="tur demo: TUR vs uniform L1 (nafnet-tiny, 3-task, embedded data)", html=True)
    tasks = list(next(iter(results.values())))
    print()
    print("Per-task results on the held-out set (PSNR dB / SSIM, PromptIR convention, EMA weights):")
    print(format_table(results, tasks))
    if args.deploy:
        from .deploy_cli import deploy_demo

        print("\n[tur] deployment: the TUR model without its uncertainty head, exported and run on a held-out image")
        deploy_demo(cfgs["tur"]["output_dir"], out / "deploy")
    print(f"\n[tur] wrote {out / 'metrics.json'}, {report} and {report.with_name('report.html')} "
          f"in {time.perf_counter() - started:.0f} s")
    return 0


def cmd_study(args) -> int:
    from .study import load_study, run_study

    study = load_study(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / study["name"]
    res = run_study(study, out, jobs=args.jobs, log=lambda m: print(m, flush=True))
    print(f"[tur] study {study['name']}: {res['trained']} run(s) trained, {res['skipped']} already done; "
          f"see {out / 'study.md'}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "report": cmd_report, "demo": cmd_demo, "study": cmd_study,
            "compare": cmd_compare}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``tur`` console script; returns the exit status (0 ok, 1 failure, 2 usage/config)."""
    return run_command(build_parser(), COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
