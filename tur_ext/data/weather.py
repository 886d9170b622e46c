"""Deweathering data in the published layouts.

* TransWeather's **AllWeather** tree: list files of input paths (``allweather.txt`` for training; ``test1.txt``,
  ``raindroptesta.txt``, ``snowtest100k_L.txt`` for its three test sets), each path relative to the list's folder,
  the ground truth at the same path with ``input`` replaced by ``gt`` (TransWeather's ``train_data_functions.py``
  and ``val_data_functions.py``; WeatherDiffusion reads the same files). When that file is absent the gt folder is
  searched for the benchmark's own gt name (Outdoor-Rain ``im_0001_s80_a04.png`` -> ``im_0001.png``, RainDrop
  ``0_rain.png`` -> ``0_clean.png``, Snow100K the same name).
* The **real-world deweathering** set of the TUR release (``Transweather_TUR_real.pth``): WGWS-Net's real-world
  setting (Setting 3: SPA+ rain, RealSnow, REVIDE haze), listed and named as TUR's ``PromptTrainDataset`` reads it
  (tasks ``real_rain``, ``real_snow``, ``real_fog``; list files ``data_dir/real_rain/rain.txt`` etc.), and its test
  folders as WGWS-Net's ``testing_model_Seting3.py`` reads them (lq and gt of the same name).

The single benchmark folders (Snow100K, Outdoor-Rain, RainDrop in their original layouts) are paired folders:
:mod:`tur_ext.data.build` reads them with :func:`~tur_ext.data.datasets.find_pairs` and the gt-name rules below.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

from .datasets import (PathLike, _DirIndex, _FolderEval, _FolderTrain, _require_each, _subdir, find_pairs,
                       list_images)
from .io import ImageReadError

log = logging.getLogger("tur_ext.data")

# ----------------------------------------------------------------------------- ground-truth names

_OUTDOOR_RAIN = re.compile(r"^(.*?)_s\d+_a\d+(\.[^.]+)$")
_RAINDROP = re.compile(r"^(.*)_rain(\.[^.]+)$")


def outdoor_rain_gt_names(name: str) -> list[str]:
    """Outdoor-Rain (Li et al. 2019): ``im_0001_s80_a04.png`` (streak and fog parameters) -> ``im_0001.png``."""
    m = _OUTDOOR_RAIN.match(name)
    return [name] if m is None else [m.group(1) + m.group(2), m.group(1) + ".png", name]


def raindrop_gt_names(name: str) -> list[str]:
    """RainDrop (Qian et al. 2018): ``0_rain.png`` -> ``0_clean.png``."""
    m = _RAINDROP.match(name)
    return [name] if m is None else [m.group(1) + "_clean" + m.group(2), m.group(1) + "_clean.png", name]


def spa_gt_names(name: str) -> list[str]:
    """SPA / SPA+ test (Wang et al. 2019): ``rain/NAME.png`` -> ``gt/NAMEgt.png``; WGWS-Net's SPA+ copy keeps the
    name."""
    stem = os.path.splitext(name)[0]
    return [name, stem + "gt.png"]


def same_name(name: str) -> list[str]:
    return [name]


#: gt file names to try for an lq file name, per weather task (first existing wins; then any file of that stem).
GT_NAMES: dict[str, Callable[[str], list[str]]] = {
    "snow": same_name, "rain_fog": outdoor_rain_gt_names, "raindrop": raindrop_gt_names,
    "real_rain": spa_gt_names, "real_snow": same_name, "real_fog": same_name,
}

# ----------------------------------------------------------------------------- list files

#: AllWeather training lines -> task: the first pattern that matches the listed path (``re.search``) wins. The list
#: mixes Outdoor-Rain (``im_NNNN_sSS_aAA``), RainDrop (``N_rain``) and Snow100K (free scene names) files and
#: carries no labels, so Snow100K is whatever matches neither of the other two.
ALLWEATHER_TASK_PATTERNS: tuple[tuple[str, str], ...] = (
    ("rain_fog", r"_s\d+_a\d+\.[^./]+$"),
    ("raindrop", r"(^|/)\d+_(rain|clean)\.[^./]+$"),
    ("snow", r""),
)
#: The list file of each AllWeather test set (TransWeather's ``data/test/``; found anywhere under the root).
ALLWEATHER_TEST_LISTS: dict[str, str] = {"snow": "snowtest100k_L.txt", "rain_fog": "test1.txt",
                                         "raindrop": "raindroptesta.txt"}


def read_list_file(path: PathLike) -> list[tuple[str, Optional[str]]]:
    """The entries of a list file: ``(lq, gt or None)`` per non-empty line, paths relative to the list's folder
    (leading ``./`` and ``/`` dropped, as TransWeather joins them by string concatenation). A line of two
    whitespace-separated paths names its gt explicitly (SPA's ``real_world.txt``, WGWS-Net's lists)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"list file: no such file {str(p)!r}")
    out = []
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) > 2:
            raise ValueError(f"list file {str(p)!r}: expected 'INPUT' or 'INPUT GT' per line, got {line!r}")
        out.append(tuple(_relative(x) for x in parts) if len(parts) == 2 else (_relative(parts[0]), None))
    if not out:
        raise ValueError(f"list file {str(p)!r} lists no images")
    return out


