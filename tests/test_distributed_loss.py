"""The TUR loss over the global batch of 2 gloo ranks (CPU) against the one-process float64 reference on the
concatenated batch: loss, K-long statistics, world_size x gradient convention, and the parameter gradient that
DDP's averaging yields."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tur_ext import reference
from tur_ext.distributed_loss import reduced_values_per_step

WORLD = 2

# (name, C, Cu, spatial, K, ids of rank 0, ids of rank 1, dtype): uneven shards, tasks on one rank only, absent tasks.
CASES = [
    ("per_channel", 3, 3, (5, 7), 5, [0, 0, 1, 2], [1, 3, 3], torch.float64),  # 2 on rank 0 only, 3 on 1, 4 absent
    ("shared_map", 3, 1, (5, 7), 5, [0, 0, 1, 2], [1, 3, 3], torch.float64),
    ("one_task_1d", 2, 2, (11,), 3, [2], [2, 2], torch.float64),  # one task, rank 0 holds a single sample
    ("disjoint_f32", 3, 1, (4, 6), 4, [0, 0], [3, 1, 1], torch.float32),  # no task shared by the two ranks
]


def _case_inputs(case, seed: int = 0):
    """The global batch of a case (float64 master copy) and the split point between the ranks."""
    _, C, Cu, S, K, ids0, ids1, _ = case
    g = torch.Generator().manual_seed(seed)
    B = len(ids0) + len(ids1)
    pred = torch.rand(B, C, *S, generator=g, dtype=torch.float64)
    target = torch.rand(B, C, *S, generator=g, dtype=torch.float64)
    unc = torch.rand(B, Cu, *S, generator=g, dtype=torch.float64) + 0.05
    x = torch.randn(B, 4, generator=g, dtype=torch.float64)  # input of the tiny "model" of the DDP check
    w = torch.randn(C * int(torch.tensor(S).prod()), 4, generator=g, dtype=torch.float64) * 0.3
    return pred, target, unc, torch.tensor(ids0 + ids1), x, w, len(ids0)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from tur_ext import TaskUncertaintyLoss, task_uncertainty_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = []
    try:
        for case in CASES:
            dtype = case[-1]
            pred, target, unc, ids, x, w, split = _case_inputs(case)
            sl = slice(0, split) if rank == 0 else slice(split, None)
            p = pred[sl].to(dtype).requires_grad_()
            t = target[sl].to(dtype).requires_grad_()
            u = unc[sl].to(dtype).requires_grad_()
            out = task_uncertainty_loss(p, t, u, ids[sl], case[4], process_group=dist.group.WORLD)
            out.loss.backward()
            # The DDP statement: a parameter's gradient averaged over the ranks is the one-process gradient.
            wp = w.to(dtype).clone().requires_grad_()
            pm = (x[sl].to(dtype) @ wp.T).reshape(p.shape)
            mod = TaskUncertaintyLoss(case[4], process_group=dist.group.WORLD)
            mod(pm, target[sl].to(dtype), unc[sl].to(dtype), ids[sl].tolist()).loss.backward()
            gw = wp.grad.clone()
            dist.all_reduce(gw)
            gw /= WORLD
            results.append({"out": [v.detach() for v in out], "gp": p.grad, "gt": t.grad, "gu": u.grad, "gw": gw})
        results.append(_baseline_results(rank))
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


BASELINES = {"tur": {}, "uw": {"init_log_var": 0.3}, "dwa": {"period": 1}}


def _baseline_results(rank: int | None) -> dict:
    """(loss, logs, grad of pred) of each baseline: on this rank's shard under the WORLD group, or (rank None) on
    the whole batch in one process. Case 0's split; float64."""
    from tur_ext.baselines import build_loss

    pred, target, unc, ids, _, _, split = _case_inputs(CASES[0])
    sl = slice(None) if rank is None else slice(0, split) if rank == 0 else slice(split, None)
    res = {}
    for name, kw in BASELINES.items():
        fn = build_loss(name, 5, **kw).double()
        if rank is not None:
            fn.process_group = dist.group.WORLD
        p = pred[sl].clone().requires_grad_()
        loss, logs = fn(p, target[sl], unc[sl], ids[sl])
        loss.backward()
        extra = {"log_var_grad": fn.log_var.grad.clone()} if name == "uw" else {}
        res[name] = {"loss": loss.detach(), "logs": {k: v.clone() for k, v in logs.items()}, "gp": p.grad, **extra}
    return res


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist_loss")
    mp.spawn(_worker, args=(str(d / "init"), str(d)), nprocs=WORLD, join=True)
    return [torch.load(d / f"rank{r}.pt") for r in range(WORLD)]


