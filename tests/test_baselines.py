"""The comparison losses: l1 is F.l1_loss, uw learns its log-variances, dwa follows Liu et al.'s formula, tur wraps
the fused op; all share one interface."""
import math

import pytest
import torch
import torch.nn.functional as F

from tur_ext.baselines import LOSSES, DynamicWeightAverageLoss, build_loss

TASKS = ["denoise_15", "derain", "dehaze"]


def _batch(seed=0, b=6, c=3, h=5, w=7, ids=(0, 1, 2, 0, 1, 2)):
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(b, c, h, w, generator=g, dtype=torch.float64)
    target = torch.rand(b, c, h, w, generator=g, dtype=torch.float64)
    unc = torch.rand(b, c, h, w, generator=g, dtype=torch.float64) + 0.1
    return pred, target, unc, torch.tensor(ids)


def _manual_task_l1(pred, target, ids, k):
    out = torch.zeros(k, dtype=torch.float64)
    for t in range(k):
        m = ids == t
        if m.any():
            out[t] = (pred[m] - target[m]).abs().mean()
    return out


def test_registry_and_unknown_name():
    assert sorted(LOSSES) == ["dwa", "famo", "l1", "tur", "uw"]
    with pytest.raises(ValueError, match="loss.name"):
        build_loss("mse", TASKS)
    with pytest.raises(TypeError, match="bad options"):
        build_loss("l1", TASKS, temperature=2.0)


def test_l1_equals_f_l1_loss_and_logs_per_task():
    pred, target, _, ids = _batch(ids=(0, 0, 1, 2, 2, 2))  # unbalanced on purpose: the batch mean is not per-task
    pred.requires_grad_(True)
    loss_fn = build_loss("l1", TASKS)
    loss, logs = loss_fn(pred, target, None, ids)
    ref = F.l1_loss(pred, target)
    assert torch.equal(loss, ref)
    torch.testing.assert_close(logs["l1"].double(), _manual_task_l1(pred.detach(), target, ids, 3))
    assert logs["count"].tolist() == [2.0, 1.0, 3.0]
    loss.backward()
    g_ref, = torch.autograd.grad(F.l1_loss(pred, target), pred)
    assert torch.equal(pred.grad, g_ref)


def test_task_names_are_accepted_as_ids():
    pred, target, _, ids = _batch()
    names = [TASKS[i] for i in ids.tolist()]
    loss_fn = build_loss("uw", TASKS)
    a, _ = loss_fn(pred, target, None, ids)
    b, _ = loss_fn(pred, target, None, names)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="task_ids"):
        loss_fn(pred, target, None, torch.tensor([0, 1, 2, 3, 0, 1]))


def test_uw_value_and_gradient_reaches_log_variances():
    pred, target, _, ids = _batch(ids=(0, 0, 2, 2, 0, 2))  # task 1 absent
    loss_fn = build_loss("uw", TASKS, init_log_var=0.0)
    with torch.no_grad():
        loss_fn.log_var.copy_(torch.tensor([0.3, -0.2, -0.7]))
    pred.requires_grad_(True)
    loss, logs = loss_fn(pred, target, None, ids)
    l1 = _manual_task_l1(pred.detach(), target, ids, 3)
    s = torch.tensor([0.3, -0.2, -0.7], dtype=torch.float64)
    present = [0, 2]
    expected = sum(0.5 * math.exp(-s[k]) * l1[k] + 0.5 * s[k] for k in present) / 2
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    loss.backward()
    grad = loss_fn.log_var.grad
    assert grad is not None
    for k in present:  # d/ds_k of (0.5 e^{-s} L + 0.5 s) / M
        assert float(grad[k]) == pytest.approx((0.5 - 0.5 * math.exp(-s[k]) * float(l1[k])) / 2, rel=1e-5)
    assert float(grad[1]) == 0.0  # an absent task gets no gradient
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    torch.testing.assert_close(logs["weight"].float(), 0.5 * torch.exp(-loss_fn.log_var.detach()))


def _offset_batch(offsets, n_per_task=2, size=(3, 4, 4)):
    """pred = target + offset_k for every sample of task k, so each task's L1 is exactly |offset_k|."""
    g = torch.Generator().manual_seed(1)
    ids = torch.arange(len(offsets)).repeat_interleave(n_per_task)
    target = torch.rand(len(ids), *size, generator=g, dtype=torch.float64)
    off = torch.tensor(offsets, dtype=torch.float64)[ids].view(-1, 1, 1, 1)
    return target + off, target, ids


