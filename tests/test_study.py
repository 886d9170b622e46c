"""`tur study` on a two-step budget: runs, resume (finished runs skipped, an interrupted run continued from its
checkpoint, bit-identical to an uninterrupted one), aggregation checked against the per-run result files, plots;
and the TUR knobs the study varies (per-task scalar weighting, lambda warm-up, head input) against hand formulas."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from tur_ext import models
from tur_ext.baselines import build_loss
from tur_ext.cli import main
from tur_ext.study import StudyError, load_study, plan, run_config, run_study, validate_study
from tur_ext.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

TINY_STUDY = {
    "name": "tiny",
    "methods": ["l1", "tur"],
    "budgets": [1, 2],
    "seeds": [0, 1, 2],
    "knobs": {"task_scalar": {"loss.weighting": "task"}},
    "base": {
        "tasks": "3task", "device": "cpu",
        "model": {"name": "nafnet-tiny", "width": 8, "enc_blocks": [1, 1], "middle_blocks": 1, "dec_blocks": [1, 1]},
        "data": {"type": "embedded", "patch_size": 16, "length": 10, "eval_crop": 16, "eval_crops_per_task": 1,
                 "batch_size": 5, "eval_batch_size": 5, "eval": {"seed": 0}},
        "optim": {"lr": 1.0e-3},
        "train": {"log_every": 1, "checkpoint_every": 1, "tensorboard": False},
    },
}


def _write_config(path: Path, study: dict) -> Path:
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny study run once through the CLI (in this process, single-threaded runs)."""
    root = tmp_path_factory.mktemp("study")
    cfg = _write_config(root / "tiny.yaml", TINY_STUDY)
    out = root / "out"
    assert main(["study", str(cfg), "--out", str(out), "--jobs", "1"]) == 0
    return cfg, out


def _results(out: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))}


