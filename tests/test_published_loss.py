"""variant="published": the released 3/5-task TUR loss, checked against a line-by-line float64 transcription of
the TUR code's loop (its lists of weighted samples never cleared); and the FAMO baseline."""
import math

import pytest
import torch
import torch.nn.functional as F

import tur_ext
from tur_ext.baselines import FAMOLoss, build_loss
from tur_ext.published_loss import published_task_uncertainty_loss


def transcription(pred, target, unc, ids, num_tasks, eps=1e-6):
    """The TUR code's airnet_uncertainty_loss, step by step: group the samples by task id, then walk the ids in
    order, appending every task's 1/U-scaled samples to two lists kept across tasks."""
    groups = {k: ([], [], []) for k in range(num_tasks)}
    for p, t, u, k in zip(pred, target, unc, ids.tolist()):
        groups[k][0].append(t)
        groups[k][1].append(p)
        groups[k][2].append(u)
    total, terms, num = 0, [0.0] * num_tasks, 0
    scaled_gt, scaled_pred = [], []
    for k in range(num_tasks):
        gts, preds, uncs = groups[k]
        if not gts:
            continue
        u_map = torch.mean(torch.stack(uncs), dim=0) + eps
        s = 1.0 / u_map
        num += 1
        for t, p in zip(gts, preds):
            scaled_gt.append(t * s)
            scaled_pred.append(p * s)
        reg = 2 * torch.log(torch.mean(u_map))
        term = F.l1_loss(torch.stack(scaled_gt), torch.stack(scaled_pred), reduction="mean") + reg
        terms[k] = term.detach()
        total = total + term
    return total / num, terms


CASES = [  # (ids, K, Cu): task orders, absent tasks, repeated tasks, one task
    ([3, 0, 0, 4, 1, 3, 2], 5, 3),
    ([4, 4, 1], 5, 1),
    ([2, 0, 6, 5, 0, 2, 6, 1], 7, 3),
    ([1, 1, 1], 3, 3),
    ([0], 5, 1),
]


@pytest.mark.parametrize("ids,k,cu", CASES)
def test_published_variant_matches_the_transcription_with_gradients(ids, k, cu):
    g = torch.Generator().manual_seed(len(ids) * 31 + k)
    b = len(ids)
    pred = torch.rand(b, 3, 9, 7, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.rand(b, 3, 9, 7, generator=g, dtype=torch.float64)
    unc = (torch.rand(b, cu, 9, 7, generator=g, dtype=torch.float64) * 2 + 0.05).requires_grad_()
    ids_t = torch.tensor(ids)
    out = tur_ext.task_uncertainty_loss(pred, target, unc, ids_t, k, variant="published")
    want, terms = transcription(pred, target, unc, ids_t, k)
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.per_task_loss, torch.stack([torch.as_tensor(t, dtype=torch.float64)
                                                               for t in terms]), rtol=1e-12, atol=1e-15)
    g_out = torch.autograd.grad(out.loss, (pred, unc))
    g_want = torch.autograd.grad(want, (pred, unc))
    for a, w in zip(g_out, g_want):
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-14)
    assert out.counts.tolist() == [ids.count(i) for i in range(k)]