def _relative(entry: str) -> str:
    entry = entry.replace("\\", "/")
    while entry.startswith("./"):
        entry = entry[2:]
    return entry.lstrip("/")


def find_file(root: PathLike, name: str) -> Optional[Path]:
    """The shallowest file called ``name`` (case-insensitive) under ``root``; the first in sorted order at that
    depth."""
    want = name.lower()
    best: Optional[tuple[int, str]] = None
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        if best is not None and depth > best[0]:
            continue
        for f in sorted(filenames):
            if f.lower() == want and (best is None or depth < best[0]):
                best = (depth, os.path.join(dirpath, f))
    return None if best is None else Path(best[1])


class _Resolver:
    """Looks up lq files and their ground truths in folders listed once each (no stat per list line)."""

    def __init__(self):
        self._dirs: dict[str, _DirIndex] = {}

    def index(self, folder: str) -> _DirIndex:
        folder = os.path.normpath(folder)
        if folder not in self._dirs:
            self._dirs[folder] = _DirIndex(folder)
        return self._dirs[folder]

    def exists(self, path: str) -> bool:
        return os.path.basename(path) in self.index(os.path.dirname(path)).by_name

    def gt(self, gt_dir: str, names: Sequence[str]) -> Optional[str]:
        return self.index(gt_dir).find(names)


def transweather_gt(path: str) -> str:
    """TransWeather's rule: the gt is the listed input path with every ``input`` replaced by ``gt``."""
    return path.replace("input", "gt")


def records_from_list(ds, list_path: PathLike, task_of: Callable[[str], Optional[str]],
                      base: Optional[PathLike] = None, lq_of: Callable[[str], str] = lambda e: e,
                      gt_of: Callable[[str], str] = transweather_gt, limit: Optional[int] = None) -> None:
    """Appends ``(task, lq, gt)`` to ``ds.records`` for the entries of one list file. ``task_of(entry)`` gives the
    task (None: not one of the run's tasks, skipped); ``lq_of(entry)`` the lq path relative to ``base`` (default:
    the list's folder); ``gt_of(lq relative path)`` the gt path, whose file name may also be the benchmark's gt
    name (:data:`GT_NAMES`). Missing files go through ``ds._add_missing`` (an error naming them, or skipped)."""
    list_path = Path(list_path)
    base = str(base if base is not None else list_path.parent)
    res = _Resolver()
    missing: list[tuple[str, str]] = []
    counts: dict[str, int] = {}
    for entry, explicit_gt in read_list_file(list_path):
        task = task_of(entry)
        if task is None or (limit is not None and counts.get(task, 0) >= limit):
            continue
        rel = lq_of(entry)
        lq = os.path.normpath(os.path.join(base, rel))
        if not res.exists(lq):
            missing.append((f"{list_path}: {entry}", lq))
            continue
        if explicit_gt is not None:
            want = os.path.normpath(os.path.join(base, explicit_gt))
            gt = want if res.exists(want) else None
        else:
            want = os.path.normpath(os.path.join(base, gt_of(rel)))
            names = [os.path.basename(want)] + GT_NAMES.get(task, same_name)(os.path.basename(lq))
            gt = res.gt(os.path.dirname(want), names)
        if gt is None:
            missing.append((lq, want))
            continue
        ds.records.append((task, lq, gt))
        counts[task] = counts.get(task, 0) + 1
    _report_missing(ds, missing)


