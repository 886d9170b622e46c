"""Datasets on tiny trees written with OpenCV in the public layouts, the embedded data, config builders, the sampler."""
import os

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tur_ext.data import (EVAL_IMAGES, TRAIN_IMAGES, EmbeddedEvalDataset, EmbeddedTrainDataset, ImageReadError,
                          TaskBalancedBatchSampler, build_eval_dataset, build_eval_loader, build_train_dataset,
                          build_train_loader, read_image)
from tur_ext.data.transforms import dihedral
from tur_ext.tasks import TaskSet

TASKS3 = TaskSet("3task")


# ----------------------------------------------------------------------------- tree builders

def _png(path, h=40, w=48, seed=0):
    """A smooth random colour image (so crops are distinguishable), written as 8-bit with OpenCV."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return str(path)


def make_promptir_tree(root, n_clean=3, n_rain=2):
    for i in range(n_clean):
        _png(root / "Train" / "Denoise" / f"{i:04d}.png", seed=i)
    for i in range(1, n_rain + 1):
        _png(root / "Train" / "Derain" / "rainy" / f"rain-{i}.png", seed=100 + i)
        _png(root / "Train" / "Derain" / "gt" / f"norain-{i}.png", seed=200 + i)
    _png(root / "Train" / "Dehaze" / "synthetic" / "part1" / "0001_0.8_0.2.jpg", seed=300)
    _png(root / "Train" / "Dehaze" / "synthetic" / "part2" / "0002_0.9_0.1.jpg", seed=301)
    _png(root / "Train" / "Dehaze" / "original" / "0001.jpg", seed=310)
    _png(root / "Train" / "Dehaze" / "original" / "0002.jpg", seed=311)
    for i in range(2):
        _png(root / "test" / "denoise" / "bsd68" / f"{i}.png", h=40, w=50, seed=400 + i)
    for i in range(2):
        _png(root / "test" / "derain" / "Rain100L" / "input" / f"rain-{i:03d}.png", seed=500 + i)
        _png(root / "test" / "derain" / "Rain100L" / "target" / f"rain-{i:03d}.png", seed=600 + i)
    _png(root / "test" / "dehaze" / "input" / "0001_0.8_0.2.jpg", seed=700)
    _png(root / "test" / "dehaze" / "target" / "0001.png", seed=701)
    return root


def make_pair_tree(root, lq, gt, split_dirs, n=2, seq=None):
    for split in split_dirs:
        for i in range(n):
            base = root / split / seq if seq else root / split
            _png(base / lq / f"{i:06d}.png", seed=800 + i)
            _png(base / gt / f"{i:06d}.png", seed=900 + i)
    return root


# ----------------------------------------------------------------------------- PromptIR / AirNet 3-task tree

def test_promptir3_train_tree(tmp_path):
    make_promptir_tree(tmp_path)
    ds = build_train_dataset({"type": "promptir3", "root": str(tmp_path), "patch_size": 32, "augment": False},
                             TASKS3)
    assert len(ds) == 3 * 3 + 2 + 2  # each noise level is a task over the same 3 clean images
    assert ds.tasks_present == list(TASKS3)
    assert [ds.task_of(i) for i in range(len(ds))].count("denoise_25") == 3
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"lq", "gt", "task", "task_id"}
        assert item["lq"].shape == (3, 32, 32) and item["lq"].dtype == torch.float32
        assert item["task_id"] == TASKS3.id(item["task"]) == ds.task_ids[i]
        assert 0 <= item["lq"].min() and item["lq"].max() <= 1
    # a derain patch is the same window of the rainy file and of its norain- ground truth
    i = ds.task_ids.index(TASKS3.id("derain"))
    lq_path, gt_path = ds.records[i][1], ds.records[i][2]
    assert os.path.basename(lq_path) == "rain-1.png" and os.path.basename(gt_path) == "norain-1.png"
    item = ds[i]
    lq_full, gt_full = read_image(lq_path), read_image(gt_path)
    g = item["gt"].permute(1, 2, 0).numpy()
    hits = [(y, x) for y in range(40 - 31) for x in range(48 - 31)
            if np.array_equal(gt_full[y:y + 32, x:x + 32], g)]
    assert len(hits) == 1
    y, x = hits[0]
    np.testing.assert_array_equal(item["lq"].permute(1, 2, 0).numpy(), lq_full[y:y + 32, x:x + 32])
    # dehaze pairs ID_A_B.jpg with original/ID.jpg, from any part folder
    pairs = {os.path.basename(r[1]): os.path.basename(r[2]) for r in ds.records if r[0] == "dehaze"}
    assert pairs == {"0001_0.8_0.2.jpg": "0001.jpg", "0002_0.9_0.1.jpg": "0002.jpg"}
    # denoise: gt is clean, lq - gt is noise of the task's sigma
    j = ds.task_ids.index(TASKS3.id("denoise_50"))
    it = ds[j]
    assert 35 < float((it["lq"] - it["gt"]).std()) * 255 < 60


def test_promptir3_train_keys_wrap_with_fresh_randomness(tmp_path):
    make_promptir_tree(tmp_path)
    ds = build_train_dataset({"type": "promptir3", "root": str(tmp_path), "patch_size": 24}, TASKS3)
    a, b, c = ds[3], ds[3], ds[3 + len(ds)]
    assert torch.equal(a["lq"], b["lq"]) and torch.equal(a["gt"], b["gt"])
    assert a["task"] == c["task"] and not torch.equal(a["gt"], c["gt"])


def test_promptir3_test_tree(tmp_path):
    make_promptir_tree(tmp_path)
    ds = build_eval_dataset({"type": "promptir3", "root": str(tmp_path)}, TASKS3)
    assert len(ds) == 3 * 2 + 2 + 1
    counts = {t: [ds.task_of(i) for i in range(len(ds))].count(t) for t in TASKS3}
    assert counts == {"denoise_15": 2, "denoise_25": 2, "denoise_50": 2, "derain": 2, "dehaze": 1}
    first = [ds[i] for i in range(len(ds))]
    again = [ds[i] for i in range(len(ds))]
    for a, b in zip(first, again):
        assert torch.equal(a["lq"], b["lq"])  # fixed noise
    d15 = first[ds.task_ids.index(TASKS3.id("denoise_15"))]
    assert d15["gt"].shape == (3, 32, 48)  # 40x50 cropped to multiples of 16
    assert 12 < float((d15["lq"] - d15["gt"]).std()) * 255 < 18
    dh = [r for r in ds.records if r[0] == "dehaze"][0]
    assert os.path.basename(dh[2]) == "0001.png"
    with pytest.raises(IndexError):
        ds[len(ds)]
    # centre crops make the set stackable
    ds2 = build_eval_dataset({"type": "promptir3", "root": str(tmp_path), "eval_crop": 16, "max_eval_images": 1},
                             TASKS3)
    assert len(ds2) == 5
    batch = next(iter(build_eval_loader(ds2, batch_size=5)))
    assert batch["lq"].shape == (5, 3, 16, 16)


def test_unreadable_image_stops_with_path_or_is_skipped_and_counted(tmp_path):
    make_promptir_tree(tmp_path)
    bad = tmp_path / "Train" / "Derain" / "rainy" / "rain-3.png"
    bad.write_bytes(b"this is not a png")
    _png(tmp_path / "Train" / "Derain" / "gt" / "norain-3.png", seed=9)
    cfg = {"type": "promptir3", "root": str(tmp_path), "patch_size": 16}
    # a foreign file is found from its header when the dataset is built, before any training step
    with pytest.raises(ImageReadError, match="rain-3.png.*OpenCV.*checked before training.*skip_bad_images"):
        build_train_dataset(cfg, TASKS3)
    # one whose header and end are intact but whose pixel data is damaged is found when drawn
    _png(bad, seed=3)
    data = bytearray(bad.read_bytes())
    data[60:-20] = bytes(len(data) - 80)
    bad.write_bytes(bytes(data))
    ds = build_train_dataset(cfg, TASKS3)
    with pytest.raises(ImageReadError, match="rain-3.png"):
        for i in range(len(ds)):
            ds[i]
    # through a worker process the loader re-raises the same type, still naming the file
    bad_index = [i for i, r in enumerate(ds.records) if r[1] == str(bad)][0]
    it = iter(DataLoader(ds, sampler=[bad_index], num_workers=1))
    try:
        with pytest.raises(ImageReadError, match="rain-3.png") as ei:
            next(it)
        assert ei.value.path == str(bad) and "skip_bad_images" in str(ei.value)
        assert "\n" not in str(ei.value) and "Traceback" not in str(ei.value)  # the worker's traceback dropped
    finally:
        # Stop the worker now: left to garbage collection, torch's shutdown waits out a 5 s join timeout.
        getattr(it, "_shutdown_workers", lambda: None)()
    ds = build_train_dataset(dict(cfg, skip_bad_images=True), TASKS3)
    assert ds.num_bad_images == 1 and ds.bad_images == [str(bad)]
    assert len(ds) == 3 * 3 + 2 + 2
    for i in range(len(ds)):
        ds[i]


@pytest.mark.parametrize("damage", ["truncated_png", "empty", "huge_header", "pair_sizes", "truncated_jpeg_head"])
def test_training_split_headers_are_checked_before_the_first_step(tmp_path, damage, monkeypatch):
    """Without skip_bad_images, a training split is not decoded up front but every header is read."""
    make_promptir_tree(tmp_path)
    rain = tmp_path / "Train" / "Derain" / "rainy" / "rain-2.png"
    haze = tmp_path / "Train" / "Dehaze" / "synthetic" / "part1" / "0001_0.8_0.2.jpg"
    cfg = {"type": "promptir3", "root": str(tmp_path), "patch_size": 16}
    if damage == "truncated_png":  # a copy cut short: signature and IHDR intact
        bad, expect = rain, "truncated PNG"
        bad.write_bytes(bad.read_bytes()[:-40])
    elif damage == "empty":
        bad, expect = rain, "empty file"
        bad.write_bytes(b"")
    elif damage == "huge_header":
        bad, expect = rain, "64x64 pixels is over the limit of 2000"
        _png(rain, h=64, w=64, seed=4)
        _png(tmp_path / "Train" / "Derain" / "gt" / "norain-2.png", h=64, w=64, seed=5)
        monkeypatch.setenv("TUR_MAX_IMAGE_PIXELS", "2000")  # the others are 48x40
    elif damage == "pair_sizes":
        bad, expect = rain, "48x40 while its ground truth .*norain-2.png.* is 50x40"
        _png(tmp_path / "Train" / "Derain" / "gt" / "norain-2.png", h=40, w=50, seed=5)
    else:  # a JPEG that is only its first bytes: no frame header, no decoder signature problem
        bad, expect = haze, "0001_0.8_0.2.jpg.*truncated JPEG"
        bad.write_bytes(bad.read_bytes()[:3])
    with pytest.raises(ImageReadError, match=expect) as ei:
        build_train_dataset(cfg, TASKS3)
    assert os.path.basename(str(bad)) in str(ei.value) and "skip_bad_images" in str(ei.value)
    if damage != "huge_header":  # skipping decodes everything and drops the pair
        ds = build_train_dataset(dict(cfg, skip_bad_images=True), TASKS3)
        assert ds.num_bad_images >= 1 and len(ds) < 3 * 3 + 2 + 2


def test_intact_training_files_pass_the_header_check(tmp_path):
    from tur_ext.data.io import header_problem

    make_promptir_tree(tmp_path)
    for p in sorted(tmp_path.rglob("*.*")):
        reason, dims = header_problem(p)
        assert reason is None and dims == (cv2.imread(str(p)).shape[1], cv2.imread(str(p)).shape[0]), p
    assert header_problem(tmp_path / "nope.png") == ("no such file", None)


def test_missing_ground_truth_named_or_skipped(tmp_path):
    make_promptir_tree(tmp_path)
    _png(tmp_path / "Train" / "Derain" / "rainy" / "rain-7.png", seed=7)
    cfg = {"type": "promptir3", "root": str(tmp_path), "patch_size": 16}
    with pytest.raises(ImageReadError, match="norain-7.png"):
        build_train_dataset(cfg, TASKS3)
    ds = build_train_dataset(dict(cfg, skip_bad_images=True), TASKS3)
    assert ds.num_bad_images == 1 and ds.bad_images[0].endswith("rain-7.png")


def test_promptir3_missing_folder_is_named(tmp_path):
    make_promptir_tree(tmp_path)
    import shutil
    shutil.rmtree(tmp_path / "Train" / "Dehaze")
    with pytest.raises(ValueError, match="Dehaze"):
        build_train_dataset({"type": "promptir3", "root": str(tmp_path)}, TASKS3)
    # a run without dehaze does not need the folder
    ds = build_train_dataset({"type": "promptir3", "root": str(tmp_path), "patch_size": 16},
                             ["denoise_25", "derain"])
    assert ds.tasks_present == ["denoise_25", "derain"]


# ----------------------------------------------------------------------------- GoPro, LOL, generic paired, combined

def test_gopro_lol_paired_layouts(tmp_path):
    gopro = make_pair_tree(tmp_path / "GoPro", "blur", "sharp", ["train", "test"], seq="GOPR0372_07_00")
    lol = make_pair_tree(tmp_path / "LOL", "low", "high", ["our485", "eval15"], n=3)
    tasks = TaskSet("5task")
    g = build_train_dataset({"type": "gopro", "root": str(gopro), "patch_size": 16},
                            ["deblur"])
    assert len(g) == 2 and g[0]["task"] == "deblur" and g[0]["lq"].shape == (3, 16, 16)
    assert all("/train/" in r[1] and r[1].replace("/blur/", "/sharp/") == r[2] for r in g.records)
    ge = build_eval_dataset({"type": "gopro", "root": str(gopro)}, tasks)
    assert len(ge) == 2 and all("/test/" in r[1] for r in ge.records) and ge.tasks_present == ["deblur"]
    le = build_eval_dataset({"type": "lol", "root": str(lol)}, tasks)
    assert len(le) == 3 and le[0]["task"] == "lowlight" and le[0]["task_id"] == tasks.id("lowlight")
    assert all("eval15" in r[1] for r in le.records)

    # training from a root that also holds the held-out test/ split never reads the test pairs
    flat = make_pair_tree(tmp_path / "flat", "blur", "sharp", [".", "test"], seq="GOPR0001")
    ft = build_train_dataset({"type": "gopro", "root": str(flat), "patch_size": 16}, ["deblur"])
    assert len(ft) == 2 and not any("/test/" in r[1] for r in ft.records)

    paired = make_pair_tree(tmp_path / "mine", "lq", "gt", ["."], n=2)
    t7 = TaskSet("7task")
    p = build_train_dataset({"type": "paired", "root": str(paired), "task": "jpeg", "patch_size": 16}, ["jpeg"])
    assert p[1]["task"] == "jpeg"
    with pytest.raises(ValueError, match="eval_root"):
        build_eval_dataset({"type": "paired", "root": str(paired), "task": "jpeg"}, t7)
    pe = build_eval_dataset({"type": "paired", "root": str(paired), "task": "jpeg", "eval_root": str(paired)}, t7)
    assert len(pe) == 2
    with pytest.raises(ValueError, match="task"):
        build_train_dataset({"type": "paired", "root": str(paired), "task": "deblur"}, t7)


def test_combined_five_task_setting_every_batch_has_every_task(tmp_path):
    make_promptir_tree(tmp_path / "data")
    make_pair_tree(tmp_path / "GoPro", "blur", "sharp", ["train", "test"])
    make_pair_tree(tmp_path / "LOL", "low", "high", ["our485", "eval15"])
    cfg = {"seed": 3, "patch_size": 16, "type": "combined", "datasets": [
        {"type": "promptir3", "root": str(tmp_path / "data")},
        {"type": "gopro", "root": str(tmp_path / "GoPro")},
        {"type": "lol", "root": str(tmp_path / "LOL")}]}
    tasks = TaskSet("5task")
    with pytest.raises(ValueError, match=r"deblur.*lowlight"):
        build_train_dataset({"type": "promptir3", "root": str(tmp_path / "data")}, tasks)
    ds = build_train_dataset(cfg, tasks)
    assert ds.tasks_present == list(tasks) and len(ds) == 13 + 2 + 2
    loader = build_train_loader(ds, 7, seed=0, num_batches=3)
    loader.batch_sampler.set_epoch(0)
    for batch in loader:
        assert sorted(batch["task"]) == sorted(tasks)
        assert batch["lq"].shape == (7, 3, 16, 16)
        assert batch["task_id"].tolist() == tasks.ids(batch["task"]).tolist()
    ev = build_eval_dataset(cfg, tasks)
    assert ev.tasks_present == list(tasks)


def test_clean_folder_synthesises_every_task(tmp_path):
    for i in range(2):
        _png(tmp_path / "clean" / f"{i}.png", h=64, w=64, seed=i)
        _png(tmp_path / "clean" / "test" / f"{i}.png", h=48, w=48, seed=10 + i)
    t7 = TaskSet("7task")
    ds = build_train_dataset({"type": "clean", "root": str(tmp_path / "clean"), "patch_size": 24}, t7)
    assert len(ds) == 7 * 2  # trains from root itself, minus its held-out test/ folder
    assert not any("/clean/test/" in r[2] for r in ds.records)
    ev = build_eval_dataset({"type": "clean", "root": str(tmp_path / "clean")}, t7)
    assert len(ev) == 7 * 2 and ev[0]["lq"].shape == (3, 48, 48)
    assert ev.tasks_present == list(t7)
    for i in range(len(ev)):
        item = ev[i]
        assert float((item["lq"] - item["gt"]).abs().mean()) > 1e-3  # degraded
        assert torch.equal(item["lq"], ev[i]["lq"])  # with a fixed seed


# ----------------------------------------------------------------------------- embedded data

def test_embedded_train_items_and_determinism():
    ds = EmbeddedTrainDataset(TASKS3, patch_size=32, length=50, seed=1)
    assert len(ds) == 50 and ds.task_ids[:6] == [0, 1, 2, 3, 4, 0]
    a, b = ds[7], ds[7]
    assert a["task"] == "denoise_50" and a["lq"].shape == (3, 32, 32)  # 7 % 5 == 2
    assert torch.equal(a["lq"], b["lq"]) and torch.equal(a["gt"], b["gt"])
    assert not torch.equal(ds[7 + 50]["gt"], a["gt"])  # the next epoch draws a new patch
    other_seed = EmbeddedTrainDataset(TASKS3, patch_size=32, length=50, seed=2)
    assert not torch.equal(other_seed[7]["gt"], a["gt"])
    with pytest.raises(ValueError, match="task0"):
        EmbeddedTrainDataset(TaskSet(2))


def test_embedded_eval_is_fixed_and_held_out():
    assert not set(TRAIN_IMAGES) & set(EVAL_IMAGES)
    ev = EmbeddedEvalDataset(TASKS3)
    assert len(ev) == 5 * 4 and ev.tasks_present == list(TASKS3)
    batch = next(iter(build_eval_loader(ev, batch_size=20)))
    assert batch["lq"].shape == (20, 3, 128, 128)
    again = EmbeddedEvalDataset(TASKS3)
    assert all(torch.equal(ev[i]["lq"], again[i]["lq"]) for i in range(len(ev)))
    # a task's crops do not depend on the task set's order or the other tasks
    rev = EmbeddedEvalDataset(list(reversed(TASKS3)))
    assert torch.equal(rev[0]["lq"], ev[16]["lq"]) and rev[0]["task"] == ev[16]["task"] == "dehaze"
    # built through the config too, with its defaults
    cfg_ev = build_eval_dataset({}, TASKS3)
    assert torch.equal(cfg_ev[3]["gt"], ev[3]["gt"])


def test_config_sections_and_errors():
    ds = build_train_dataset({"type": "embedded", "patch_size": 64, "train": {"patch_size": 16, "length": 10}},
                             TASKS3)
    assert ds[0]["lq"].shape == (3, 16, 16) and len(ds) == 10
    ev = build_eval_dataset({"eval": {"eval_crop": 32, "eval_crops_per_task": 1}, "batch_size": 8}, TASKS3)
    assert len(ev) == 5 and ev[0]["gt"].shape == (3, 32, 32)
    # an eval section with its own type replaces the top-level source (root is not carried over)
    ev = build_eval_dataset({"type": "promptir3", "root": "/nonexistent", "eval": {"type": "embedded",
                                                                                    "eval_crops_per_task": 1}}, TASKS3)
    assert isinstance(ev, EmbeddedEvalDataset) and len(ev) == 5
    with pytest.raises(ValueError, match="pach_size"):
        build_train_dataset({"pach_size": 3}, TASKS3)
    with pytest.raises(ValueError, match="unknown data type"):
        build_train_dataset({"type": "lmdb"}, TASKS3)
    with pytest.raises(TypeError, match="patch_size"):
        build_train_dataset({"patch_size": "big"}, TASKS3)
    with pytest.raises(ValueError, match="root"):
        build_train_dataset({"type": "gopro"}, ["deblur"])


# ----------------------------------------------------------------------------- sampler

def _draw(sampler, epoch=0, start=0):
    sampler.set_epoch(epoch, start)
    return [list(b) for b in sampler]


def test_sampler_every_task_in_every_batch_even_when_imbalanced():
    ids = [0] * 100 + [1] * 5 + [2] * 20
    s = TaskBalancedBatchSampler(ids, 7, seed=0, num_batches=40)
    seen_counts = np.zeros(3, int)
    for batch in _draw(s):
        assert len(batch) == 7
        tasks = [ids[k % len(ids)] for k in batch]
        counts = np.bincount(tasks, minlength=3)
        assert counts.min() >= 2 and counts.max() <= 3  # 7 // 3 each, the remainder spread
        seen_counts += counts
    assert seen_counts.max() - seen_counts.min() < 0.1 * seen_counts.mean()
    # no repeats within one pass over a small task's items
    s = TaskBalancedBatchSampler(ids, 3, seed=0, num_batches=5)
    task1 = [k for b in _draw(s) for k in b if ids[k] == 1]
    assert sorted(task1) == list(range(100, 105))


def test_sampler_seeded_epochs_and_resume():
    ids = [i % 4 for i in range(64)]
    s = TaskBalancedBatchSampler(ids, 8, seed=5)
    assert len(s) == 8
    e0 = _draw(s, 0)
    assert e0 == _draw(TaskBalancedBatchSampler(ids, 8, seed=5), 0)
    assert e0 != _draw(TaskBalancedBatchSampler(ids, 8, seed=6), 0)
    e1 = _draw(s, 1)
    assert all(k >= 64 for b in e1 for k in b)  # epoch 1 keys: index + 64
    assert [[k - 64 for k in b] for b in e1] != e0
    assert _draw(s, 1, 3) == e1[3:]
    s.set_epoch(1, 3)
    assert len(s) == 5
    assert sorted(k for b in e0 for k in b) == list(range(64))  # one epoch is one pass over the items


def test_sampler_rank_split_disjoint():
    ids = [i % 5 for i in range(200)]
    per_rank = [_draw(TaskBalancedBatchSampler(ids, 10, seed=1, rank=r, world_size=4)) for r in range(4)]
    keys = [set(k for b in batches for k in b) for batches in per_rank]
    assert all(len(b) == 5 for b in per_rank)  # 200 // (10 * 4)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not keys[i] & keys[j]
    assert set().union(*keys) == set(range(200))
    for batches in per_rank:
        for b in batches:
            assert sorted({ids[k] for k in b}) == [0, 1, 2, 3, 4]


def test_sampler_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        TaskBalancedBatchSampler([0, 1, 2], 2)
    with pytest.raises(ValueError, match="rank"):
        TaskBalancedBatchSampler([0, 1], 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="task_ids"):
        TaskBalancedBatchSampler([], 2)


def test_loader_same_batches_with_or_without_workers():
    ds = EmbeddedTrainDataset(TASKS3, patch_size=16, length=40, seed=0)

    def run(workers):
        loader = build_train_loader(ds, 5, seed=2, num_workers=workers, num_batches=4)
        loader.batch_sampler.set_epoch(2)
        return [(b["lq"].clone(), b["task"]) for b in loader]

    a, b = run(0), run(2)
    assert len(a) == 4
    for (x, tx), (y, ty) in zip(a, b):
        assert tx == ty and torch.equal(x, y)
    assert isinstance(a[0][1], list) and isinstance(a[0][1][0], str)


def test_default_collate_batches_items():
    ds = EmbeddedEvalDataset(["noise", "jpeg"], crop_size=32, crops_per_task=2)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["lq"].shape == (4, 3, 32, 32) and batch["task"] == ["noise", "noise", "jpeg", "jpeg"]
    assert batch["task_id"].dtype == torch.long and batch["task_id"].tolist() == [0, 0, 1, 1]
    assert dihedral(np.arange(4).reshape(2, 2), 4).tolist() == [[1, 0], [3, 2]]