def test_published_differs_from_per_task_only_through_the_cumulative_lists():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(6, 3, 8, 8, generator=g), torch.rand(6, 3, 8, 8, generator=g)
    unc = torch.rand(6, 3, 8, 8, generator=g) + 0.1
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    per_task = tur_ext.task_uncertainty_loss(pred, target, unc, ids, 3)
    pub = tur_ext.task_uncertainty_loss(pred, target, unc, ids, 3, variant="published")
    # The first task's list holds only its own samples; the regulariser and plain L1 are the same in both.
    torch.testing.assert_close(pub.per_task_weighted_l1[0], per_task.per_task_weighted_l1[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(pub.per_task_reg, per_task.per_task_reg, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pub.per_task_l1, per_task.per_task_l1, rtol=1e-6, atol=0)
    # Later tasks: the mean of the weighted L1 of every task so far, weighted by their counts (2 each here).
    wl1 = per_task.per_task_weighted_l1.double()
    torch.testing.assert_close(pub.per_task_weighted_l1.double(), torch.stack(
        [wl1[0], (wl1[0] + wl1[1]) / 2, wl1.mean()]), rtol=1e-5, atol=0)
    assert abs(float(pub.loss) - float(per_task.loss)) > 1e-4


def test_published_variant_through_the_module_the_baseline_and_errors():
    loss = tur_ext.TaskUncertaintyLoss("3task", variant="published")
    assert "variant='published'" in repr(loss)
    tur = build_loss("tur", "3task", variant="published")
    pred, target = torch.rand(5, 3, 8, 8), torch.rand(5, 3, 8, 8)
    unc = torch.rand(5, 3, 8, 8) + 0.1
    names = ["denoise_15", "denoise_25", "denoise_50", "derain", "dehaze"]
    value, logs = tur(pred, target, unc, names)
    direct = published_task_uncertainty_loss(pred, target, unc, torch.arange(5), 5)
    assert torch.equal(value, direct.loss) and torch.equal(loss(pred, target, unc, names).loss, direct.loss)
    with pytest.raises(ValueError, match="variant: expected one of"):
        tur_ext.TaskUncertaintyLoss("3task", variant="cumulative")
    with pytest.raises(ValueError, match="variant: expected one of"):
        tur_ext.task_uncertainty_loss(pred, target, unc, torch.arange(5), 5, variant="x")
    with pytest.raises(ValueError, match="uncertainty"):
        published_task_uncertainty_loss(pred, target, unc[:, :2], torch.arange(5), 5)


def _famo_reference(steps, w_lr=0.025, gamma=0.01, eps=1e-8):
    """FAMO's logit update and model weights written out with Python floats (every task present every step)."""
    k = len(steps[0])
    xi, m, v = [0.0] * k, [0.0] * k, [0.0] * k
    weights, prev = [], None
    for t, losses in enumerate(steps):
        if prev is not None:
            delta = [math.log(a + eps) - math.log(b + eps) for a, b in zip(prev, losses)]
            e = [math.exp(x) for x in xi]
            z = [x / sum(e) for x in e]
            dz = sum(zi * di for zi, di in zip(z, delta))
            grad = [zi * (di - dz) + gamma * x for zi, di, x in zip(z, delta, xi)]
            n = len(weights)  # this is update number n (none before the second call)
            m = [0.9 * a + 0.1 * g for a, g in zip(m, grad)]
            v = [0.999 * a + 0.001 * g * g for a, g in zip(v, grad)]
            mh = [a / (1 - 0.9 ** n) for a in m]
            vh = [a / (1 - 0.999 ** n) for a in v]
            xi = [x - w_lr * a / (math.sqrt(b) + 1e-8) for x, a, b in zip(xi, mh, vh)]
        e = [math.exp(x) for x in xi]
        z = [x / sum(e) for x in e]
        d = [l + eps for l in losses]
        c = sum(zi / di for zi, di in zip(z, d))
        weights.append([zi / (c * di) for zi, di in zip(z, d)])
        prev = losses
    return weights


def test_famo_weights_follow_the_written_out_update():
    torch.manual_seed(0)
    famo = FAMOLoss(["a", "b", "c"]).train()
    ids = torch.tensor([0, 1, 2, 0, 1, 2])
    seen, got = [], []
    for step in range(6):
        pred = torch.rand(6, 3, 4, 4, dtype=torch.float64, requires_grad=True)
        target = torch.rand(6, 3, 4, 4, dtype=torch.float64) * (1 + step) / 6
        loss, logs = famo(pred, target, None, ids)
        seen.append([float(x) for x in logs["l1"]])
        got.append([float(x) for x in logs["weight"]])
        # The model's gradient is the weighted sum of the task L1 gradients, weights summing to 1.
        (gp,) = torch.autograd.grad(loss, pred)
        per_sample = torch.tensor([got[-1][i] / 2 for i in ids.tolist()], dtype=torch.float64)
        want = torch.sign(pred - target) * per_sample.view(6, 1, 1, 1) / (3 * 16)
        torch.testing.assert_close(gp, want.detach(), rtol=1e-10, atol=1e-14)
    for a, w in zip(got, _famo_reference(seen)):
        assert a == pytest.approx(w, rel=1e-9)
        assert sum(a) == pytest.approx(1.0, rel=1e-12)
    assert got[0] != got[-1]


def test_famo_absent_tasks_state_and_errors():
    famo = FAMOLoss("3task").train()
    pred, target = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    _, logs = famo(pred, target, None, ["derain", "dehaze"])
    w = logs["weight"]
    assert torch.isnan(w[:3]).all() and float(w[3:].sum()) == pytest.approx(1.0, rel=1e-6)
    famo(pred * 0.5, target, None, ["derain", "dehaze"])
    state = famo.state_dict()
    assert {"logits", "adam_m", "adam_v", "adam_t", "prev_loss", "prev_present"} <= set(state)
    again = FAMOLoss("3task")
    again.load_state_dict(state)
    assert torch.equal(again.logits, famo.logits) and int(again.adam_t) == 1
    with pytest.raises(ValueError, match="w_lr"):
        FAMOLoss("3task", w_lr=0)
    with pytest.raises(ValueError, match="gamma"):
        FAMOLoss("3task", gamma=-1)


def test_the_long_study_and_a_tiny_one_with_famo_and_the_published_loss(tmp_path):
    import json
    from pathlib import Path

    from tur_ext.study import load_study, plan, run_study, validate_study

    root = Path(__file__).resolve().parents[1]
    long = load_study(root / "configs" / "study_long.yaml")
    assert long["methods"] == ["l1", "tur", "famo"] and long["budgets"] == [3000, 6000]
    assert len(long["seeds"]) == 3 and set(long["knobs"]) == {"head_detached", "published"}
    assert sum(r.steps for r in plan(long)) == 117_000
    tiny = validate_study({
        "name": "t", "methods": ["tur", "famo"], "budgets": [2], "seeds": [0],
        "knobs": {"published": {"loss.variant": "published"}},
        "base": {"tasks": "3task", "device": "cpu",
                 "model": {"name": "nafnet-tiny", "width": 8, "enc_blocks": [1], "middle_blocks": 1,
                           "dec_blocks": [1]},
                 "data": {"type": "embedded", "patch_size": 16, "length": 10, "eval_crop": 16,
                          "eval_crops_per_task": 1, "batch_size": 5, "eval_batch_size": 5},
                 "train": {"log_every": 1, "checkpoint_every": 2, "tensorboard": False, "progress": False}}})
    res = run_study(tiny, tmp_path / "s", jobs=1, log=lambda m: None)
    assert res["trained"] == 3
    results = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "s" / "results").glob("*.json")}
    assert set(results) == {"tur_steps2_seed0", "famo_steps2_seed0", "tur+published_steps2_seed0"}
    cfg = yaml_load(tmp_path / "s" / "runs" / "tur+published_steps2_seed0" / "config.yaml")
    assert cfg["loss"]["variant"] == "published"


def yaml_load(path):
    import yaml

    return yaml.safe_load(path.read_text())