def _report_missing(ds, missing: Sequence[tuple[str, str]]) -> None:
    """``missing``: (list entry or lq path, the image expected for it). An ImageReadError naming the first (and
    the count of the others), or with ``skip_bad_images`` each skipped and counted."""
    if not missing:
        return
    if not ds.skip_bad_images:
        what, path = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ImageReadError(path, f"no such file, needed for {what!r}{more}; set skip_bad_images: true to skip")
    for what, path in missing:
        ds._skip(what, f"no such file {path!r}")


def _task_matcher(patterns, tasks) -> Callable[[str], Optional[str]]:
    """``entry -> task`` from ordered ``(task, regex)`` patterns; a match to a task outside ``tasks`` gives None."""
    if isinstance(patterns, Mapping):
        patterns = list(patterns.items())
    compiled = []
    for item in patterns:
        if not isinstance(item, (list, tuple)) or len(item) != 2 or not all(isinstance(x, str) for x in item):
            raise ValueError(f"task_patterns: expected (task, regex) pairs, got {item!r}")
        task, rx = item
        try:
            compiled.append((task, re.compile(rx)))
        except re.error as e:
            raise ValueError(f"task_patterns: bad regex {rx!r} for task {task!r}: {e}") from None
    if not compiled:
        raise ValueError("task_patterns: expected at least one (task, regex) pair")

    def task_of(entry: str) -> Optional[str]:
        for task, rx in compiled:
            if rx.search(entry):
                return task if task in tasks else None
        raise ValueError(f"task_patterns: no pattern matches the listed image {entry!r}")

    return task_of


def _weather_tasks(tasks, provided: Sequence[str], layout: str) -> list[str]:
    want = [t for t in provided if t in tasks]
    if not want:
        raise ValueError(f"tasks: the {layout} layout provides {list(provided)}, none of which is in {list(tasks)}")
    return want


def _root(root: PathLike) -> Path:
    r = Path(root)
    if not r.is_dir():
        raise ValueError(f"root: folder {str(r)!r} does not exist")
    return r


# ----------------------------------------------------------------------------- AllWeather

class AllWeatherTrainDataset(_FolderTrain):
    """TransWeather's AllWeather training set under ``root`` (any folder holding the list file, e.g. TransWeather's
    ``data/train`` or WeatherDiffusion's ``data/allweather``)::

        allweather.txt              one input path per line, relative to this folder
        <set>/input/NAME            the listed inputs (Snow100K, Outdoor-Rain and RainDrop images, 18,069 in all)
        <set>/gt/NAME               ground truth: the listed path with "input" -> "gt"

    The task of each line comes from ``task_patterns`` (default :data:`ALLWEATHER_TASK_PATTERNS`); lines of tasks
    outside ``tasks`` are left out.
    """

    def __init__(self, root: PathLike, tasks, *, list_file: str = "allweather.txt",
                 task_patterns=ALLWEATHER_TASK_PATTERNS, patch_size: int = 256, seed: int = 0, augment: bool = True,
                 skip_bad_images: bool = False):
        super().__init__(tasks, patch_size=patch_size, seed=seed, augment=augment, skip_bad_images=skip_bad_images)
        self.root = _root(root)
        path = find_file(self.root, list_file)
        if path is None:
            raise ValueError(f"root: no list file {list_file!r} under {str(self.root)!r} (AllWeather layout)")
        self.list_file = path
        matcher = _task_matcher(task_patterns, self.tasks)
        provided = [t for t, _ in (task_patterns.items() if isinstance(task_patterns, Mapping) else task_patterns)]
        want = _weather_tasks(self.tasks, provided, "AllWeather")
        records_from_list(self, path, matcher)
        self._finalize()
        _require_each(self, want)


