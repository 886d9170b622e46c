"""Restoration datasets: scikit-image's embedded images degraded on the fly, and folders in the public layouts.

Every dataset yields ``{"lq", "gt", "task", "task_id"}`` (see :mod:`tur_ext.data`) and exposes ``tasks``,
``task_ids``, ``task_of(i)``, ``tasks_present``, ``bad_images`` and ``num_bad_images``. Training datasets accept
sample keys ``>= len(ds)`` (``key % len`` picks the item, the whole key seeds its randomness); evaluation datasets
are deterministic.
"""
from __future__ import annotations

import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..tasks import KNOWN_TASKS, TaskSet
from .degradations import DEGRADATIONS, SPATIAL_MARGIN, degrade
from .io import ImageReadError, header_problem, is_image_file, read_image
from .transforms import center_crop, crop_to_multiple, paired_random_crop, random_dihedral, to_tensor

log = logging.getLogger("tur_ext.data")

PathLike = Union[str, os.PathLike]
Pair = tuple[str, str]

#: scikit-image images used for training and for the held-out evaluation set (disjoint; all RGB, all shipped with
#: the package so nothing is downloaded). ``stereo_motorcycle`` is its left view; ``cat`` is ``chelsea``, unused.
TRAIN_IMAGES: tuple[str, ...] = ("astronaut", "rocket", "stereo_motorcycle", "immunohistochemistry", "retina",
                                 "hubble_deep_field", "colorwheel")
EVAL_IMAGES: tuple[str, ...] = ("chelsea", "coffee")

_NOISE_SIGMA = {"denoise_15": 15.0, "denoise_25": 25.0, "denoise_50": 50.0}
_TASK_ORDER = {name: i for i, name in enumerate(KNOWN_TASKS)}  # stable per-task seed salt, independent of TaskSet


def _stable_task_index(task: str) -> int:
    return _TASK_ORDER.get(task, len(_TASK_ORDER) + sum(map(ord, task)))


@functools.lru_cache(maxsize=None)
def load_embedded_image(name: str) -> np.ndarray:
    """A scikit-image sample image as float32 RGB (H, W, 3) in [0, 1] (cached; treat as read-only)."""
    import skimage.data

    fn = getattr(skimage.data, name, None)
    if fn is None or name.startswith("_"):
        raise ValueError(f"images: {name!r} is not a scikit-image sample image")
    img = fn()
    if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
        img = img[0]
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"images: scikit-image image {name!r} has shape {img.shape}; expected an RGB image")
    if img.dtype != np.uint8:
        raise ValueError(f"images: scikit-image image {name!r} has dtype {img.dtype}; expected uint8")
    out = np.ascontiguousarray(img[:, :, :3], dtype=np.float32) / np.float32(255.0)
    out.setflags(write=False)
    return out


class RestorationDataset(Dataset):
    """Shared bookkeeping: the run's task set, the task of every index, skipped images, the item format."""

    #: training datasets wrap keys beyond ``len`` (fresh randomness per epoch); eval datasets do not.
    wraps_keys: bool = False

    def __init__(self, tasks: Union[TaskSet, str, Sequence[str]]):
        self.tasks = tasks if isinstance(tasks, TaskSet) else TaskSet(tasks)
        self.task_ids: list[int] = []
        self._bad: list[str] = []

    def __len__(self) -> int:
        return len(self.task_ids)

    @property
    def bad_images(self) -> list[str]:
        """Paths of the unreadable images skipped (``skip_bad_images``), in the order found."""
        return list(self._bad)

    @property
    def num_bad_images(self) -> int:
        return len(self.bad_images)

    @property
    def tasks_present(self) -> list[str]:
        """The run's tasks that have at least one item here, in task-set order."""
        have = set(self.task_ids)
        return [t for i, t in enumerate(self.tasks) if i in have]

    def task_of(self, index: int) -> str:
        """The task name of item ``index`` (keys wrap like ``__getitem__``)."""
        return self.tasks[self.task_ids[self._index(index)]]

    def _index(self, key: int) -> int:
        n = len(self)
        key = int(key)
        if key < 0 or (key >= n and not self.wraps_keys):
            raise IndexError(f"index {key} out of range for a dataset of {n} items")
        return key % n

    def _item(self, lq: np.ndarray, gt: np.ndarray, task: str) -> dict:
        return {"lq": to_tensor(lq), "gt": to_tensor(gt), "task": task, "task_id": self.tasks.id(task)}

    def _skip(self, path: str, reason: str) -> None:
        self._bad.append(path)
        log.warning("skipping unreadable image %r: %s", path, reason)


