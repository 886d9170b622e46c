"""Data for all-in-one restoration: image I/O, seeded degradations, datasets, the task-balanced sampler.

Public API (stable; the trainer builds on it)
=============================================

Items
-----
Every dataset yields ``{"lq": FloatTensor (3, H, W) in [0, 1], "gt": FloatTensor (3, H, W) in [0, 1],
"task": str, "task_id": int}``. ``task_id`` is the index of ``task`` in the run's :class:`~tur_ext.tasks.TaskSet`
(the ``tasks`` argument every builder takes), so ``batch["task_id"]`` goes straight to the loss. The default
``torch.utils.data.default_collate`` batches items: ``lq``/``gt`` -> (B, 3, H, W), ``task`` -> list[str],
``task_id`` -> LongTensor (B,).

Every dataset (a :class:`RestorationDataset`) has ``.tasks`` (the run's TaskSet), ``.task_ids`` (list[int], the
task id of each index, what the sampler balances on), ``.task_of(index) -> str``, ``.tasks_present``
(list[str], the run's tasks with at least one item), ``.bad_images`` (list[str] of skipped unreadable paths) and
``.num_bad_images``.

Sample keys and epochs (reproducibility). Training datasets accept any ``key >= 0``: ``key % len(ds)`` selects the
item and the whole key seeds its random crop / augmentation / degradation (``np.random.default_rng((seed, key))``).
The sampler yields ``index + epoch * len(ds)``, so each epoch draws fresh patches while the same (seed, epoch, batch)
always gives the same bits, with any number of workers, and a resumed run (``set_epoch(epoch, start_batch)``) sees
exactly the batches an uninterrupted run would. Evaluation datasets are fully deterministic (``0 <= key < len``).

Builders (``cfg`` is the ``data:`` section of a run config, a plain dict)
-------------------------------------------------------------------------
(module ``tur_ext.data.build``, re-exported here)

``build_train_dataset(cfg: dict | None, tasks: TaskSet | str | list[str]) -> RestorationDataset``
    Every task of ``tasks`` must be covered, else ValueError naming the missing tasks.
``build_eval_dataset(cfg: dict | None, tasks) -> RestorationDataset``
    Only the tasks of ``tasks`` that the source provides (``.tasks_present`` lists them; group metrics by
    ``batch["task"]``).
``build_train_loader(dataset, batch_size: int, *, seed: int = 0, num_workers: int = 0, rank: int = 0,
world_size: int = 1, num_batches: int | None = None, pin_memory: bool = False,
persistent_workers: bool = False) -> DataLoader``
    A DataLoader over :class:`TaskBalancedBatchSampler` (``batch_size`` is per rank) with ``worker_init_fn`` and a
    seeded generator. Call ``loader.batch_sampler.set_epoch(epoch, start_batch=0)`` before each epoch;
    ``len(loader)`` is the number of batches left in the epoch.
``build_eval_loader(dataset, batch_size: int = 1, *, num_workers: int = 0) -> DataLoader``
    Sequential, no shuffling. Folder eval sets hold full images of different sizes: use batch_size 1 unless
    ``eval_crop`` is set. The embedded eval set is fixed 128x128 crops, so any batch size works.

``dataset_summary(dataset) -> str``
    One log line: class, items per task, unreadable images skipped.

``cfg`` keys (all optional; ``train:`` and ``eval:`` sub-dicts, if present, override the top level for
``build_train_dataset`` / ``build_eval_dataset`` respectively - a sub-dict with its own ``type`` replaces the
top-level source keys instead of mixing with them). Unknown keys are a ValueError naming them; the loader keys
``batch_size, eval_batch_size, num_workers, pin_memory, persistent_workers, prefetch_factor, num_batches,
batches_per_epoch`` are accepted and ignored here so the trainer may keep them in the same section::

    type: embedded          # embedded | promptir3 | gopro | lol | paired | clean | snow100k | outdoor_rain |
                            #   raindrop | allweather | real_weather | mio | combined   (default embedded)
    seed: 0                 # seeds crops, augmentation, degradations, the eval set
    patch_size: 128         # training crop (paired random crop; images smaller than it are reflect-padded)
    augment: true           # random flips / 90-degree rotations (the 8 dihedral transforms) on training patches
    skip_bad_images: false  # false: an unreadable image raises ImageReadError (a ValueError; .path names the
                            #   file; the type survives DataLoader workers) when it is read, a missing ground
                            #   truth when the dataset is built.
                            # true: every image is decoded once at build time; unreadable ones (and lq files
                            #   without a gt) are dropped, listed in .bad_images and counted in .num_bad_images
                            #   (log it); a warning on logger "tur_ext.data" names each.
    # type: embedded - scikit-image's shipped images, degraded on the fly
    length: 1000            # training items per epoch (a virtual length; the task of index i is tasks[i % K])
    eval_crop: 128          # held-out eval crop size ...
    eval_crops_per_task: 4  # ... and count per task (5 tasks -> 20 crops of 128x128; seconds on a CPU)
    train_images: [...]     # scikit-image names (default TRAIN_IMAGES); eval_images (default EVAL_IMAGES, disjoint)
    # folder types
    root: PATH              # promptir3: the folder holding Train/ and test/ (PromptIR/AirNet layout, or either
                            #   of those folders itself); gopro: blur/ + sharp/ pairs (or TUR/Restormer's
                            #   input/ + target/); lol: low/ + high/ (or gt/,
                            #   normal/); paired: lq/ + gt/ (same file names, or same stem); clean: clean images,
                            #   every task synthesised. Pair folders are found anywhere under the split root
                            #   (GoPro keeps one pair per sequence).
    train_root: PATH        # split roots. Default for training: ROOT/<train split> if it exists, else ROOT
                            #   minus its eval-split folder;
    eval_root: PATH         #   for eval: ROOT/<eval split>, which must exist. Splits (case-insensitive):
                            #   gopro train|test, lol our485 (or train)|eval15 (or test), paired and clean
                            #   train|test (or val), snow100k all (or train)|test/Snow100K-L (or Snow100K-L,
                            #   test), outdoor_rain train|test1 (or test), raindrop train|test_a (or test).
                            #   promptir3 uses Train|test under ROOT; allweather ROOT/train|ROOT/test, else ROOT
                            #   (its list files tell the splits apart); real_weather ROOT/train (else ROOT)|
                            #   ROOT/test (required); mio ROOT/DF2K (or train, else ROOT)|ROOT/CL_test (or
                            #   MiO_test, test; required). The layouts of the weather and MiOIR trees are in
                            #   tur_ext.data.weather and tur_ext.data.mio (and the README).
    task: NAME              # paired only: the task of its pairs (gopro is deblur, lol is lowlight)
    lq_dir: lq              # paired only: the folder NAMES (not paths) of the pairs
    gt_dir: gt
    list_file: allweather.txt   # allweather training: the list file's name (found anywhere under the root)
    test_lists: {snow: snowtest100k_L.txt, rain_fog: test1.txt, raindrop: raindroptesta.txt}   # allweather eval
    task_patterns: null     # allweather training: [[task, regex], ...], the task of a listed path is the first
                            #   whose regex matches (default ALLWEATHER_TASK_PATTERNS: Outdoor-Rain's
                            #   im_N_sS_aA names rain_fog, RainDrop's N_rain raindrop, everything else snow)
    list_dir: null          # real_weather training: where TUR's list files are (default ROOT/data_dir, ROOT)
    eval_crop: null         # folder eval: centre crop to this size (so batches stack); null = whole images,
                            #   which differ in size: evaluate those with batch_size 1
    size_multiple: 16       # folder eval: whole images are cropped (bottom/right) to a multiple of this
    max_eval_images: null   # folder eval: at most this many images per task (quick validation)
    # type: combined - several sources (e.g. the 5-task setting)
    datasets: [ {type: promptir3, root: ...}, {type: gopro, root: ...}, {type: lol, root: ...} ]
                            # each entry inherits seed/patch_size/augment/skip_bad_images/length/eval_crop/
                            #   eval_crops_per_task/size_multiple/max_eval_images from this level

Example (5-task)::

    data:
      patch_size: 128
      type: combined
      datasets:
        - {type: promptir3, root: data}                  # data/Train/..., data/test/...
        - {type: gopro, root: data/GoPro}                # data/GoPro/train/*/blur|sharp, data/GoPro/test/...
        - {type: lol, root: data/LOL}                    # data/LOL/our485/low|high, data/LOL/eval15/low|high

Datasets (``tur_ext.data.datasets``; all take the run's ``tasks`` as TaskSet, set name or list of names)
---------------------------------------------------------------------------------------------------------
``EmbeddedTrainDataset(tasks, *, patch_size=128, length=1000, seed=0, augment=True, images=TRAIN_IMAGES)``
``EmbeddedEvalDataset(tasks, *, crop_size=128, crops_per_task=4, seed=0, images=EVAL_IMAGES)``
``PromptIR3TrainDataset(root, tasks, *, patch_size=128, seed=0, augment=True, skip_bad_images=False)``
``PromptIR3TestDataset(root, tasks, *, seed=0, crop=None, size_multiple=16, max_images=None, skip_bad_images=False)``
``PairedTrainDataset(pairs, task, tasks, *, patch_size=128, seed=0, augment=True, skip_bad_images=False)``
``PairedEvalDataset(pairs, task, tasks, *, crop=None, size_multiple=16, max_images=None, skip_bad_images=False)``
``CleanTrainDataset(root, tasks, *, patch_size=128, seed=0, augment=True, skip_bad_images=False, exclude=())``
``CleanEvalDataset(root, tasks, *, seed=0, crop=None, size_multiple=16, max_images=None, skip_bad_images=False)``
``CombinedDataset(datasets)``; ``find_pairs(root, lq_dir, gt_dirs, exclude=(), gt_names=same) -> (pairs,
missing)`` (``lq_dir`` one name or several; GoPro: ``("blur", "input"), ("sharp", "target")``; LOL: ``"low",
("high", "gt", "normal")``; ``gt_names(lq file name) -> [candidate gt names]``).
Deweathering (``tur_ext.data.weather``): ``AllWeatherTrainDataset(root, tasks, *, list_file="allweather.txt",
task_patterns=ALLWEATHER_TASK_PATTERNS, patch_size=256, ...)``, ``AllWeatherTestDataset(root, tasks, *,
lists=None, ...)``, ``RealWeatherTrainDataset(root, tasks, *, list_dir=None, ...)``,
``RealWeatherTestDataset(root, tasks, ...)``; ``read_list_file(path)``, ``GT_NAMES`` (the benchmarks' gt-name
rules). MiOIR (``tur_ext.data.mio``): ``MiOTrainDataset(root, tasks, ...)``, ``MiOTestDataset(root, tasks, ...)``. ``TRAIN_IMAGES`` / ``EVAL_IMAGES``: the
disjoint scikit-image names (training: astronaut, rocket, stereo_motorcycle, immunohistochemistry, retina,
hubble_deep_field, colorwheel; held out: chelsea, coffee).

Degradations (``tur_ext.data.degradations``)
--------------------------------------------
``DEGRADATIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]]`` - one entry per name in
``tur_ext.tasks.SYNTHETIC_TASKS`` (the weather tasks exist only as published pairs); ``degrade(name, clean, rng) -> np.ndarray``. Input and output: float32 HxWx3 RGB in
[0, 1]; the same generator state gives the same output. Parameter ranges are in ``RANGES``; the fixed-parameter
building blocks are public too: ``gaussian_noise(img, sigma, rng)`` (sigma in 0..255 units),
``rain_streaks(img, rng, density, length, angle, width, opacity=0.8)``, ``haze(img, airlight, beta)`` (with
``haze_depth_proxy(img)``), ``motion_blur(img, length, angle)``, ``gaussian_blur(img, ksize, sigma)``,
``jpeg(img, quality)``, ``low_light(img, gamma, scale=1.0)``, ``bicubic_sr(img, scale=4)``;
``sample_params(name, rng) -> dict``.

Transforms (``tur_ext.data.transforms``)
----------------------------------------
``paired_random_crop(imgs, size, rng)``, ``center_crop(img, size)``, ``crop_to_multiple(img, multiple)``,
``random_dihedral(imgs, rng)`` / ``dihedral(img, k)``, ``to_tensor(img) -> FloatTensor CHW``.

Image I/O (``tur_ext.data.io``)
-------------------------------
``read_image(path) -> float32 HxWx3 RGB in [0, 1]`` (8/16-bit, gray and alpha handled; an unreadable file raises
:class:`ImageReadError`, a ValueError whose message and ``.path`` name the file);
``write_image(path, img)`` (float in [0,1] -> 8-bit, or uint8/uint16 as is; RGB; temp file + rename).

Sampler (``tur_ext.data.sampler``)
----------------------------------
``TaskBalancedBatchSampler(task_ids, batch_size, *, seed=0, rank=0, world_size=1, num_batches=None)``: every batch
holds every task (``batch_size // K`` each, the remainder spread by the seeded generator); batches are drawn from a
global seeded sequence and rank ``r`` takes batches ``r, r + world_size, ...`` (disjoint within a pass over each
task's items). ``set_epoch(epoch, start_batch=0)``; ``len()`` = batches left in the epoch (default
``len(task_ids) // (batch_size * world_size)``, at least 1). ``worker_init_fn(worker_id)`` seeds numpy/random per
worker and limits OpenCV to one thread.

Metrics (``tur_ext.metrics``)
-----------------------------
``psnr(img, ref, convention="promptir", *, crop_border=0, test_y_channel=False) -> float`` and ``ssim(...)``
for one image ((H, W, C) array or (C, H, W) tensor, float in [0, 1]; uint8 accepted by "basicsr");
``psnr_batch(pred, target, convention="promptir", *, crop_border=0, test_y_channel=False) -> list[float]`` and
``ssim_batch(...)`` for (B, C, H, W) tensors; the conventions directly: ``psnr_basicsr(img, ref, crop_border=0,
test_y_channel=False)``, ``ssim_basicsr(...)``, ``psnr_promptir(img, ref)``, ``ssim_promptir(img, ref)``.
"promptir" = RGB float, scikit-image defaults (what PromptIR reports); "basicsr" = 8-bit, crop_border, optional Y,
11x11 Gaussian SSIM (what BasicSR / MATLAB report). Identical images give PSNR ``inf``.
"""
import cv2 as _cv2