class AllWeatherTestDataset(_FolderEval):
    """TransWeather's test sets under ``root`` (its ``data/test``, or WeatherDiffusion's ``data`` with one folder
    per set): for each task a list file (default :data:`ALLWEATHER_TEST_LISTS`: Snow100K-L
    ``snowtest100k_L.txt``, Outdoor-Rain Test1 ``test1.txt``, RainDrop test_a ``raindroptesta.txt``) found
    anywhere under ``root``, its lines relative to its folder, gt by "input" -> "gt" or the benchmark's gt name.
    The tasks of ``tasks`` whose list is missing are absent (a warning names them); none found is an error."""

    def __init__(self, root: PathLike, tasks, *, lists: Optional[Mapping[str, str]] = None, seed: int = 0,
                 crop: Optional[int] = None, size_multiple: int = 16, max_images: Optional[int] = None,
                 skip_bad_images: bool = False):
        super().__init__(tasks, seed=seed, crop=crop, size_multiple=size_multiple, max_images=max_images,
                         skip_bad_images=skip_bad_images)
        self.root = _root(root)
        lists = dict(ALLWEATHER_TEST_LISTS if lists is None else lists)
        want = _weather_tasks(self.tasks, list(lists), "AllWeather test")
        self.list_files: dict[str, Path] = {}
        for task in want:
            path = find_file(self.root, lists[task])
            if path is None:
                log.warning("AllWeather test: no list %r for task %s under %r", lists[task], task, str(self.root))
                continue
            self.list_files[task] = path
            records_from_list(self, path, lambda _e, t=task: t, limit=self.max_images)
        if not self.list_files:
            raise ValueError(f"root: none of the test lists {[lists[t] for t in want]} under {str(self.root)!r}")
        self._finalize()
        _require_each(self, list(self.list_files))


# ----------------------------------------------------------------------------- real-world deweathering (TUR release)

def _rain_lq(entry: str) -> str:
    # TUR: real_rain/input/<id up to its first "_">/<id>   ("多了一层序号文件夹": one more numbered folder level)
    return f"input/{entry.split('_')[0]}/{entry}"


def _rain_gt(rel: str) -> str:
    # TUR: input/ -> gt/, and the file name cut at its first "-" + ".png"
    folder, name = os.path.split(rel)
    return os.path.join(folder.replace("input", "gt", 1), name.split("-")[0] + ".png")


def _snow_gt(rel: str) -> str:
    # TUR: <everything before input/>gt/<file name>
    head = rel.split("input/")[0] if "input/" in rel else ""
    return head + "gt/" + os.path.basename(rel)


def _fog_gt(rel: str) -> str:
    return rel.replace("input/", "gt/")


#: task -> (folder names under the root, TUR's list file under ``data_dir``, list entry -> lq path in the task
#: folder, lq path -> gt path) as TUR's ``PromptTrainDataset`` (``_init_real_*_ids`` / ``_get_clean_real_*_name``).
REAL_WEATHER_LAYOUT = {
    "real_rain": (("real_rain", "SPA+", "SPA"), "real_rain/rain.txt", _rain_lq, _rain_gt),
    "real_snow": (("real_snow", "RealSnow"), "real_snow/snow.txt", lambda e: f"input/{e}", _snow_gt),
    "real_fog": (("real_fog", "REVIDE"), "real_fog/fog.txt", lambda e: e, _fog_gt),
}
#: lq / gt folder names of the real-world test pairs (WGWS-Net: SPA+ ``real_test_1000/rain_jpg`` + ``gt_jpg``,
#: REVIDE ``Test/hazy_re`` + ``gt_re``, RealSnow ``video2imgs_IN_testing_re`` + ``video2imgs_GT_testing_re``; SPA's
#: own ``rain`` + ``gt``; ours ``input`` + ``gt``).
REAL_TEST_LQ = ("input", "rain_jpg", "rain", "hazy_re", "hazy", "video2imgs_IN_testing_re")
REAL_TEST_GT = ("gt", "gt_jpg", "gt_re", "video2imgs_GT_testing_re")


def _scan_inputs(folder: Path) -> list[str]:
    """Images under ``folder`` with an ``input`` folder in their path, relative to ``folder`` (no list file)."""
    out = []
    for p in list_images(folder):
        rel = os.path.relpath(p, folder).replace(os.sep, "/")
        if "input" in rel.split("/")[:-1]:
            out.append(rel)
    return out