def test_dwa_follows_the_published_formula_on_a_hand_computed_example():
    T = 2.0
    loss_fn = build_loss("dwa", TASKS, temperature=T, period=1).train()
    history = [[0.40, 0.20, 0.10], [0.30, 0.19, 0.12], [0.25, 0.10, 0.11], [0.20, 0.08, 0.11]]
    weights_seen = []
    for step, l in enumerate(history):
        pred, target, ids = _offset_batch(l)
        loss, logs = loss_fn(pred, target, None, ids)
        weights_seen.append(logs["weight"].double())
        expected = sum(float(w) * x for w, x in zip(weights_seen[-1], l)) / 3
        assert float(loss) == pytest.approx(expected, rel=1e-6), step
    # The first two steps (no two completed periods yet) use weight 1.
    assert torch.equal(weights_seen[0], torch.ones(3, dtype=torch.float64))
    assert torch.equal(weights_seen[1], torch.ones(3, dtype=torch.float64))
    # Step 3: w_k = L_k(2) / L_k(1); lambda_k = K exp(w_k / T) / sum_i exp(w_i / T), written out by hand.
    for t in (2, 3):
        w = [history[t - 1][k] / history[t - 2][k] for k in range(3)]
        e = [math.exp(x / T) for x in w]
        lam = [3 * x / sum(e) for x in e]
        assert weights_seen[t].tolist() == pytest.approx(lam, rel=1e-9)
    # Hand numbers for step 3: ratios (0.75, 0.95, 1.2), exp(r / 2) = (1.45499, 1.60804, 1.82212), sum 4.88515,
    # lambda = 3 exp(r / 2) / sum = (0.89352, 0.98750, 1.11898).
    assert weights_seen[2].tolist() == pytest.approx([0.89352, 0.98750, 1.11898], abs=1e-4)


def test_dwa_averages_over_a_period_and_ignores_eval_calls():
    loss_fn = DynamicWeightAverageLoss(TASKS, temperature=1.0, period=2).train()
    seq = [[0.4, 0.2, 0.1], [0.2, 0.2, 0.3], [0.3, 0.1, 0.1], [0.1, 0.1, 0.1]]
    for l in seq:
        pred, target, ids = _offset_batch(l)
        loss_fn(pred, target, None, ids)
        with torch.no_grad():  # validation-style calls must not advance the averages
            loss_fn(pred, target, None, ids)
    p1 = [(a + b) / 2 for a, b in zip(seq[0], seq[1])]
    p2 = [(a + b) / 2 for a, b in zip(seq[2], seq[3])]
    ratio = torch.tensor([b / a for a, b in zip(p1, p2)], dtype=torch.float64)
    torch.testing.assert_close(loss_fn.weights, 3 * torch.softmax(ratio / 1.0, 0))
    assert int(loss_fn.periods_done) == 2 and int(loss_fn.calls) == 4


def test_dwa_state_dict_restores_exactly():
    a = build_loss("dwa", TASKS, period=2).train()
    for l in ([0.4, 0.2, 0.1], [0.3, 0.25, 0.1], [0.2, 0.2, 0.2]):
        a(*_offset_batch(l)[:2], None, _offset_batch(l)[2])
    b = build_loss("dwa", TASKS, period=2).train()
    b.load_state_dict(a.state_dict())
    for l in ([0.1, 0.3, 0.2], [0.2, 0.2, 0.1], [0.3, 0.1, 0.2]):
        pred, target, ids = _offset_batch(l)
        la, ga = a(pred, target, None, ids)
        lb, gb = b(pred, target, None, ids)
        assert torch.equal(la, lb) and torch.equal(ga["weight"], gb["weight"])


def test_tur_wraps_the_fused_op_and_needs_uncertainty():
    from tur_ext import reference

    pred, target, unc, ids = _batch(seed=3)
    pred32, target32, unc32 = pred.float(), target.float(), unc.float()
    loss_fn = build_loss("tur", TASKS, eps=1e-6, reg_weight=2.0)
    assert loss_fn.needs_uncertainty
    loss, logs = loss_fn(pred32, target32, unc32, ids)
    ref = reference.task_uncertainty_loss(pred32, target32, unc32, ids, 3, eps=1e-6, reg_weight=2.0)
    torch.testing.assert_close(loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["loss"], ref.per_task_loss.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["l1"].double(), _manual_task_l1(pred, target, ids, 3), rtol=1e-5, atol=1e-6)
    mean_u = torch.stack([unc[ids == k].mean() for k in range(3)])
    torch.testing.assert_close(logs["uncertainty"].double(), mean_u, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="uncertainty"):
        loss_fn(pred32, target32, None, ids)