# OpenCV's thread pool does not survive fork(): a DataLoader worker that touches it (or resizes it) can hang on a
# lock a parent thread held at fork time. Loader workers parallelise the image work instead, so OpenCV runs
# sequentially in every process that uses this package's data pipeline.
_cv2.setNumThreads(0)

from .build import (build_eval_dataset, build_eval_loader, build_train_dataset, build_train_loader,
                    dataset_summary)
from .datasets import (EVAL_IMAGES, TRAIN_IMAGES, CleanEvalDataset, CleanTrainDataset, CombinedDataset,
                       EmbeddedEvalDataset, EmbeddedTrainDataset, PairedEvalDataset, PairedTrainDataset,
                       PromptIR3TestDataset, PromptIR3TrainDataset, RestorationDataset, find_pairs)
from .degradations import DEGRADATIONS, RANGES, degrade
from .mio import MiOTestDataset, MiOTrainDataset
from .weather import (AllWeatherTestDataset, AllWeatherTrainDataset, RealWeatherTestDataset,
                      RealWeatherTrainDataset)
from .io import ImageReadError, read_image, write_image
from .sampler import TaskBalancedBatchSampler, worker_init_fn

__all__ = [
    "build_train_dataset", "build_eval_dataset", "build_train_loader", "build_eval_loader", "dataset_summary",
    "RestorationDataset", "EmbeddedTrainDataset", "EmbeddedEvalDataset", "PromptIR3TrainDataset",
    "PromptIR3TestDataset", "PairedTrainDataset", "PairedEvalDataset", "CleanTrainDataset", "CleanEvalDataset",
    "CombinedDataset", "find_pairs", "TRAIN_IMAGES", "EVAL_IMAGES",
    "AllWeatherTrainDataset", "AllWeatherTestDataset", "RealWeatherTrainDataset", "RealWeatherTestDataset",
    "MiOTrainDataset", "MiOTestDataset",
    "DEGRADATIONS", "RANGES", "degrade",
    "ImageReadError", "read_image", "write_image",
    "TaskBalancedBatchSampler", "worker_init_fn",
]