class RealWeatherTrainDataset(_FolderTrain):
    """The real-world deweathering training set of the TUR release under ``root``::

        data_dir/real_rain/rain.txt      TUR's list files (AirNet's data_dir convention; or directly under root)
        data_dir/real_snow/snow.txt
        data_dir/real_fog/fog.txt
        real_rain/input/<ID>/<ID>_<k>-<n>.png    SPA+  ->  real_rain/gt/<ID>/<ID>_<k>.png
        real_snow/input/NAME                     RealSnow  ->  real_snow/gt/NAME
        real_fog/<...>/input/<...>               REVIDE  ->  the same path with input/ -> gt/

    (task folders may also be named SPA+/SPA, RealSnow, REVIDE). A task folder without its list file uses every
    image under an ``input`` folder. ``list_dir`` overrides where the lists are (TUR's ``data_file_dir``).
    """

    def __init__(self, root: PathLike, tasks, *, list_dir: Optional[PathLike] = None, patch_size: int = 256,
                 seed: int = 0, augment: bool = True, skip_bad_images: bool = False):
        super().__init__(tasks, patch_size=patch_size, seed=seed, augment=augment, skip_bad_images=skip_bad_images)
        self.root = _root(root)
        want = _weather_tasks(self.tasks, list(REAL_WEATHER_LAYOUT), "real-world deweathering")
        list_roots = [Path(list_dir)] if list_dir is not None else [self.root / "data_dir", self.root]
        for task in want:
            names, list_rel, lq_of, gt_of = REAL_WEATHER_LAYOUT[task]
            folder = _subdir(self.root, *names)
            if folder is None:
                raise ValueError(f"root: expected a folder {'|'.join(names)} under {str(self.root)!r} for task "
                                 f"{task!r} (real-world deweathering layout)")
            list_path = next((r / list_rel for r in list_roots if (r / list_rel).is_file()), None)
            if list_path is not None:
                records_from_list(self, list_path, lambda _e, t=task: t, base=folder, lq_of=lq_of, gt_of=gt_of)
                continue
            res = _Resolver()
            missing = []
            for rel in _scan_inputs(folder):
                lq = str(folder / rel)
                want_gt = os.path.normpath(str(folder / gt_of(rel)))
                gt = res.gt(os.path.dirname(want_gt), [os.path.basename(want_gt), os.path.basename(rel)])
                if gt is None:
                    missing.append((lq, want_gt))
                else:
                    self.records.append((task, lq, gt))
            _report_missing(self, missing)
        self._finalize()
        _require_each(self, want)


class RealWeatherTestDataset(_FolderEval):
    """The real-world deweathering test sets under ``root``: a folder per task (``real_rain`` or SPA+/SPA,
    ``real_snow`` or RealSnow, ``real_fog`` or REVIDE), each holding somewhere below it a pair of sibling folders
    named as in :data:`REAL_TEST_LQ` / :data:`REAL_TEST_GT` with images of the same name (SPA's ``NAMEgt.png``
    too). Tasks without a folder are absent (a warning names them); none found is an error."""

    def __init__(self, root: PathLike, tasks, *, seed: int = 0, crop: Optional[int] = None, size_multiple: int = 16,
                 max_images: Optional[int] = None, skip_bad_images: bool = False):
        super().__init__(tasks, seed=seed, crop=crop, size_multiple=size_multiple, max_images=max_images,
                         skip_bad_images=skip_bad_images)
        self.root = _root(root)
        want = _weather_tasks(self.tasks, list(REAL_WEATHER_LAYOUT), "real-world deweathering test")
        found = []
        for task in want:
            folder = _subdir(self.root, *REAL_WEATHER_LAYOUT[task][0])
            if folder is None:
                log.warning("real-world test: no folder %s for task %s under %r",
                            "|".join(REAL_WEATHER_LAYOUT[task][0]), task, str(self.root))
                continue
            pairs, missing = find_pairs(folder, REAL_TEST_LQ, REAL_TEST_GT, gt_names=GT_NAMES[task])
            self._add_missing(missing, task)
            self.records += [(task, lq, gt) for lq, gt in self._limit(pairs)]
            found.append(task)
        if not found:
            raise ValueError(f"root: no real-world test folder for {want} under {str(self.root)!r}")
        self._finalize()
        _require_each(self, found)


__all__ = ["AllWeatherTrainDataset", "AllWeatherTestDataset", "RealWeatherTrainDataset", "RealWeatherTestDataset",
           "ALLWEATHER_TASK_PATTERNS", "ALLWEATHER_TEST_LISTS", "REAL_WEATHER_LAYOUT", "REAL_TEST_LQ",
           "REAL_TEST_GT", "GT_NAMES", "read_list_file", "find_file", "records_from_list",
           "outdoor_rain_gt_names", "raindrop_gt_names", "spa_gt_names"]