def _reference(case):
    pred, target, unc, ids, x, w, split = _case_inputs(case)
    p, t, u = (v.clone().requires_grad_() for v in (pred, target, unc))
    out = reference.task_uncertainty_loss(p, t, u, ids, case[4])
    out.loss.backward()
    wp = w.clone().requires_grad_()
    reference.task_uncertainty_loss((x @ wp.T).reshape(p.shape), target, unc, ids, case[4]).loss.backward()
    return out, p.grad, t.grad, u.grad, wp.grad, split


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[0] for c in CASES])
def test_global_loss_statistics_and_gradients_match_one_process_on_the_global_batch(ranks, i):
    case = CASES[i]
    tol = dict(rtol=1e-10, atol=1e-12) if case[-1] == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    ref, gp, gt, gu, gw, split = _reference(case)
    for r, res in enumerate(ranks):
        got = res[i]
        names = ("loss", "per_task_loss", "per_task_l1", "per_task_weighted_l1", "per_task_reg")
        for name, a, b in zip(names, got["out"][:5], ref[:5]):
            torch.testing.assert_close(a.double(), b.detach(), **tol, msg=f"rank {r}: {name}")
        assert torch.equal(got["out"][5], ref.counts), f"rank {r}: counts"
        sl = slice(0, split) if r == 0 else slice(split, None)
        for name, a, b in (("pred", got["gp"], gp), ("target", got["gt"], gt), ("uncertainty", got["gu"], gu)):
            assert a.dtype == case[-1]
            torch.testing.assert_close(a.double(), WORLD * b[sl], **tol, msg=f"rank {r}: grad {name}")
        torch.testing.assert_close(got["gw"].double(), gw, **tol, msg=f"rank {r}: averaged parameter gradient")
    # Absent tasks report 0 with count 0 on every rank.
    absent = ref.counts == 0
    assert all(bool((res[i]["out"][1][absent] == 0).all()) for res in ranks)


@pytest.mark.parametrize("name", list(BASELINES))
def test_baselines_task_statistics_and_gradients_are_those_of_the_global_batch(ranks, name):
    """tur, uw and dwa with ``process_group`` set: loss, logged per-task l1 and count, and world x grad of pred equal
    the loss module on the concatenated batch in one process (uw: the same log-variance gradient on every rank)."""
    ref = _baseline_results(None)[name]
    split = len(CASES[0][5])
    for r, res in enumerate(ranks):
        got = res[-1][name]
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-12, atol=1e-14)
        for key in ("l1", "count", "loss", "weight"):
            torch.testing.assert_close(got["logs"][key], ref["logs"][key], rtol=1e-12, atol=1e-14, equal_nan=True,
                                       msg=f"rank {r}: logs[{key!r}]")
        sl = slice(0, split) if r == 0 else slice(split, None)
        torch.testing.assert_close(got["gp"], WORLD * ref["gp"][sl], rtol=1e-12, atol=1e-14)
        if name == "uw":
            torch.testing.assert_close(got["log_var_grad"], ref["log_var_grad"], rtol=1e-12, atol=1e-14)


def test_the_local_loss_differs_so_the_test_can_fail():
    """On a split where U_k differs per rank the local (per-rank) loss is not the global one."""
    pred, target, unc, ids, _, _, split = _case_inputs(CASES[0])
    glob = reference.task_uncertainty_loss(pred, target, unc, ids, 5).loss
    loc = [reference.task_uncertainty_loss(pred[s], target[s], unc[s], ids[s], 5).loss
           for s in (slice(0, split), slice(split, None))]
    assert abs(float(sum(loc) / 2 - glob)) > 1e-3


def test_reduced_values_per_step():
    # One all_reduce of [S, E, n]: 2 K Cu P + K values.
    assert reduced_values_per_step(5, 3, 128 * 128) == 2 * 5 * 3 * 16384 + 5
    assert reduced_values_per_step(3, 1, 10) == 63


def test_without_torch_distributed_the_distributed_path_says_so():
    from tur_ext import task_uncertainty_loss

    x = torch.rand(2, 1, 3, 3)
    with pytest.raises(RuntimeError, match="process_group: torch.distributed is not initialised"):
        task_uncertainty_loss(x, x, x + 0.1, [0, 1], 2, process_group=object())