# ----------------------------------------------------------------------------- embedded (scikit-image) data

def _degrade_patch(img: np.ndarray, task: str, size: int, rng: np.random.Generator, augment: bool,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Random crop of ``size`` plus the task's spatial margin, optional flip/rotation, degrade, trim the margin."""
    m = SPATIAL_MARGIN.get(task, 0)
    h, w = img.shape[:2]
    m = max(0, min(m, (min(h, w) - size) // 2))
    (crop,) = paired_random_crop([img], size + 2 * m, rng)
    if augment:
        (crop,) = random_dihedral([crop], rng)
    crop = np.ascontiguousarray(crop)
    lq = degrade(task, crop, rng)
    return lq[m:m + size, m:m + size], crop[m:m + size, m:m + size]


def _check_embedded_tasks(tasks: TaskSet) -> None:
    unknown = [t for t in tasks if t not in DEGRADATIONS]
    if unknown:
        raise ValueError(f"tasks: the embedded data synthesises only known task names ({sorted(DEGRADATIONS)}); "
                         f"no degradation for {unknown}")


def _check_pos_int(name: str, v) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return int(v)


class EmbeddedTrainDataset(RestorationDataset):
    """Random patches of scikit-image's clean images, degraded on the fly; item ``i`` has task ``tasks[i % K]``."""

    wraps_keys = True

    def __init__(self, tasks, *, patch_size: int = 128, length: int = 1000, seed: int = 0, augment: bool = True,
                 images: Sequence[str] = TRAIN_IMAGES):
        super().__init__(tasks)
        _check_embedded_tasks(self.tasks)
        self.patch_size = _check_pos_int("patch_size", patch_size)
        length = _check_pos_int("length", length)
        if length < len(self.tasks):
            raise ValueError(f"length: expected at least one item per task ({len(self.tasks)}), got {length}")
        self.seed, self.augment = int(seed), bool(augment)
        self.image_names = tuple(images)
        if not self.image_names:
            raise ValueError("images: expected at least one scikit-image name")
        self.images = [load_embedded_image(n) for n in self.image_names]
        self.task_ids = [i % len(self.tasks) for i in range(length)]

    def __getitem__(self, key: int) -> dict:
        task = self.task_of(key)
        rng = np.random.default_rng((self.seed, int(key)))
        img = self.images[int(rng.integers(len(self.images)))]
        lq, gt = _degrade_patch(img, task, self.patch_size, rng, self.augment)
        return self._item(lq, gt, task)


class EmbeddedEvalDataset(RestorationDataset):
    """The fixed held-out set: ``crops_per_task`` deterministic crops per task from :data:`EVAL_IMAGES` (never used
    for training), each with a fixed degradation. Independent of the task set's order: a task's crops depend only on
    (seed, task name, crop number). Items are computed once, at construction."""

    def __init__(self, tasks, *, crop_size: int = 128, crops_per_task: int = 4, seed: int = 0,
                 images: Sequence[str] = EVAL_IMAGES):
        super().__init__(tasks)
        _check_embedded_tasks(self.tasks)
        self.crop_size = _check_pos_int("crop_size", crop_size)
        self.crops_per_task = _check_pos_int("crops_per_task", crops_per_task)
        self.seed = int(seed)
        self.image_names = tuple(images)
        if not self.image_names:
            raise ValueError("images: expected at least one scikit-image name")
        imgs = [load_embedded_image(n) for n in self.image_names]
        self._items: list[tuple[np.ndarray, np.ndarray, str]] = []
        for tid, task in enumerate(self.tasks):
            for j in range(self.crops_per_task):
                rng = np.random.default_rng((self.seed, 7_777, _stable_task_index(task), j))
                lq, gt = _degrade_patch(imgs[j % len(imgs)], task, self.crop_size, rng, augment=False)
                self._items.append((np.ascontiguousarray(lq), np.ascontiguousarray(gt), task))
                self.task_ids.append(tid)

    def __getitem__(self, key: int) -> dict:
        lq, gt, task = self._items[self._index(key)]
        return self._item(lq, gt, task)


# ----------------------------------------------------------------------------- folders

def _prune(dirpath: str, dirnames: list[str], exclude: set[str]) -> None:
    """Sort ``dirnames`` in place (deterministic walks) and drop the excluded folders (held-out splits)."""
    dirnames[:] = sorted(d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) not in exclude)


def list_images(folder: PathLike, exclude: Sequence[PathLike] = ()) -> list[str]:
    """Image files under ``folder`` (recursively, skipping the ``exclude`` folders), sorted by path."""
    skip = {os.path.realpath(e) for e in exclude}
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        _prune(dirpath, dirnames, skip)
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f) and not f.startswith("."))
    return out


class _DirIndex:
    """A folder's image files by name and by stem, listed once (large folders would cost a stat per lookup)."""

    def __init__(self, folder: PathLike):
        self.folder = str(folder)
        self.by_name: dict[str, str] = {}
        self.by_stem: dict[str, str] = {}
        if os.path.isdir(folder):
            for f in sorted(os.listdir(folder)):
                if is_image_file(f) and not f.startswith("."):
                    self.by_name[f] = os.path.join(self.folder, f)
                    self.by_stem.setdefault(os.path.splitext(f)[0], os.path.join(self.folder, f))

    def find(self, names: Sequence[str]) -> Optional[str]:
        """The first of ``names`` present: exact file names first, then the same stem with any image extension."""
        for n in names:
            if n in self.by_name:
                return self.by_name[n]
        for n in names:
            p = self.by_stem.get(os.path.splitext(n)[0])
            if p is not None:
                return p
        return None


def _pair_files(lq_files: Sequence[str], gt_dir: PathLike, candidates) -> tuple[list[Pair], list[tuple[str, str]]]:
    """Pair each lq file with the first existing gt candidate; returns (pairs, [(lq, expected gt), ...] missing)."""
    idx = _DirIndex(gt_dir)
    pairs, missing = [], []
    for lq in lq_files:
        names = candidates(os.path.basename(lq))
        gt = idx.find(names)
        if gt is None:
            missing.append((lq, os.path.join(str(gt_dir), names[0])))
        else:
            pairs.append((lq, gt))
    return pairs, missing


def _same_name(name: str) -> list[str]:
    return [name]


def find_pairs(root: PathLike, lq_dir: Union[str, Sequence[str]], gt_dirs: Sequence[str],
               exclude: Sequence[PathLike] = (), gt_names=_same_name,
               ) -> tuple[list[Pair], list[tuple[str, str]]]:
    """Pairs (lq, gt) from every folder named ``lq_dir`` (or one of several names) under ``root``
    (case-insensitive; the ``exclude`` folders are not searched) that has a sibling named one of ``gt_dirs``; a gt
    is the first of ``gt_names(lq file name)`` present (by default the same name), else one with the same stem.
    Returns (pairs, missing) where missing lists (lq path, expected gt path) for lq files without a gt."""
    root = str(root)
    if not os.path.isdir(root):
        raise ValueError(f"root: folder {root!r} does not exist")
    pairs: list[Pair] = []
    missing: list[tuple[str, str]] = []
    want_lq = [lq_dir.lower()] if isinstance(lq_dir, str) else [d.lower() for d in lq_dir]
    want_gt = [g.lower() for g in gt_dirs]
    skip = {os.path.realpath(e) for e in exclude}
    for dirpath, dirnames, _ in os.walk(root):
        _prune(dirpath, dirnames, skip)
        lower = {d.lower(): d for d in dirnames}
        gt_name = next((lower[g] for g in want_gt if g in lower), None)
        if gt_name is None:
            continue
        for lq_name in want_lq:
            if lq_name not in lower or lower[lq_name] == gt_name:
                continue
            lq_folder = os.path.join(dirpath, lower[lq_name])
            lq_files = [f for f in list_images(lq_folder) if os.path.dirname(f) == lq_folder]
            p, m = _pair_files(lq_files, os.path.join(dirpath, gt_name), gt_names)
            pairs += p
            missing += m
    return pairs, missing


def _verify_readable(paths: Sequence[str], min_side: int = 1, why: str = "") -> dict[str, str]:
    """Decode every path once (threads: OpenCV releases the GIL); returns {bad path: reason}: unreadable, or a
    side under ``min_side`` (``why`` says what sets it)."""
    def check(p: str) -> Optional[tuple[str, str]]:
        try:
            h, w = read_image(p).shape[:2]
        except ImageReadError as e:
            return p, e.reason
        if min(h, w) < min_side:
            return p, f"{w}x{h} is smaller than {min_side} pixels ({why})"
        return None

    uniq = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
        return dict(r for r in ex.map(check, uniq) if r is not None)


def _check_headers(records: Sequence[tuple[str, Optional[str], str]]) -> dict[str, str]:
    """Header checks of every file (:func:`~tur_ext.data.io.header_problem`; no decoding) and of paired sizes where
    both headers give them; returns {bad path: reason}."""
    uniq = list(dict.fromkeys(p for _, lq, gt in records for p in (lq, gt) if p is not None))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
        found = dict(zip(uniq, ex.map(header_problem, uniq)))
    bad = {p: reason for p, (reason, _) in found.items() if reason is not None}
    for _, lq, gt in records:
        if lq is None or lq in bad or gt in bad:
            continue
        a, b = found[lq][1], found[gt][1]
        if a is not None and b is not None and a != b:
            bad[lq] = f"{a[0]}x{a[1]} while its ground truth {gt!r} is {b[0]}x{b[1]}"
    return bad


class _FolderDataset(RestorationDataset):
    """Items are (task, lq path or None, gt path); lq None means "synthesise lq from gt" (noise on the fly)."""

    #: Decode every file when the dataset is built (eval splits: few images, and a bad one must not end a training
    #: run at its first validation); otherwise only with ``skip_bad_images``.
    verify_up_front = False

    def _min_side(self) -> tuple[int, str]:
        return 1, ""

    def __init__(self, tasks, *, skip_bad_images: bool = False):
        super().__init__(tasks)
        self.skip_bad_images = bool(skip_bad_images)
        self.records: list[tuple[str, Optional[str], str]] = []

    def _add_missing(self, missing: Sequence[tuple[str, str]], what: str) -> None:
        if not missing:
            return
        if not self.skip_bad_images:
            lq, gt = missing[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ImageReadError(gt, f"{what}: no ground truth for {lq!r}{more}; set skip_bad_images: true to skip")
        for lq, gt in missing:
            self._skip(lq, f"no ground truth (expected {gt!r})")

    def _finalize(self) -> None:
        """Drop records with unreadable files when skipping (decoding each file once), then index tasks."""
        if self.records:
            # Every split's headers are read (cheap: no decoding), so a truncated or foreign training file or a
            # pair of different sizes is named before the first step, not when first drawn hours later; eval
            # splits, and any split with skip_bad_images, are also decoded in full.
            bad = _check_headers(self.records)
            if self.skip_bad_images or self.verify_up_front:
                paths = [p for _, lq, gt in self.records for p in (lq, gt) if p is not None and p not in bad]
                bad.update(_verify_readable(paths, *self._min_side()))
            if bad and not self.skip_bad_images:
                p, reason = next(iter(bad.items()))
                more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                raise ImageReadError(p, f"{reason}{more}; checked before training: set data.skip_bad_images: true "
                                        f"to skip such images")
            for p, reason in bad.items():
                self._skip(p, reason)
            self.records = [r for r in self.records if r[1] not in bad and r[2] not in bad]
            if self.bad_images:
                log.warning("%s: skipped %d unreadable image(s)", type(self).__name__, self.num_bad_images)
        self.task_ids = [self.tasks.id(t) for t, _, _ in self.records]

    def _load(self, index: int) -> tuple[Optional[np.ndarray], np.ndarray, str]:
        task, lq_path, gt_path = self.records[index]
        try:
            gt = read_image(gt_path)
            lq = None if lq_path is None else read_image(lq_path)
        except ImageReadError as e:  # damage past the header checks, found when first drawn
            raise ImageReadError(e.path, f"{e.reason} (data.skip_bad_images: true decodes every image when the "
                                         f"run starts and skips the bad ones)") from None
        if lq is not None and lq.shape != gt.shape:
            raise ValueError(f"paired images differ in size: {lq_path!r} is {lq.shape[1]}x{lq.shape[0]}, "
                             f"{gt_path!r} is {gt.shape[1]}x{gt.shape[0]}")
        return lq, gt, task


class _FolderTrain(_FolderDataset):
    """Random paired patches, flips/rotations; the task's degradation synthesised on the fly where a record has no
    lq (noise for the 3-task Denoise folder, any task for a clean-image folder)."""

    wraps_keys = True

    def __init__(self, tasks, *, patch_size: int = 128, seed: int = 0, augment: bool = True,
                 skip_bad_images: bool = False):
        super().__init__(tasks, skip_bad_images=skip_bad_images)
        self.patch_size = _check_pos_int("patch_size", patch_size)
        self.seed, self.augment = int(seed), bool(augment)

    def __getitem__(self, key: int) -> dict:
        lq, gt, task = self._load(self._index(key))
        rng = np.random.default_rng((self.seed, int(key)))
        if lq is None:
            lq, gt = _degrade_patch(gt, task, self.patch_size, rng, self.augment)
        else:
            lq, gt = paired_random_crop([lq, gt], self.patch_size, rng)
            if self.augment:
                lq, gt = random_dihedral([lq, gt], rng)
        return self._item(lq, gt, task)


class _FolderEval(_FolderDataset):
    """Whole images cropped to a multiple of ``size_multiple`` (or a centre crop); deterministic noise."""

    verify_up_front = True

    def _min_side(self) -> tuple[int, str]:
        return self.size_multiple, f"data.size_multiple={self.size_multiple}"

    def __init__(self, tasks, *, seed: int = 0, crop: Optional[int] = None, size_multiple: int = 16,
                 max_images: Optional[int] = None, skip_bad_images: bool = False):
        super().__init__(tasks, skip_bad_images=skip_bad_images)
        self.seed = int(seed)
        self.crop = None if crop is None else _check_pos_int("eval_crop", crop)
        self.size_multiple = _check_pos_int("size_multiple", size_multiple)
        self.max_images = None if max_images is None else _check_pos_int("max_eval_images", max_images)

    def _limit(self, records: list) -> list:
        return records if self.max_images is None else records[: self.max_images]

    def _finalize(self) -> None:
        super()._finalize()
        # Per-task position of each record, for the deterministic noise seed.
        seen: dict[str, int] = {}
        self._nth = []
        for t, _, _ in self.records:
            self._nth.append(seen.get(t, 0))
            seen[t] = seen.get(t, 0) + 1

    def __getitem__(self, key: int) -> dict:
        index = self._index(key)
        lq, gt, task = self._load(index)
        gt = crop_to_multiple(gt, self.size_multiple)
        if self.crop is not None:
            gt = center_crop(gt, self.crop)
        if lq is None:
            rng = np.random.default_rng((self.seed, 9_999, _stable_task_index(task), self._nth[index]))
            lq = degrade(task, np.ascontiguousarray(gt), rng)
        else:
            lq = crop_to_multiple(lq, self.size_multiple)
            if self.crop is not None:
                lq = center_crop(lq, self.crop)
        return self._item(lq, gt, task)


def _rain_gt_names(name: str) -> list[str]:
    # PromptIR/AirNet: rainy/rain-12.png <-> gt/norain-12.png; Rain100L test input/target share names.
    stem_ok = [name]
    if name.startswith("rain-"):
        stem_ok.insert(0, "no" + name)
    return stem_ok


def _haze_gt_names(name: str) -> list[str]:
    # RESIDE/SOTS: hazy 0001_0.8_0.2.jpg <-> clear 0001.jpg / 0001.png
    stem, ext = os.path.splitext(name)
    ident = stem.split("_")[0]
    return [ident + ext, ident + ".png", ident + ".jpg", name]


def _subdir(root: Path, *names: str) -> Optional[Path]:
    """The first existing ``root/name`` (case-insensitive match of each component)."""
    for name in names:
        cur = root
        for part in Path(name).parts:
            if not cur.is_dir():
                cur = None
                break
            exact = cur / part
            if exact.is_dir():
                cur = exact
                continue
            match = [c for c in cur.iterdir() if c.is_dir() and c.name.lower() == part.lower()]
            cur = match[0] if match else None
            if cur is None:
                break
        if cur is not None and cur.is_dir():
            return cur
    return None


def _resolve_split(root: PathLike, split: str, marker: Sequence[str]) -> Path:
    """``root/split`` if it exists, or ``root`` itself if it already holds one of ``marker`` folders."""
    r = Path(root)
    if not r.is_dir():
        raise ValueError(f"root: folder {str(r)!r} does not exist")
    sub = _subdir(r, split)
    if sub is not None:
        return sub
    if any(_subdir(r, m) is not None for m in marker):
        return r
    raise ValueError(f"root: {str(r)!r} holds neither {split}/ nor any of {list(marker)}")


_P3_TRAIN_TASKS = ("denoise_15", "denoise_25", "denoise_50", "derain", "dehaze")


class PromptIR3TrainDataset(_FolderTrain):
    """The PromptIR/AirNet 3-task training tree under ``root`` (the folder holding ``Train/``, or ``Train`` itself)::

        Train/Denoise/**/*.png                          clean images; noise sigma 15/25/50 added on the fly
        Train/Derain/rainy/rain-N.png + gt/norain-N.png
        Train/Dehaze/synthetic/**/ID_A_B.jpg + original/ID.jpg

    Provides those of the five 3-task names that are in ``tasks`` (each noise level is a separate task over the
    same clean images); a requested one whose folder is missing or empty is an error naming the folder.
    """

    def __init__(self, root: PathLike, tasks, *, patch_size: int = 128, seed: int = 0, augment: bool = True,
                 skip_bad_images: bool = False):
        super().__init__(tasks, patch_size=patch_size, seed=seed, augment=augment, skip_bad_images=skip_bad_images)
        _add_promptir3_records(self, root, _PROMPTIR3_TRAIN)


class PromptIR3TestDataset(_FolderEval):
    """The PromptIR/AirNet 3-task test tree under ``root`` (the folder holding ``test/``, or ``test`` itself)::

        test/denoise/bsd68/*.png                        clean; fixed seeded noise per sigma task
        test/derain/Rain100L/{input,target}/NAME.png
        test/dehaze/{input,target}: input/ID_A_B.jpg <-> target/ID.png

    Noise is added in float and clipped (PromptIR adds it in 8-bit and truncates), seeded by (seed, task, image).
    """

    def __init__(self, root: PathLike, tasks, *, seed: int = 0, crop: Optional[int] = None, size_multiple: int = 16,
                 max_images: Optional[int] = None, skip_bad_images: bool = False):
        super().__init__(tasks, seed=seed, crop=crop, size_multiple=size_multiple, max_images=max_images,
                         skip_bad_images=skip_bad_images)
        _add_promptir3_records(self, root, _PROMPTIR3_TEST, self._limit)


# Folder names of the two PromptIR/AirNet trees: the split folder and its three task folders, the clean images of
# the noise tasks, and (folder, degraded, ground truth) for deraining and dehazing.
_PROMPTIR3_TRAIN = ("Train", ("Denoise", "Derain", "Dehaze"), "Denoise", ("Derain", "rainy", "gt"),
                    ("Dehaze", "synthetic", "original"))
_PROMPTIR3_TEST = ("test", ("denoise", "derain", "dehaze"), "denoise/bsd68", ("derain/Rain100L", "input", "target"),
                   ("dehaze", "input", "target"))


def _add_promptir3_records(ds, root: PathLike, layout: tuple, limit=lambda records: records) -> None:
    """Fills ``ds.records`` from a PromptIR/AirNet 3-task tree with the given ``layout`` (one of the two above);
    ``limit`` cuts each task's list (the test set's ``max_images``)."""
    split, markers, denoise, derain, dehaze = layout
    base = _resolve_split(root, split, markers)
    ds.root = base
    want = _promptir3_tasks(ds.tasks)
    if any(t in _NOISE_SIGMA for t in want):
        clean = limit(list_images(_need_dir(base, denoise)))
        for t in want:
            if t in _NOISE_SIGMA:
                ds.records += [(t, None, p) for p in clean]
    for task, (folder, lq_dir, gt_dir), gt_names in (("derain", derain, _rain_gt_names),
                                                      ("dehaze", dehaze, _haze_gt_names)):
        if task in want:
            d = _need_dir(base, folder)
            pairs, missing = _pair_files(list_images(_need_dir(d, lq_dir)), _need_dir(d, gt_dir), gt_names)
            ds._add_missing(missing, task)
            ds.records += [(task, lq, gt) for lq, gt in limit(pairs)]
    ds._finalize()
    _require_each(ds, want)


def _need_dir(base: Path, name: str) -> Path:
    d = _subdir(base, name)
    if d is None:
        raise ValueError(f"root: expected folder {str(base / name)!r} (PromptIR/AirNet layout)")
    return d


def _use_clean_images(ds: RestorationDataset, root: PathLike, clean: list) -> None:
    """Every clean image of ``root`` under every task of ``ds`` (degraded on the fly)."""
    _check_embedded_tasks(ds.tasks)
    ds.root = Path(root)
    if not clean:
        raise ValueError(f"root: no images under {str(root)!r}")
    ds.records = [(t, None, p) for t in ds.tasks for p in clean]
    ds._finalize()
    _require_each(ds, list(ds.tasks))


def _promptir3_tasks(tasks) -> list[str]:
    """The 3-task tree's tasks that ``tasks`` asks for (at least one, else a ValueError)."""
    want = [t for t in _P3_TRAIN_TASKS if t in tasks]
    if not want:
        raise ValueError(f"tasks: the 3-task tree provides {list(_P3_TRAIN_TASKS)}, none of which is in {tasks}")
    return want


def _require_each(ds: RestorationDataset, want: Sequence[str]) -> None:
    empty = [t for t in want if t not in ds.tasks_present]
    if empty:
        raise ValueError(f"root: no usable images for task(s) {empty} under {str(getattr(ds, 'root', '?'))!r}")


def _check_task(task: str, tasks: TaskSet) -> str:
    if task not in tasks:
        raise ValueError(f"task: {task!r} is not one of the run's tasks {list(tasks)}")
    return task


class PairedTrainDataset(_FolderTrain):
    """Random patches of (lq, gt) file pairs of one task (GoPro blur/sharp, LOL low/high, any lq/gt folder)."""

    def __init__(self, pairs: Sequence[Pair], task: str, tasks, *, patch_size: int = 128, seed: int = 0,
                 augment: bool = True, skip_bad_images: bool = False, missing: Sequence[tuple[str, str]] = ()):
        super().__init__(tasks, patch_size=patch_size, seed=seed, augment=augment, skip_bad_images=skip_bad_images)
        _check_task(task, self.tasks)
        self._add_missing(missing, task)
        self.records = [(task, str(lq), str(gt)) for lq, gt in pairs]
        self._finalize()
        if not self.records:
            raise ValueError(f"pairs: no usable (lq, gt) image pairs for task {task!r}")


class PairedEvalDataset(_FolderEval):
    """Whole-image (lq, gt) pairs of one task for evaluation."""

    def __init__(self, pairs: Sequence[Pair], task: str, tasks, *, crop: Optional[int] = None,
                 size_multiple: int = 16, max_images: Optional[int] = None, skip_bad_images: bool = False,
                 missing: Sequence[tuple[str, str]] = ()):
        super().__init__(tasks, crop=crop, size_multiple=size_multiple, max_images=max_images,
                         skip_bad_images=skip_bad_images)
        _check_task(task, self.tasks)
        self._add_missing(missing, task)
        self.records = [(task, str(lq), str(gt)) for lq, gt in self._limit(list(pairs))]
        self._finalize()
        if not self.records:
            raise ValueError(f"pairs: no usable (lq, gt) image pairs for task {task!r}")


class CleanTrainDataset(_FolderTrain):
    """Clean images under ``root`` (recursively, minus the ``exclude`` folders), every task of ``tasks``
    synthesised on the fly (as MiOIR trains its 7 tasks from clean DF2K images). Item ``i`` is image ``i % n``
    under task ``i // n``."""

    def __init__(self, root: PathLike, tasks, *, patch_size: int = 128, seed: int = 0, augment: bool = True,
                 skip_bad_images: bool = False, exclude: Sequence[PathLike] = ()):
        super().__init__(tasks, patch_size=patch_size, seed=seed, augment=augment, skip_bad_images=skip_bad_images)
        _use_clean_images(self, root, list_images(root, exclude) if os.path.isdir(root) else [])


class CleanEvalDataset(_FolderEval):
    """Clean images under ``root`` with a fixed seeded degradation per (task, image), for every task of ``tasks``."""

    def __init__(self, root: PathLike, tasks, *, seed: int = 0, crop: Optional[int] = None, size_multiple: int = 16,
                 max_images: Optional[int] = None, skip_bad_images: bool = False):
        super().__init__(tasks, seed=seed, crop=crop, size_multiple=size_multiple, max_images=max_images,
                         skip_bad_images=skip_bad_images)
        _use_clean_images(self, root, self._limit(list_images(root) if os.path.isdir(root) else []))


class CombinedDataset(RestorationDataset):
    """Several datasets of the same task set, one after another (e.g. the 5-task setting)."""

    def __init__(self, datasets: Sequence[RestorationDataset]):
        if not datasets:
            raise ValueError("datasets: expected at least one dataset")
        super().__init__(datasets[0].tasks)
        for d in datasets:
            if not isinstance(d, RestorationDataset):
                raise TypeError(f"datasets: expected RestorationDataset instances, got {type(d).__name__}")
            if d.tasks != self.tasks:
                raise ValueError(f"datasets: all parts must use the same task set, got {d.tasks} and {self.tasks}")
        self.datasets = list(datasets)
        self.wraps_keys = all(d.wraps_keys for d in self.datasets)
        self.offsets = np.cumsum([0] + [len(d) for d in self.datasets])
        for d in self.datasets:
            self.task_ids += d.task_ids

    @property
    def bad_images(self) -> list[str]:
        return [p for d in self.datasets for p in d.bad_images]

    def __getitem__(self, key: int) -> dict:
        key = int(key)
        index = self._index(key)
        epoch = key // len(self)
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        local = index - int(self.offsets[part])
        # A part sees its own epoch-shifted key, so its randomness advances per epoch exactly as it would alone.
        return self.datasets[part][local + epoch * len(self.datasets[part])]


# ----------------------------------------------------------------------------- torch helpers

def items_to_batch(items: Sequence[dict]) -> dict:
    """Collate items as ``default_collate`` does (kept for callers that batch by hand)."""
    return {"lq": torch.stack([i["lq"] for i in items]), "gt": torch.stack([i["gt"] for i in items]),
            "task": [i["task"] for i in items], "task_id": torch.tensor([i["task_id"] for i in items])}