def test_every_run_has_a_result_and_the_outputs_are_written(tiny):
    _, out = tiny
    res = _results(out)
    assert sorted(res) == sorted(s.id for s in plan(load_study(tiny[0])))
    assert len(res) == 2 * 2 * 3 + 3
    for r in res.values():
        assert set(r["tasks"]) == {"denoise_15", "denoise_25", "denoise_50", "derain", "dehaze"}
        assert all(np.isfinite(m["psnr"]) and 0 < m["ssim"] <= 1 for m in r["tasks"].values())
        # finished runs keep their logs, not their checkpoints
        assert (out / "runs" / r["id"] / "log.csv").is_file()
        assert not list((out / "runs" / r["id"]).glob("checkpoints/*.pt"))
    for name in ("psnr_vs_steps.png", "knobs.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000
        img = cv2.imread(str(out / name))
        assert img is not None and img.shape[0] > 100 and img.shape[1] > 200
    md = (out / "study.md").read_text()
    assert "## Outcome" in md and "| tur+task_scalar |" in md and "### 2 steps" in md
    assert "**tur vs l1, 2 steps**" in md


def test_aggregation_matches_hand_computation_from_the_result_files(tiny):
    _, out = tiny
    res = _results(out)
    study = json.loads((out / "study.json").read_text())
    tasks = study["tasks"]
    assert tasks == ["denoise_15", "denoise_25", "denoise_50", "derain", "dehaze"]

    def per_seed(label, steps):
        return [res[f"{label}_steps{steps}_seed{s}"] for s in (0, 1, 2)]

    for method in ("l1", "tur"):
        for steps in (1, 2):
            runs = per_seed(method, steps)
            psnr = np.array([[r["tasks"][t]["psnr"] for t in tasks] for r in runs])  # seeds x tasks
            g = study["summary"][method][str(steps)]
            means, worst = psnr.mean(1), psnr.min(1)
            np.testing.assert_allclose(g["mean_psnr"]["values"], means, rtol=0, atol=1e-12)
            np.testing.assert_allclose(g["mean_psnr"]["mean"], means.mean(), atol=1e-12)
            np.testing.assert_allclose(g["mean_psnr"]["std"], means.std(ddof=1), atol=1e-12)
            np.testing.assert_allclose([g["worst_psnr"][k] for k in ("mean", "std", "min", "max")],
                                       [worst.mean(), worst.std(ddof=1), worst.min(), worst.max()], atol=1e-12)
            assert g["worst_task"] == [tasks[i] for i in psnr.argmin(1)]
            for j, t in enumerate(tasks):
                np.testing.assert_allclose(g["tasks"][t]["psnr"]["mean"], psnr[:, j].mean(), atol=1e-12)
                ssim = np.array([r["tasks"][t]["ssim"] for r in runs])
                np.testing.assert_allclose(g["tasks"][t]["ssim"]["std"], ssim.std(ddof=1), atol=1e-12)
        # differences to l1 are paired by seed
    for steps in (1, 2):
        d = study["vs_l1"]["tur"][str(steps)]
        tur = np.array([np.mean([r["tasks"][t]["psnr"] for t in tasks]) for r in per_seed("tur", steps)])
        l1 = np.array([np.mean([r["tasks"][t]["psnr"] for t in tasks]) for r in per_seed("l1", steps)])
        np.testing.assert_allclose(d["mean_psnr"]["values"], tur - l1, atol=1e-12)
        np.testing.assert_allclose(d["mean_psnr"]["std"], (tur - l1).std(ddof=1), atol=1e-12)
    knob = study["knobs"]["task_scalar"]
    k = np.array([np.mean([r["tasks"][t]["psnr"] for t in tasks]) for r in per_seed("tur+task_scalar", 2)])
    tur2 = np.array([np.mean([r["tasks"][t]["psnr"] for t in tasks]) for r in per_seed("tur", 2)])
    np.testing.assert_allclose(knob["vs_default"]["mean_psnr"]["values"], k - tur2, atol=1e-12)
    assert knob["sets"] == {"loss.weighting": "task"} and study["knob_budget"] == 2
    # the knob really changed the run (different weighting -> different weights after 2 steps)
    assert not np.array_equal(k, tur2)


def test_second_invocation_trains_nothing_and_gives_identical_files(tiny):
    cfg, out = tiny
    before = {p: p.read_bytes() for p in (out / "study.json", out / "study.md")}
    logs = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/log.csv")}
    res = run_study(load_study(cfg), out, jobs=1, log=lambda m: None)
    assert res["trained"] == 0 and res["skipped"] == 15
    assert {p: p.read_bytes() for p in before} == before
    assert {p: p.stat().st_mtime_ns for p in logs} == logs


def test_interrupted_run_resumes_from_its_checkpoint_with_the_same_bits(tiny, tmp_path):
    """A fresh folder, one run trained 1 of its 2 steps (as if killed), then the study: it must continue that run
    from its checkpoint and reproduce the uninterrupted run of the first study exactly (same seeds, same numbers)."""
    _, out = tiny
    study = validate_study({**TINY_STUDY, "methods": ["tur"], "budgets": [2], "seeds": [1], "knobs": {}})
    (spec,) = plan(study)
    cfg = run_config(study, spec, tmp_path)
    with Trainer(cfg) as tr:
        tr.train(max_steps=1)
    ckpts = list((tmp_path / "runs" / spec.id / "checkpoints").glob("*.pt"))
    assert len(ckpts) == 1 and not (tmp_path / "results").exists()
    lines = []
    res = run_study(study, tmp_path, jobs=1, log=lines.append)
    assert res["trained"] == 1
    log_rows = (tmp_path / "runs" / spec.id / "log.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in log_rows[1:]] == ["1", "2"]  # step 1 kept from before, step 2 trained now
    again = json.loads((tmp_path / "results" / f"{spec.id}.json").read_text())["tasks"]
    first = json.loads((out / "results" / f"{spec.id}.json").read_text())["tasks"]
    assert again == first  # bit-for-bit: floats compared exactly


def test_changed_config_retrains_instead_of_reusing_a_stale_result(tiny, tmp_path):
    small = {**TINY_STUDY, "methods": ["l1"], "budgets": [1], "seeds": [0], "knobs": {}}
    study = validate_study(small)
    assert run_study(study, tmp_path, jobs=1, log=lambda m: None)["trained"] == 1
    changed = validate_study({**small, "base": {**small["base"], "optim": {"lr": 5.0e-3}}})
    assert run_study(changed, tmp_path, jobs=1, log=lambda m: None)["trained"] == 1
    assert run_study(changed, tmp_path, jobs=1, log=lambda m: None)["trained"] == 0


@pytest.mark.parametrize("change, key", [
    ({"methods": ["l1", "l2"]}, "methods"),
    ({"budgets": [0, 2]}, "budgets"),
    ({"seeds": []}, "seeds"),
    ({"knob_budget": 5}, "knob_budget"),
    ({"knobs": {"bad": {"loss.nope": 1}}}, r"tur\+bad_steps2_seed0 is invalid.*nope"),
    ({"extra": 1}, "unknown key"),
    ({"methods": ["l1"]}, "knobs"),
])
def test_bad_study_configs_name_the_key(change, key):
    with pytest.raises(StudyError, match=key):
        validate_study({**TINY_STUDY, **change})


def test_cli_reports_a_bad_study_config_with_status_2(tmp_path, capsys):
    cfg = _write_config(tmp_path / "bad.yaml", {**TINY_STUDY, "budgets": "many"})
    assert main(["study", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "budgets" in capsys.readouterr().err


def test_the_shipped_study_configs_are_valid():
    cpu = load_study(ROOT / "configs" / "study_cpu.yaml")
    assert cpu["methods"] == ["l1", "tur", "uw", "dwa"] and len(cpu["seeds"]) >= 3 and len(cpu["budgets"]) >= 3
    assert cpu["base"]["model"]["name"] == "nafnet-tiny"
    gpu = load_study(ROOT / "configs" / "study_gpu.yaml")
    assert max(gpu["budgets"]) > max(cpu["budgets"]) and len(gpu["seeds"]) >= 3


# --- the knobs ------------------------------------------------------------------------------------------------------

def _batch(seed=0, B=6, C=3, H=8, W=10):
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(B, C, H, W, generator=g, dtype=torch.float64)
    target = torch.rand(B, C, H, W, generator=g, dtype=torch.float64)
    unc = torch.rand(B, C, H, W, generator=g, dtype=torch.float64) * 0.5 + 0.05
    ids = torch.tensor([0, 1, 1, 3, 4, 4])
    return pred, target, unc, ids


def test_task_scalar_weighting_is_l1_over_mean_task_uncertainty():
    """weighting='task': loss_k = l1_k / m_k + lambda log m_k, m_k = mean over the task's u (+ eps), as DESIGN.md §1
    with U_k(x) replaced by its mean; gradients by autograd through the hand formula."""
    pred, target, unc, ids = _batch()
    u1 = unc.clone().requires_grad_()
    loss, logs = build_loss("tur", "3task", weighting="task", eps=1e-3, reg_weight=1.5)(pred, target, u1, ids)
    u2 = unc.clone().requires_grad_()
    terms = []
    for k in ids.unique().tolist():
        sel = ids == k
        m = u2[sel].mean(dim=(1, 2, 3)).mean() + 1e-3
        terms.append((pred[sel] - target[sel]).abs().mean() / m + 1.5 * torch.log(m))
    ref = torch.stack(terms).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    g1, = torch.autograd.grad(loss, u1)
    g2, = torch.autograd.grad(ref, u2)
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-14)
    # and it differs from the per-pixel published form on the same inputs
    pixel, _ = build_loss("tur", "3task", eps=1e-3, reg_weight=1.5)(pred, target, unc, ids)
    assert abs(float(pixel.detach()) - float(loss.detach())) > 1e-3


def test_lambda_warmup_ramps_linearly_and_resumes_from_the_state_dict():
    pred, target, unc, ids = _batch(1)
    f = build_loss("tur", "3task", reg_warmup=4, reg_weight=2.0).train()
    seen = []
    for _ in range(3):
        seen.append(f.current_reg_weight())
        f(pred, target, unc.clone().requires_grad_(), ids)
    assert seen == [0.0, 0.5, 1.0]
    # at lambda = 0 the loss is the weighted L1 alone
    g = build_loss("tur", "3task", reg_warmup=4).train()
    loss, logs = g(pred, target, unc.clone().requires_grad_(), ids)
    present = logs["count"] > 0
    torch.testing.assert_close(loss, logs["weighted_l1"][present].double().mean(), rtol=1e-6, atol=1e-7)
    h = build_loss("tur", "3task", reg_warmup=4, reg_weight=2.0)
    h.load_state_dict(f.state_dict())
    assert h.current_reg_weight() == 1.5
    with torch.no_grad():  # evaluation uses the full lambda and does not count
        out_eval, _ = h.eval()(pred, target, unc, ids)
        full, _ = build_loss("tur", "3task")(pred, target, unc, ids)
    torch.testing.assert_close(out_eval, full)
    assert h.current_reg_weight() == 1.5
    # the published default has no counter: its checkpoints keep their keys
    assert list(build_loss("tur", "3task").state_dict()) == []
    with pytest.raises(ValueError, match="reg_warmup"):
        build_loss("tur", "3task", reg_warmup=-1)
    with pytest.raises(ValueError, match="weighting"):
        build_loss("tur", "3task", weighting="channel")


@pytest.mark.parametrize("inp", ["features", "detached", "input"])
def test_head_input_option(inp):
    torch.manual_seed(0)
    net = models.build("nafnet-tiny", uncertainty=True, uncertainty_input=inp, width=8)
    x = torch.rand(2, 3, 16, 16)
    img, unc = net(x)
    assert unc.shape == (2, 3, 16, 16) and bool((unc > 0).all())
    unc.sum().backward()
    backbone_grad = net.intro.weight.grad
    if inp == "features":
        assert backbone_grad is not None and float(backbone_grad.abs().sum()) > 0
        assert "uncertainty_input" not in net.config  # the published default keeps its config keys
    else:
        assert backbone_grad is None  # the uncertainty loss does not shape the backbone
        assert net.config["uncertainty_input"] == inp
    assert net.var_conv[0].in_channels == (3 if inp == "input" else 8)
    again = models.build(net.arch, **net.config)
    again.load_state_dict(net.state_dict())
    torch.testing.assert_close(again(x)[1], net(x)[1])
    if inp == "input":  # the head sees the degraded image alone
        torch.testing.assert_close(unc, net.var_conv(x))
    with pytest.raises(ValueError, match="uncertainty_input"):
        models.build("nafnet-tiny", uncertainty_input=inp if inp != "features" else "image", uncertainty=inp == "features")


def test_parallel_runs_give_the_same_numbers_as_sequential_ones(tiny, tmp_path):
    """--jobs 2 trains in spawned single-threaded processes; the numbers must not depend on it."""
    _, out = tiny
    study = validate_study({**TINY_STUDY, "methods": ["l1"], "budgets": [2], "seeds": [0, 1], "knobs": {}})
    res = run_study(study, tmp_path, jobs=2, log=lambda m: None)
    assert res["trained"] == 2
    for seed in (0, 1):
        rid = f"l1_steps2_seed{seed}"
        par = json.loads((tmp_path / "results" / f"{rid}.json").read_text())["tasks"]
        seq = json.loads((out / "results" / f"{rid}.json").read_text())["tasks"]
        assert par == seq


def test_knob_differences_to_l1_are_paired_by_seed(tiny):
    _, out = tiny
    res = _results(out)
    study = json.loads((out / "study.json").read_text())
    tasks = study["tasks"]

    def means(label):
        return np.array([np.mean([res[f"{label}_steps2_seed{s}"]["tasks"][t]["psnr"] for t in tasks]) for s in (0, 1, 2)])

    d = study["knobs"]["task_scalar"]["vs_l1"]["mean_psnr"]
    np.testing.assert_allclose(d["values"], means("tur+task_scalar") - means("l1"), atol=1e-12)
    assert "Δ mean vs l1" in (out / "study.md").read_text()
