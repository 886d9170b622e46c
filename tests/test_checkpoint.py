"""Checkpoint files: atomic writes (a failed or killed write leaves the previous file loadable), keep-last-K,
weights_only loading, RNG round trips, and a model rebuilt from the checkpoint alone."""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tur_ext import models
from tur_ext.train.checkpoint import (CheckpointManager, atomic_torch_save, build_model_from_checkpoint,
                                     find_checkpoint, load_checkpoint, model_spec, rng_state, save_checkpoint,
                                     set_rng_state)

ROOT = Path(__file__).resolve().parents[1]


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"step": seed, "params": {"w": torch.randn(8, 8, generator=g)}, "note": f"seed {seed}"}


def test_save_load_round_trip_weights_only(tmp_path):
    p = tmp_path / "a.pt"
    st = _state(3)
    save_checkpoint(p, st)
    back = load_checkpoint(p)
    assert back["format"] == "tur_ext.checkpoint" and back["step"] == 3
    assert torch.equal(back["params"]["w"], st["params"]["w"])
    # torch.load(weights_only=True) itself accepts the file: nothing in it needs pickle's code execution.
    torch.load(p, weights_only=True)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    p = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, p)
    with pytest.raises(ValueError, match="not a tur_ext checkpoint"):
        load_checkpoint(p)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(junk)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_serialization_error_after_the_temp_file_is_open_keeps_the_previous(tmp_path):
    p = tmp_path / "ckpt.pt"
    save_checkpoint(p, _state(1))
    before = p.read_bytes()
    bad = {**_state(2), "unpicklable": lambda x: x}  # torch.save fails midway through pickling
    with pytest.raises(Exception):
        save_checkpoint(p, bad)
    assert p.read_bytes() == before
    assert load_checkpoint(p)["step"] == 1
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ckpt.pt"]  # the temp file is gone


_WRITER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[2])
    from tur_ext.train.checkpoint import atomic_torch_save
    big = torch.arange(24_000_000, dtype=torch.float32)  # ~96 MB: a write takes long enough to be caught midway
    i = 1
    while True:
        atomic_torch_save({"format": "tur_ext.checkpoint", "version": 1, "step": i, "big": big + i}, sys.argv[1])
        i += 1
""")


def test_a_write_killed_midway_leaves_the_previous_checkpoint_loadable(tmp_path):
    p = tmp_path / "ckpt.pt"
    save_checkpoint(p, {"step": 0, "big": torch.zeros(3)})
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(p), str(ROOT)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        tmp_seen = False
        while time.time() < deadline and proc.poll() is None:
            if any(x.name.startswith(".ckpt.pt.tmp") and x.stat().st_size > 0 for x in tmp_path.iterdir()):
                tmp_seen = True
                break
            time.sleep(0.001)
        assert tmp_seen, "the writer never started a temporary file"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    ck = load_checkpoint(p)  # whatever was complete before the kill
    step = ck["step"]
    if step:
        assert torch.equal(ck["big"][:5], torch.arange(5, dtype=torch.float32) + step)
    # The half-written temp file is never taken for a checkpoint.
    mgr = CheckpointManager(tmp_path)
    assert mgr.list() == []  # not a step_*.pt name
    assert find_checkpoint(p) == p


def test_manager_keeps_the_last_k_and_ignores_temp_files(tmp_path):
    run = tmp_path / "run"
    mgr = CheckpointManager(run / "checkpoints", keep_last=2)
    for s in (5, 10, 15):
        mgr.save(s, _state(s))
    assert [s for s, _ in mgr.list()] == [10, 15]
    (run / "checkpoints" / ".step_00000020.pt.tmp.123").write_bytes(b"partial")
    assert mgr.latest().name == "step_00000015.pt"
    assert find_checkpoint(run) == mgr.latest()  # a run folder: its newest checkpoint
    assert find_checkpoint(run / "checkpoints") == mgr.latest()
    with pytest.raises(FileNotFoundError, match="no step_"):
        find_checkpoint(tmp_path)
    keep_all = CheckpointManager(tmp_path / "all", keep_last=0)
    for s in (1, 2, 3, 4):
        keep_all.save(s, _state(s))
    assert len(keep_all.list()) == 4
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=-1)


def test_rng_state_round_trip_restores_every_generator(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = rng_state()
    atomic_torch_save(state, tmp_path / "rng.pt")
    draws = (torch.rand(4), np.random.standard_normal(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(4), np.random.standard_normal(3), random.random())
    assert torch.equal(draws[0], again[0])
    assert np.array_equal(draws[1], again[1])
    assert draws[2] == again[2]


def test_a_checkpoint_rebuilds_its_model_alone(tmp_path):
    torch.manual_seed(0)
    model = models.build("nafnet-tiny", uncertainty=True, width=8)
    ema = models.build("nafnet-tiny", uncertainty=True, width=8)
    save_checkpoint(tmp_path / "m.pt", {"step": 1, "model": model_spec(model, True),
                                        "params": model.state_dict(), "params_ema": ema.state_dict()})
    x = torch.rand(2, 3, 16, 24)
    rebuilt = build_model_from_checkpoint(tmp_path / "m.pt", use_ema=False)
    with torch.no_grad():
        a, ua = model.eval()(x)
        b, ub = rebuilt(x)
    assert torch.equal(a, b) and torch.equal(ua, ub)
    rebuilt_ema = build_model_from_checkpoint(tmp_path / "m.pt")  # params_ema by default
    for (k, v), (k2, v2) in zip(ema.state_dict().items(), rebuilt_ema.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    plain = build_model_from_checkpoint(tmp_path / "m.pt", use_ema=False, uncertainty=False)
    with torch.no_grad():
        assert torch.equal(plain(x), a)  # no head, same image
