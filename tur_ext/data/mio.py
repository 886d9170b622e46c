"""MiOIR's 7-task data as it publishes it (Kong et al. 2024, github.com/Xiangtaokong/MiOIR): the degraded copies
of DF2K precomputed per task, paired with the clean image of the same file name.

Training (``data_script/add_MiO_train_degradation.py``, then ``gen_sub.py`` crops to 300x300 sub-images)::

    DF2K/GT_sub300/NAME.png            clean (or GT/ before cropping)
    DF2K/<task>_sub300/NAME.png        task in blur, noise, jpeg, rain, haze, dark, sr (or <task>/)

``MiODateset`` reads the lq paths from a meta file and finds the gt by replacing ``<task>_`` with ``GT_`` in the
path, which is this same-name pairing. Test (``MiO_test.zip``)::

    CL_test/original/GT/NAME.png
    CL_test/single_indis/<task>/NAME.png
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from .datasets import PathLike, _FolderEval, _FolderTrain, _pair_files, _require_each, _subdir, list_images

#: MiOIR's task folder names are the 7-task names of :mod:`tur_ext.tasks`.
MIO_TASKS = ("blur", "noise", "jpeg", "rain", "haze", "dark", "sr")


def mio_folders(root: PathLike, tasks) -> tuple[Path, dict[str, Path]]:
    """(gt folder, {task: lq folder}) of a MiOIR tree: ``GT[_subN]`` beside ``<task>[_subN]`` (same suffix), or the
    test layout ``original/GT`` + ``single_indis/<task>``. Only the tasks of ``tasks`` are looked up; those
    without a folder are left out (the caller decides whether that is an error)."""
    r = Path(root)
    if not r.is_dir():
        raise ValueError(f"root: folder {str(r)!r} does not exist")
    want = [t for t in MIO_TASKS if t in tasks]
    if not want:
        raise ValueError(f"tasks: the MiOIR layout provides {list(MIO_TASKS)}, none of which is in {list(tasks)}")
    gt = _subdir(r, "original/GT")
    if gt is not None and _subdir(r, "single_indis") is not None:
        lq = {t: _subdir(r, f"single_indis/{t}") for t in want}
        return gt, {t: d for t, d in lq.items() if d is not None}
    pattern = re.compile(r"^gt(_sub\d+)?$", re.I)
    gts = sorted(c for c in r.iterdir() if c.is_dir() and pattern.match(c.name))
    if not gts:
        raise ValueError(f"root: no GT/ or GT_sub<N>/ folder (nor original/GT + single_indis/) under {str(r)!r} "
                         "(MiOIR layout)")
    if len(gts) > 1:
        raise ValueError(f"root: several ground-truth folders {[g.name for g in gts]} under {str(r)!r}; point root "
                         "at a tree with one (MiOIR layout)")
    suffix = pattern.match(gts[0].name).group(1) or ""
    lq = {t: _subdir(r, t + suffix) for t in want}
    return gts[0], {t: d for t, d in lq.items() if d is not None}


def _add_mio_records(ds, root: PathLike, limit=lambda records: records) -> list[str]:
    gt_dir, lq_dirs = mio_folders(root, ds.tasks)
    ds.root = Path(root)
    for task, folder in lq_dirs.items():
        files = [f for f in list_images(folder) if Path(f).parent == folder]
        pairs, missing = _pair_files(files, gt_dir, lambda n: [n])
        ds._add_missing(missing, task)
        ds.records += [(task, lq, gt) for lq, gt in limit(pairs)]
    ds._finalize()
    return list(lq_dirs)


class MiOTrainDataset(_FolderTrain):
    """MiOIR's precomputed 7-task training pairs under ``root`` (see the module docstring); every task of
    ``tasks`` among the 7 must have its folder."""

    def __init__(self, root: PathLike, tasks, *, patch_size: int = 128, seed: int = 0, augment: bool = True,
                 skip_bad_images: bool = False):
        super().__init__(tasks, patch_size=patch_size, seed=seed, augment=augment, skip_bad_images=skip_bad_images)
        _add_mio_records(self, root)
        _require_each(self, [t for t in MIO_TASKS if t in self.tasks])


class MiOTestDataset(_FolderEval):
    """MiOIR's in-distribution test sets under ``root`` (``original/GT`` + ``single_indis/<task>``, or the flat
    training layout); the tasks that have a folder."""

    def __init__(self, root: PathLike, tasks, *, seed: int = 0, crop: Optional[int] = None, size_multiple: int = 16,
                 max_images: Optional[int] = None, skip_bad_images: bool = False):
        super().__init__(tasks, seed=seed, crop=crop, size_multiple=size_multiple, max_images=max_images,
                         skip_bad_images=skip_bad_images)
        found = _add_mio_records(self, root, self._limit)
        if not found:
            raise ValueError(f"root: no MiOIR task folder for {list(self.tasks)} under {str(root)!r}")
        _require_each(self, found)


__all__ = ["MiOTrainDataset", "MiOTestDataset", "MIO_TASKS", "mio_folders"]
