"""The tur command line: train / eval / report / demo, as `python -m tur_ext` subprocesses and through main(argv)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tur_ext.cli import main
from tur_ext.train.checkpoint import CheckpointManager

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["denoise_15", "denoise_25", "denoise_50", "derain", "dehaze"]

TINY = {
    "name": "cli", "tasks": "3task",
    "model": {"name": "nafnet-tiny", "width": 8},
    "loss": {"name": "tur"},
    "data": {"type": "embedded", "patch_size": 16, "length": 10, "eval_crop": 16, "eval_crops_per_task": 1,
             "batch_size": 5, "eval_batch_size": 5},
    "train": {"steps": 2, "log_every": 1, "checkpoint_every": 2, "progress": False, "tensorboard": False},
}
TINY_SETS = ["model.width=8", "data.patch_size=16", "data.length=10", "data.batch_size=5", "data.eval_crop=16",
             "data.eval_crops_per_task=1", "train.progress=false", "train.tensorboard=false", "train.log_every=1"]


def _sets(items):
    return [x for s in items for x in ("--set", s)]


def _module(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tur_ext", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def config_file(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


def test_python_m_tur_ext_train_eval_report(tmp_path, config_file):
    run = tmp_path / "run"
    r = _module("train", str(config_file), "--set", f"output_dir={run}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2/2 steps" in r.stdout and "denoise_15" in r.stdout
    assert (run / "checkpoints" / "step_00000002.pt").is_file()

    out = tmp_path / "eval.json"
    r = _module("eval", str(run), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["step"] == 2 and list(res["tasks"]) == TASKS
    assert all(5 < res["tasks"][t]["psnr"] < 60 for t in TASKS)
    # The eval command reproduces the trainer's own final validation (same EMA weights, same held-out set).
    val = json.loads((run / "metrics.json").read_text())["tasks"]
    for t in TASKS:
        assert res["tasks"][t]["psnr"] == pytest.approx(val[t]["psnr"], abs=1e-9)

    r = _module("report", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    md = (run / "report.md").read_text()
    for png in ("curves.png", "uncertainty.png", "psnr.png", "samples.png"):
        assert f"]({png})" in md and (run / png).stat().st_size > 1000


def test_train_resume_eval_options_and_report_in_process(tmp_path, config_file, capsys):
    run = tmp_path / "run"
    assert main(["train", str(config_file), "--set", f"output_dir={run}", "--set", "train.steps=4",
                 "--max-steps", "2"]) == 0
    assert [s for s, _ in CheckpointManager(run / "checkpoints").list()] == [2]
    assert main(["train", str(config_file), "--set", f"output_dir={run}", "--set", "train.steps=4",
                 "--resume", "auto"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert CheckpointManager(run / "checkpoints").latest().name == "step_00000004.pt"

    ck = run / "checkpoints" / "step_00000004.pt"
    out = tmp_path / "e.json"
    assert main(["eval", str(ck), "--no-ema", "--convention", "basicsr", "--set", "data.eval_crops_per_task=2",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["convention"] == "basicsr" and res["tasks"]["derain"]["count"] == 2
    assert "params" in capsys.readouterr().out
    assert main(["report", str(run), "--no-samples"]) == 0
    assert not (run / "samples.png").exists() and (run / "report.md").is_file()


def test_demo_compares_tur_and_l1(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "2", "--no-deploy", *_sets(TINY_SETS)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["tur", "l1"]
    for loss in ("tur", "l1"):
        assert list(metrics[loss]) == TASKS
        for t in TASKS:
            assert set(metrics[loss][t]) == {"psnr", "ssim"}
            assert 5 < metrics[loss][t]["psnr"] < 60 and -1 < metrics[loss][t]["ssim"] <= 1
        cfg = yaml.safe_load((out / loss / "config.yaml").read_text())
        assert cfg["loss"]["name"] == loss and cfg["seed"] == 0 and cfg["train"]["steps"] == 2
    md = (out / "report.md").read_text()
    assert "| denoise_15 |" in md and "tur PSNR" in md and "l1 PSNR" in md
    for png in ("curves.png", "uncertainty.png", "psnr.png", "samples.png"):
        assert (out / png).is_file()
    # The per-task table is printed at the end, with the numbers of metrics.json.
    table = printed[printed.index("Per-task results"):]
    for t in TASKS:
        assert t in table
    assert f"{metrics['tur']['dehaze']['psnr']:.2f}" in table and f"{metrics['l1']['dehaze']['psnr']:.2f}" in table

    # One after the other in this process (--jobs 1) trains the same two runs as side by side.
    seq = tmp_path / "demo_seq"
    assert main(["demo", "--out", str(seq), "--steps", "2", "--jobs", "1", "--no-deploy", *_sets(TINY_SETS)]) == 0
    again = json.loads((seq / "metrics.json").read_text())
    for loss in ("tur", "l1"):
        for t in TASKS:
            assert again[loss][t]["psnr"] == pytest.approx(metrics[loss][t]["psnr"], abs=1e-3)
    assert main(["demo", "--out", str(seq), "--jobs", "0"]) == 1


def test_errors_exit_with_a_message(tmp_path, config_file, capsys):
    assert main(["train", str(config_file), "--set", "train.stepz=3"]) == 2
    assert "train.stepz" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nothing_here")]) == 1
    assert "nothing_here" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 1
    assert "log.csv" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert main([]) == 2


def test_errors_are_one_line_and_debug_adds_the_traceback(tmp_path, capsys, monkeypatch):
    from tur_ext.cli_support import Parser, run_command

    missing = str(tmp_path / "missing.yaml")
    assert main(["train", missing]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "missing.yaml" in err
    assert main(["train", missing, "--debug"]) == 1  # the flag may follow the subcommand's arguments
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.splitlines()[-1].startswith("tur train: error:")
    monkeypatch.setenv("TUR_DEBUG", "1")
    assert main(["train", missing]) == 1 and "Traceback" in capsys.readouterr().err
    monkeypatch.delenv("TUR_DEBUG")

    def broken(args):  # an error no handler names (a bug): one line, exit 1, and how to see more
        return {}["no such key"]

    parser = Parser(prog="tur")
    parser.add_subparsers(dest="command", required=True, parser_class=Parser).add_parser("go")
    assert run_command(parser, {"go": broken}, ["go"]) == 1
    assert capsys.readouterr().err == "tur go: unexpected error: KeyError: 'no such key' (rerun with --debug for the traceback)\n"
    assert run_command(parser, {"go": broken}, ["--debug", "go"]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert "--debug" in parser.format_help()


def test_help_lists_the_commands():
    r = _module("--help")
    assert r.returncode == 0
    for cmd in ("train", "eval", "report", "demo", "export", "restore"):
        assert cmd in r.stdout


def test_python_m_tur_ext_ops_reports_the_backend_that_is_installed():
    """`python -m tur_ext.ops` and ops.backend() against evidence of their own: whether the compiled module's file
    is installed, whether the dispatcher holds a CPU kernel for the op, and what CI requires
    (TUR_REQUIRE_COMPILED=1)."""
    import importlib.util

    import torch

    from tur_ext import ops

    found = importlib.util.find_spec("tur_ext._C")
    installed = found is not None and found.origin is not None and Path(found.origin).is_file()
    if os.environ.get("TUR_REQUIRE_COMPILED") == "1":
        assert installed, "TUR_REQUIRE_COMPILED=1 but tur_ext._C is not installed"
    proc = subprocess.run([sys.executable, "-m", "tur_ext.ops"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "TUR_REQUIRE_COMPILED": "0"})
    assert proc.returncode == 0, proc.stderr
    printed = {key: value.strip() for key, _, value in (line.partition(" ") for line in proc.stdout.splitlines())}
    expected = "compiled" if installed else "reference"
    assert printed["backend"] == ops.backend() == expected
    assert printed["torch_runtime"] == torch.__version__
    registered = (hasattr(torch.ops.tur, "task_uncertainty_loss")
                  and torch._C._dispatch_has_kernel_for_dispatch_key(ops.OP_NAME, "CPU"))
    assert registered == installed
    if installed:
        assert printed["torch_version"].split("+")[0] == torch.__version__.split("+")[0]


def test_the_cli_sits_on_top():
    """No module of the package imports the ``tur`` entry point (``tur_ext.cli``) but ``__main__``: the library
    and the export/restore subcommands work without it."""
    import ast

    import tur_ext

    root = Path(tur_ext.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        module = ["tur_ext", *path.relative_to(root).with_suffix("").parts]
        if module in (["tur_ext", "cli"], ["tur_ext", "__main__"]):
            continue
        package = module[:-1] if path.name != "__init__.py" else module[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - (node.level - 1)] if node.level else []
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                imported = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                imported = [a.name for a in node.names]
            else:
                continue
            if "tur_ext.cli" in imported:
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []
