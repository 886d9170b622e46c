"""Datasets and loaders from the ``data:`` section of a run config (the keys are documented in :mod:`tur_ext.data`)."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader

from ..tasks import TaskSet
from .datasets import (EVAL_IMAGES, TRAIN_IMAGES, CleanEvalDataset, CleanTrainDataset, CombinedDataset,
                       EmbeddedEvalDataset, EmbeddedTrainDataset, PairedEvalDataset, PairedTrainDataset,
                       PromptIR3TestDataset, PromptIR3TrainDataset, RestorationDataset, _subdir, find_pairs)
from .mio import MiOTestDataset, MiOTrainDataset
from .weather import (ALLWEATHER_TASK_PATTERNS, AllWeatherTestDataset, AllWeatherTrainDataset,
                      RealWeatherTestDataset, RealWeatherTrainDataset, outdoor_rain_gt_names, raindrop_gt_names)
from .sampler import TaskBalancedBatchSampler, worker_init_fn

Tasks = Union[TaskSet, str, Sequence[str]]

#: Keys a sub-dataset of ``type: combined`` inherits from its parent.
INHERITED_KEYS = ("seed", "patch_size", "augment", "skip_bad_images", "length", "eval_crop", "eval_crops_per_task",
                  "size_multiple", "max_eval_images")
#: Keys that describe one source.
SOURCE_KEYS = ("type", "root", "train_root", "eval_root", "task", "datasets", "lq_dir", "gt_dir", "train_images",
               "eval_images", "list_file", "test_lists", "task_patterns", "list_dir")
#: Keys the data builders ignore so that the trainer may keep its loader settings in the same section.
LOADER_KEYS = ("batch_size", "eval_batch_size", "num_workers", "pin_memory", "persistent_workers", "prefetch_factor",
               "num_batches", "batches_per_epoch")
_SECTIONS = ("train", "eval")
_ALLOWED = set(INHERITED_KEYS) | set(SOURCE_KEYS) | set(LOADER_KEYS) | set(_SECTIONS)

# Split folder names of the public layouts, tried in order (case-insensitive; nested paths allowed).
_TRAIN_SPLITS = {"gopro": ("train",), "lol": ("our485", "train"), "paired": ("train",), "clean": ("train",),
                 "snow100k": ("all", "train"), "outdoor_rain": ("train",), "raindrop": ("train",)}
_EVAL_SPLITS = {"gopro": ("test",), "lol": ("eval15", "test"), "paired": ("test", "val"), "clean": ("test", "val"),
                "snow100k": ("test/Snow100K-L", "Snow100K-L", "test"), "outdoor_rain": ("test1", "test"),
                "raindrop": ("test_a", "test")}
# (lq folder names, gt folder names, task, gt file names of an lq file name or None: the same) of the fixed-task
# paired layouts: GoPro as released (blur/sharp per sequence) or as TUR/Restormer lay it out (input/target);
# Snow100K (synthetic/gt; TransWeather's copies input/gt), Outdoor-Rain (in/gt), RainDrop (data/gt) as released.
_PAIR_LAYOUT = {"gopro": (("blur", "input"), ("sharp", "target"), "deblur", None),
                "lol": (("low",), ("high", "gt", "normal"), "lowlight", None),
                "snow100k": (("synthetic", "input"), ("gt",), "snow", None),
                "outdoor_rain": (("in", "input", "data"), ("gt",), "rain_fog", outdoor_rain_gt_names),
                "raindrop": (("data", "input"), ("gt",), "raindrop", raindrop_gt_names)}
# Multi-task trees: split -> (folder names under ROOT, whether ROOT itself may serve when none exists).
_TREE_SPLITS = {"allweather": {"train": (("train",), True), "eval": (("test",), True)},
                "real_weather": {"train": (("train",), True), "eval": (("test",), False)},
                "mio": {"train": (("DF2K", "train"), True), "eval": (("CL_test", "MiO_test", "test"), False)}}


def _section(cfg: Optional[Mapping[str, Any]], which: str) -> dict:
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, Mapping):
        raise TypeError(f"data: expected a mapping (the data: section of a config), got {type(cfg).__name__}")
    spec = {k: v for k, v in cfg.items() if k not in _SECTIONS}
    sub = cfg.get(which)
    if sub is not None:
        if not isinstance(sub, Mapping):
            raise TypeError(f"data.{which}: expected a mapping, got {type(sub).__name__}")
        if "type" in sub and sub["type"] != spec.get("type"):
            # A different source in the section replaces the top-level source keys instead of mixing with them.
            spec = {k: v for k, v in spec.items() if k not in SOURCE_KEYS}
        spec.update(sub)
    return spec


def _check_keys(spec: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(spec) - _ALLOWED)
    if unknown:
        hints = [f"{k!r} -> {close[0]!r}" for k in unknown
                 for close in [difflib.get_close_matches(k, sorted(_ALLOWED), n=1)] if close]
        hint = f"; did you mean {', '.join(hints)}?" if hints else ""
        raise ValueError(f"{where}: unknown key(s) {unknown}{hint} (expected some of {sorted(_ALLOWED)})")


def _get(spec: Mapping[str, Any], key: str, default: Any, kind: type, where: str) -> Any:
    v = spec.get(key, default)
    if v is None or kind is object:
        return v
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise TypeError(f"{where}.{key}: expected an int, got {v!r}")
    if kind is bool and not isinstance(v, bool):
        raise TypeError(f"{where}.{key}: expected true/false, got {v!r}")
    if kind is str and not isinstance(v, (str, Path)):
        raise TypeError(f"{where}.{key}: expected a string, got {v!r}")
    return v


def _find_split(root: Path, names: Sequence[str]) -> Optional[Path]:
    """The first of ``names`` (case-insensitive; a nested ``a/b`` too) that is a folder under ``root``."""
    return _subdir(root, *names)


def _split_dir(spec: Mapping[str, Any], kind: str, split: str, where: str) -> tuple[Path, list[Path]]:
    """The folder of ``split`` and the folders to leave out of its recursive scan (a held-out split inside it)."""
    explicit = spec.get(f"{split}_root")
    if explicit is not None:
        return Path(explicit), []
    root = _need_root(spec, kind, split, where)
    found = _find_split(root, (_TRAIN_SPLITS if split == "train" else _EVAL_SPLITS)[kind])
    if found is not None:
        return found, []
    if split == "train":
        # Training from ROOT itself: never from the held-out split that may sit inside it.
        held_out = _find_split(root, _EVAL_SPLITS[kind])
        return root, [held_out] if held_out is not None else []
    raise ValueError(f"{where}: no held-out split for type {kind!r} under {str(root)!r}: expected a folder named one "
                     f"of {list(_EVAL_SPLITS[kind])} or an eval_root key")


def _need_root(spec: Mapping[str, Any], kind: str, split: str, where: str) -> Path:
    root = spec.get("root")
    if root is None:
        raise ValueError(f"{where}: type {kind!r} needs a root (or {split}_root) folder")
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{where}.root: folder {str(root)!r} does not exist")
    return root


def _tree_dir(spec: Mapping[str, Any], kind: str, split: str, where: str) -> Path:
    """The folder of a multi-task tree for ``split``: ``<split>_root``, else ROOT/<split folder> (see
    ``_TREE_SPLITS``), else ROOT itself where the layout keeps both splits apart by file names (``None`` entry)."""
    explicit = spec.get(f"{split}_root")
    if explicit is not None:
        return Path(explicit)
    root = _need_root(spec, kind, split, where)
    names, root_ok = _TREE_SPLITS[kind][split]
    found = _find_split(root, names)
    if found is not None:
        return found
    if root_ok:
        return root
    raise ValueError(f"{where}: no {split} split for type {kind!r} under {str(root)!r}: expected a folder named one "
                     f"of {list(names)} or an {split}_root key")


@dataclass(frozen=True)
class _Common:
    """The settings every source shares, parsed once."""

    train: bool
    seed: int
    patch: int
    augment: bool
    skip: bool
    size_multiple: int
    max_images: Optional[int]
    crop: Optional[int]

    def train_kw(self) -> dict:
        return dict(patch_size=self.patch, seed=self.seed, augment=self.augment, skip_bad_images=self.skip)

    def eval_kw(self) -> dict:
        return dict(seed=self.seed, crop=self.crop, size_multiple=self.size_multiple, max_images=self.max_images,
                    skip_bad_images=self.skip)


def _embedded(spec, tasks, split, where, c: _Common) -> RestorationDataset:
    if c.train:
        return EmbeddedTrainDataset(tasks, patch_size=c.patch, length=_get(spec, "length", 1000, int, where),
                                    seed=c.seed, augment=c.augment,
                                    images=tuple(spec.get("train_images") or TRAIN_IMAGES))
    return EmbeddedEvalDataset(tasks, crop_size=_get(spec, "eval_crop", 128, int, where),
                               crops_per_task=_get(spec, "eval_crops_per_task", 4, int, where), seed=c.seed,
                               images=tuple(spec.get("eval_images") or EVAL_IMAGES))


def _promptir3(spec, tasks, split, where, c: _Common) -> RestorationDataset:
    root = spec.get(f"{split}_root") or spec.get("root")
    if root is None:
        raise ValueError(f"{where}: type 'promptir3' needs a root folder (holding Train/ and test/)")
    if c.train:
        return PromptIR3TrainDataset(root, tasks, **c.train_kw())
    return PromptIR3TestDataset(root, tasks, **c.eval_kw())


def _clean(spec, tasks, split, where, c: _Common) -> RestorationDataset:
    d, exclude = _split_dir(spec, "clean", split, where)
    if c.train:
        return CleanTrainDataset(d, tasks, exclude=exclude, **c.train_kw())
    return CleanEvalDataset(d, tasks, **c.eval_kw())


def _paired(kind: str):
    """The builder of a one-task paired-folder layout (``_PAIR_LAYOUT``), or of ``paired`` (folders from keys)."""

    def build(spec, tasks, split, where, c: _Common) -> RestorationDataset:
        if kind == "paired":
            task = _get(spec, "task", None, str, where)
            if task is None:
                raise ValueError(f"{where}: type 'paired' needs a task name (task: ...)")
            lq_names, gt_names, gt_rule = (spec.get("lq_dir", "lq"),), (spec.get("gt_dir", "gt"),), None
        else:
            lq_names, gt_names, task, gt_rule = _PAIR_LAYOUT[kind]
            if spec.get("task", task) != task:
                raise ValueError(f"{where}.task: type {kind!r} is task {task!r}, got {spec['task']!r}")
        d, exclude = _split_dir(spec, kind, split, where)
        pairs, missing = find_pairs(d, lq_names, gt_names, exclude, **({"gt_names": gt_rule} if gt_rule else {}))
        if not pairs and not missing:
            raise ValueError(f"{where}: no {'|'.join(lq_names)}/ folder with a sibling {'|'.join(gt_names)}/ folder "
                             f"under {str(d)!r}")
        if c.train:
            return PairedTrainDataset(pairs, task, tasks, missing=missing, **c.train_kw())
        kw = c.eval_kw()
        kw.pop("seed")
        return PairedEvalDataset(pairs, task, tasks, missing=missing, **kw)

    return build


def _allweather(spec, tasks, split, where, c: _Common) -> RestorationDataset:
    d = _tree_dir(spec, "allweather", split, where)
    if c.train:
        return AllWeatherTrainDataset(d, tasks, list_file=_get(spec, "list_file", "allweather.txt", str, where),
                                      task_patterns=spec.get("task_patterns") or ALLWEATHER_TASK_PATTERNS,
                                      **c.train_kw())
    lists = spec.get("test_lists")
    if lists is not None and not isinstance(lists, Mapping):
        raise TypeError(f"{where}.test_lists: expected a mapping {{task: list file name}}, got {lists!r}")
    return AllWeatherTestDataset(d, tasks, lists=lists, **c.eval_kw())


def _real_weather(spec, tasks, split, where, c: _Common) -> RestorationDataset:
    d = _tree_dir(spec, "real_weather", split, where)
    if c.train:
        return RealWeatherTrainDataset(d, tasks, list_dir=spec.get("list_dir"), **c.train_kw())
    return RealWeatherTestDataset(d, tasks, **c.eval_kw())


def _mio(spec, tasks, split, where, c: _Common) -> RestorationDataset:
    d = _tree_dir(spec, "mio", split, where)
    if c.train:
        return MiOTrainDataset(d, tasks, **c.train_kw())
    return MiOTestDataset(d, tasks, **c.eval_kw())


def _combined(spec, tasks, split, where, c: _Common) -> RestorationDataset:
    parts = spec.get("datasets")
    if not isinstance(parts, (list, tuple)) or not parts:
        raise ValueError(f"{where}.datasets: type 'combined' needs a non-empty list of dataset sections")
    built = []
    for i, part in enumerate(parts):
        if not isinstance(part, Mapping):
            raise TypeError(f"{where}.datasets[{i}]: expected a mapping, got {type(part).__name__}")
        child = {k: spec[k] for k in INHERITED_KEYS if k in spec}
        child.update(part)
        # Distinct streams per part: parts with the same seed would otherwise draw correlated crops.
        child["seed"] = int(child.get("seed", 0)) + 1_000_003 * (i + 1)
        built.append(_build(child, tasks, split, f"{where}.datasets[{i}]"))
    return CombinedDataset(built)


#: ``data.type`` -> its builder ``(spec, tasks, split, where, common) -> dataset``: the one place sources are
#: registered.
BUILDERS = {
    "embedded": _embedded,
    "promptir3": _promptir3,
    "gopro": _paired("gopro"),
    "lol": _paired("lol"),
    "paired": _paired("paired"),
    "clean": _clean,
    "snow100k": _paired("snow100k"),
    "outdoor_rain": _paired("outdoor_rain"),
    "raindrop": _paired("raindrop"),
    "allweather": _allweather,
    "real_weather": _real_weather,
    "mio": _mio,
    "combined": _combined,
}


def _build(spec: dict, tasks: TaskSet, split: str, where: str) -> RestorationDataset:
    _check_keys(spec, where)
    kind = _get(spec, "type", "embedded", str, where)
    if kind not in BUILDERS:
        close = difflib.get_close_matches(kind, list(BUILDERS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{where}.type: unknown data type {kind!r}{hint} (expected one of {list(BUILDERS)})")
    common = _Common(train=split == "train", seed=_get(spec, "seed", 0, int, where),
                     patch=_get(spec, "patch_size", 128, int, where), augment=_get(spec, "augment", True, bool, where),
                     skip=_get(spec, "skip_bad_images", False, bool, where),
                     size_multiple=_get(spec, "size_multiple", 16, int, where),
                     max_images=_get(spec, "max_eval_images", None, int, where),
                     crop=None if kind == "embedded" else _get(spec, "eval_crop", None, int, where))
    return BUILDERS[kind](spec, tasks, split, where, common)


def build_train_dataset(cfg: Optional[Mapping[str, Any]], tasks: Tasks) -> RestorationDataset:
    """The training dataset of the ``data:`` config section; every task of ``tasks`` must have items."""
    tasks = tasks if isinstance(tasks, TaskSet) else TaskSet(tasks)
    ds = _build(_section(cfg, "train"), tasks, "train", "data")
    missing = [t for t in tasks if t not in ds.tasks_present]
    if missing:
        raise ValueError(f"data: the training data has no items for task(s) {missing} of the run's tasks "
                         f"{list(tasks)}; add a source for them (type: combined) or drop them from the task set")
    return ds


def build_eval_dataset(cfg: Optional[Mapping[str, Any]], tasks: Tasks) -> RestorationDataset:
    """The evaluation dataset of the ``data:`` config section (the run's tasks that the source provides)."""
    tasks = tasks if isinstance(tasks, TaskSet) else TaskSet(tasks)
    return _build(_section(cfg, "eval"), tasks, "eval", "data")


def build_train_loader(dataset: RestorationDataset, batch_size: int, *, seed: int = 0, num_workers: int = 0,
                       rank: int = 0, world_size: int = 1, num_batches: Optional[int] = None,
                       pin_memory: bool = False, persistent_workers: bool = False) -> DataLoader:
    """A loader of task-balanced batches (``batch_size`` per rank). Call ``loader.batch_sampler.set_epoch(epoch,
    start_batch)`` before iterating an epoch; the batches depend only on (seed, epoch, rank, world_size)."""
    if not isinstance(dataset, RestorationDataset):
        raise TypeError(f"dataset: expected a tur_ext.data dataset (with task_ids), got {type(dataset).__name__}")
    sampler = TaskBalancedBatchSampler(dataset.task_ids, batch_size, seed=seed, rank=rank, world_size=world_size,
                                       num_batches=num_batches)
    gen = torch.Generator()
    gen.manual_seed(int(seed) * 1_000 + int(rank))
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, worker_init_fn=worker_init_fn,
                      generator=gen, pin_memory=pin_memory, persistent_workers=persistent_workers and num_workers > 0)


def build_eval_loader(dataset: RestorationDataset, batch_size: int = 1, *, num_workers: int = 0) -> DataLoader:
    """A sequential loader over an evaluation dataset."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      worker_init_fn=worker_init_fn)


def dataset_summary(dataset: RestorationDataset) -> str:
    """One line for the log: class, size, items per task and skipped images."""
    counts: dict[str, int] = {}
    for tid in dataset.task_ids:
        name = dataset.tasks[tid]
        counts[name] = counts.get(name, 0) + 1
    per_task = ", ".join(f"{k}={v}" for k, v in counts.items())
    return (f"{type(dataset).__name__}: {len(dataset)} items ({per_task}); "
            f"{dataset.num_bad_images} unreadable image(s) skipped")


__all__ = ["build_train_dataset", "build_eval_dataset", "build_train_loader", "build_eval_loader",
           "dataset_summary", "INHERITED_KEYS", "SOURCE_KEYS", "LOADER_KEYS"]
