"""Run logs: CSV files (one row per logging step) and an optional TensorBoard writer.

CSV rows are appended and flushed as they come (a log is read while the run goes on). On resume, rows after the
checkpoint's step are dropped first (rewritten through a temp file + rename), so a resumed run's log reads as if it
had never stopped.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence


class CSVLog:
    """A CSV file with a fixed header; ``step`` must be the first column."""

    def __init__(self, path: os.PathLike | str, columns: Sequence[str]):
        if not columns or columns[0] != "step":
            raise ValueError("columns: the first column must be 'step'")
        self.path = Path(path)
        self.columns = list(columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), None)
            if header != self.columns:
                # A different layout (another config in the same folder): start over rather than mix columns.
                self.path.unlink()
        if not self.path.exists():
            self._rewrite([])

    def _rewrite(self, rows: list[list[str]]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp.{os.getpid()}")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(self.columns)
            w.writerows(rows)
        os.replace(tmp, self.path)

    def truncate_after(self, step: int) -> None:
        """Drop the rows logged after ``step`` (a resumed run logs them again)."""
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))[1:]
        keep = [r for r in rows if r and int(float(r[0])) <= step]
        if len(keep) != len(rows):
            self._rewrite(keep)

    def write(self, row: dict) -> None:
        unknown = set(row) - set(self.columns)
        if unknown:
            raise ValueError(f"row: unknown columns {sorted(unknown)}")
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(c)) for c in self.columns])


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return str(v)


def read_csv(path: os.PathLike | str) -> dict[str, list[float]]:
    """Columns of a log as float lists (blank cells -> nan)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return {}
    header, body = rows[0], rows[1:]
    out: dict[str, list] = {c: [] for c in header}
    for r in body:
        for c, v in zip(header, r):
            try:
                out[c].append(float(v) if v != "" else math.nan)
            except ValueError:
                out[c].append(v)
    return out


class TensorBoardLog:
    """A thin wrapper: a no-op when disabled, so the trainer never tests for it."""

    def __init__(self, folder: os.PathLike | str, enabled: bool, purge_step: Optional[int] = None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported only when used: it is slow to import

            self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)

    def scalars(self, values: dict, step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None and isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(k, v, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def train_columns(tasks: Iterable[str], contrastive: bool = False) -> list[str]:
    """The log.csv columns; ``contrastive``: the MoCo loss of an AirNet encoder as well."""
    cols = ["step", "epoch", "lr", "images_per_s", "loss", "l1"] + (["contrastive"] if contrastive else [])
    for t in tasks:
        cols += [f"loss/{t}", f"l1/{t}", f"uncertainty/{t}", f"weight/{t}"]
    return cols


VAL_COLUMNS = ["step", "task", "psnr", "ssim", "count"]
