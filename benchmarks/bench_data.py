"""Data throughput: training patches per second per worker, for each task.

One worker = one process with OpenCV on one thread (what ``worker_init_fn`` sets), producing finished items
(crop, flip/rotation, degradation, tensors). Two sources per task:

* ``embedded``: scikit-image images in memory, degraded on the fly (no file decoding) - the quickstart's data;
* ``folder``: a 481x321 PNG pair (BSD-sized) decoded from disk for every patch, then cropped - the cost the
  PromptIR-layout folders add; for tasks synthesised from clean images (noise, and all 7-task names in a clean
  folder) only the gt is read.

    PYTHONPATH=. pytest benchmarks/bench_data.py --benchmark-json benchmarks/results/bench_data_cpu.json

``extra_info["patches_per_s"]`` holds 1 / mean time; the printed table's OPS column is the same number.
"""
from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest
import torch

from tur_ext.data.datasets import CleanTrainDataset, EmbeddedTrainDataset, PairedTrainDataset
from tur_ext.tasks import KNOWN_TASKS

PATCH = 128


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    prev_cv, prev_torch = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    yield
    cv2.setNumThreads(prev_cv)
    torch.set_num_threads(prev_torch)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_data")
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (81, 121, 3)).astype(np.uint8)
    gt = cv2.resize(small, (481, 321), interpolation=cv2.INTER_CUBIC)
    lq = np.clip(gt.astype(int) + rng.integers(-20, 21, gt.shape), 0, 255).astype(np.uint8)
    (root / "gt").mkdir()
    (root / "lq").mkdir()
    cv2.imwrite(str(root / "gt" / "0.png"), gt)
    cv2.imwrite(str(root / "lq" / "0.png"), lq)
    return root


def _run(benchmark, ds, task, source):
    keys = itertools.count()
    ds[next(keys)]  # warm caches (image load, OpenCV kernels) outside the timing
    benchmark.pedantic(lambda: ds[next(keys)], rounds=30, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update({"task": task, "source": source, "patch": PATCH,
                                 "patches_per_s": 1.0 / benchmark.stats.stats.mean})


@pytest.mark.parametrize("task", list(KNOWN_TASKS))
def test_embedded_patches_per_second(benchmark, task):
    ds = EmbeddedTrainDataset([task], patch_size=PATCH, length=1000, seed=0)
    _run(benchmark, ds, task, "embedded")


@pytest.mark.parametrize("task", list(KNOWN_TASKS))
def test_folder_patches_per_second(benchmark, task, image_files):
    if task in ("derain", "dehaze", "deblur", "lowlight"):  # real pairs on disk in the public layouts
        ds = PairedTrainDataset([(str(image_files / "lq" / "0.png"), str(image_files / "gt" / "0.png"))], task,
                                [task], patch_size=PATCH)
    else:  # synthesised from a clean image on disk
        ds = CleanTrainDataset(image_files / "gt", [task], patch_size=PATCH)
    _run(benchmark, ds, task, "folder")
