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


def _tiny_cfg(out, *overrides):
    from tur_ext.train.config import load_config

    raw = {
        "name": "tiny", "seed": 0, "output_dir": str(out), "tasks": "3task",
        "model": {"name": "nafnet-tiny", "width": 8}, "loss": {"name": "tur"},
        "data": {"type": "embedded", "patch_size": 16, "length": 20, "eval_crop": 16, "eval_crops_per_task": 1,
                 "batch_size": 5, "eval_batch_size": 5},
        # Adam's eps far above |grad| makes the first update about lr * grad (not lr * sign(grad)), scale-sensitive.
        "optim": {"lr": 0.01, "eps": 1.0}, "schedule": {"warmup": 0},
        "train": {"steps": 1, "log_every": 1, "checkpoint_every": 1, "progress": False, "tensorboard": False,
                  "validate": False},
    }
    return load_config(raw=raw, overrides=list(overrides))


def _update(tr, batches, *, concat: bool):
    """One optimizer step of trainer ``tr`` from ``batches`` (the ranks' batches): one loss on their concatenation
    (global TUR) or the average of the per-batch gradients (local TUR). Returns the parameter change."""
    params = [p for g in tr.optimizer.param_groups for p in g["params"]]
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.model.train()
    if concat:
        batches = [{k: torch.cat([b[k] for b in batches]) for k in ("lq", "gt", "task_id")}]
    grads = []
    for b in batches:
        tr.optimizer.zero_grad(set_to_none=True)
        pred, unc = tr._forward(b["lq"])
        tr.loss_fn(pred, b["gt"].float(), unc, b["task_id"])[0].backward()
        grads.append([p.grad.clone() for p in params])
    for i, p in enumerate(params):
        p.grad = sum(g[i] for g in grads) / len(grads)
    tr.optimizer.step()
    return torch.cat([(p.detach() - before[n]).flatten() for n, p in tr.model.named_parameters()])


@pytest.mark.slow
def test_torchrun_two_processes_with_global_tur_step_like_one_process_on_the_global_batch(tmp_path):
    """torchrun, 2 CPU processes (gloo), loss.sync=global, a total batch of 10 (5 per rank): the weights after one
    step equal those of one process computing TUR on the concatenated 10 samples and stepping once, within 1e-5 of
    the update's size; the local-TUR update (average of the per-rank gradients) is far from it."""
    import socket
    import subprocess
    import sys

    import yaml

    from tur_ext.train.checkpoint import load_checkpoint
    from tur_ext.train.trainer import Trainer

    run = tmp_path / "ddp"
    cfg = _tiny_cfg(run, "data.batch_size=10", "loss.sync=global")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "tur_ext", "train",
                           str(tmp_path / "cfg.yaml")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loss.sync=global: per-task statistics over the global micro-batch of 10" in proc.stdout + proc.stderr
    ck = load_checkpoint(run / "checkpoints" / "step_00000001.pt")

    ref_cfg = _tiny_cfg(tmp_path / "ref", "data.batch_size=5")  # rank r's batch = batch r of this loader
    results = {}
    for concat in (True, False):
        with Trainer(ref_cfg) as tr:
            batches = [b for _, b in zip(range(2), tr.loader)]
            before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
            results[concat] = _update(tr, batches, concat=concat)
    got = torch.cat([(ck["params"][n] - before[n]).flatten() for n in before])
    want = results[True]
    assert want.norm() > 0
    rel = ((got - want).norm() / want.norm()).item()
    assert rel <= 1e-5, rel
    local_off = ((results[False] - want).norm() / want.norm()).item()
    assert local_off > 100 * max(rel, 1e-7), (rel, local_off)
    print(f"global-TUR DDP step vs one process: {rel:.2e} relative; the local-TUR step is {local_off:.2e} away")


def test_gradient_accumulation_gives_the_full_batch_step_for_a_batch_mean_loss(tmp_path):
    """train.accumulate=5 splits the batch of 5 into 5 forward/backward passes; with the l1 loss (a batch mean) the
    step equals the one-pass step. TUR's statistics are then per micro-batch (said in the log line)."""
    from tur_ext.train.trainer import Trainer, describe_batch

    deltas = []
    for a in (1, 5):
        cfg = _tiny_cfg(tmp_path / f"a{a}", "loss.name=l1", f"train.accumulate={a}")
        with Trainer(cfg) as tr:
            before = torch.cat([p.detach().flatten().clone() for p in tr.model.parameters()])
            batch = next(iter(tr.loader))
            loss, logs = tr.train_step(batch)
            deltas.append(torch.cat([p.detach().flatten() for p in tr.model.parameters()]) - before)
            assert int(logs["count"].sum()) == 5
    rel = ((deltas[1] - deltas[0]).norm() / deltas[0].norm()).item()
    assert deltas[0].norm() > 0 and rel < 1e-5, rel
    assert "in 5 micro-batch(es) of 1" in describe_batch(_tiny_cfg(tmp_path, "train.accumulate=5"), 1)
    with pytest.raises(ValueError, match="train.accumulate: the per-process batch 5"):
        Trainer(_tiny_cfg(tmp_path / "bad", "train.accumulate=2"))
