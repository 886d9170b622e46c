"""The one registry of degradation task names (DESIGN.md §4) and the ordered task sets a run trains on.

A *task set* is an ordered tuple of names; a task's id is its index in the set. The loss takes ids, data loaders
yield names, and :class:`TaskSet` converts between the two.
"""
from __future__ import annotations

import difflib
from typing import Iterable, Sequence, Union

import torch

#: Every task name the package knows, with a one-line description.
KNOWN_TASKS: dict[str, str] = {
    # 3-task all-in-one setting (PromptIR / AirNet): the noise levels are separate tasks.
    "denoise_15": "Gaussian noise, sigma 15",
    "denoise_25": "Gaussian noise, sigma 25",
    "denoise_50": "Gaussian noise, sigma 50",
    "derain": "rain streaks",
    "dehaze": "haze (atmospheric scattering)",
    # 5-task setting adds these two.
    "deblur": "motion blur",
    "lowlight": "low light",
    # 7-task mixed-degradation setting (MiOIR ranges).
    "blur": "isotropic Gaussian blur",
    "noise": "Gaussian noise, sigma 15-50",
    "jpeg": "JPEG compression, quality 30-70",
    "rain": "rain streaks",
    "haze": "haze",
    "dark": "darkening by gamma 1-3",
    "sr": "x4 bicubic down- and up-sampling",
    # Deweathering (TransWeather's AllWeather set): captured/rendered pairs only, nothing synthesised here.
    "snow": "snow (Snow100K)",
    "rain_fog": "rain streaks with fog / rain accumulation (Outdoor-Rain)",
    "raindrop": "raindrops on the lens (RainDrop)",
    # Real-world deweathering (WGWS-Net's real-world setting, the TUR release's names): real pairs only.
    "real_rain": "real rain (SPA+)",
    "real_snow": "real snow (RealSnow)",
    "real_fog": "real haze / fog (REVIDE)",
}

#: Tasks that :mod:`tur_ext.data.degradations` can synthesise from a clean image (the others exist only as
#: published degraded/clean pairs).
SYNTHETIC_TASKS: tuple[str, ...] = ("denoise_15", "denoise_25", "denoise_50", "derain", "dehaze", "deblur",
                                    "lowlight", "blur", "noise", "jpeg", "rain", "haze", "dark", "sr")

#: The published task sets, by the name configs use.
TASK_SETS: dict[str, tuple[str, ...]] = {
    "3task": ("denoise_15", "denoise_25", "denoise_50", "derain", "dehaze"),
    "5task": ("denoise_15", "denoise_25", "denoise_50", "derain", "dehaze", "deblur", "lowlight"),
    "7task": ("blur", "noise", "jpeg", "rain", "haze", "dark", "sr"),
    # TransWeather's AllWeather training set, in the order of its three test sets (Snow100K-L, Test1, RainDrop).
    "allweather": ("snow", "rain_fog", "raindrop"),
    # The real-world deweathering setting (SPA+, RealSnow, REVIDE), in the TUR release's task order.
    "real_weather": ("real_rain", "real_snow", "real_fog"),
}


class TaskSet:
    """An ordered set of task names; ``ids`` and ``names`` convert between names and integer ids."""

    def __init__(self, tasks: Union[str, int, Sequence[str], "TaskSet"]):
        if isinstance(tasks, TaskSet):
            names: tuple[str, ...] = tasks.names_tuple
        elif isinstance(tasks, str) and "," in tasks:  # "denoise_25,derain": the command lines' form
            names = TaskSet([t.strip() for t in tasks.split(",") if t.strip()]).names_tuple
        elif isinstance(tasks, str):
            if tasks not in TASK_SETS:
                close = difflib.get_close_matches(tasks, list(TASK_SETS), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"tasks: unknown task set {tasks!r}{hint} (expected one of {sorted(TASK_SETS)}, "
                                 "a list of task names, or names separated by commas)")
            names = TASK_SETS[tasks]
        elif isinstance(tasks, bool):
            raise TypeError("tasks: expected a task-set name, a list of task names or an int, got bool")
        elif isinstance(tasks, int):
            if tasks < 1:
                raise ValueError(f"tasks: expected at least 1 task, got {tasks}")
            names = tuple(f"task{i}" for i in range(tasks))
        else:
            names = tuple(tasks)
            if not names:
                raise ValueError("tasks: expected at least one task name, got an empty list")
            for n in names:
                if not isinstance(n, str):
                    raise TypeError(f"tasks: expected task names as str, got {type(n).__name__}")
            if len(set(names)) != len(names):
                raise ValueError(f"tasks: duplicate task names in {list(names)}")
        self.names_tuple = names
        self._index = {n: i for i, n in enumerate(names)}

    def __len__(self) -> int:
        return len(self.names_tuple)

    def __iter__(self):
        return iter(self.names_tuple)

    def __getitem__(self, i: int) -> str:
        return self.names_tuple[i]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __repr__(self) -> str:
        return f"TaskSet({list(self.names_tuple)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskSet) and other.names_tuple == self.names_tuple

    def id(self, name: str) -> int:
        """The id of one task name."""
        try:
            return self._index[name]
        except KeyError:
            raise ValueError(f"task_ids: unknown task name {name!r}; this task set is {list(self.names_tuple)}") from None

    def ids(self, names: Iterable[str], device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """A LongTensor of the ids of ``names`` (as a data loader yields them)."""
        return torch.tensor([self.id(n) for n in names], dtype=torch.long, device=device)

    def names(self, ids: Union[torch.Tensor, Iterable[int]]) -> list[str]:
        """The names of integer ids."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            if not 0 <= int(i) < len(self):
                raise ValueError(f"task_ids: id {i} out of range [0, {len(self)})")
            out.append(self.names_tuple[int(i)])
        return out


def describe(name: str) -> str:
    """The one-line description of a known task name."""
    if name not in KNOWN_TASKS:
        raise ValueError(f"task: unknown task name {name!r}; known: {sorted(KNOWN_TASKS)}")
    return KNOWN_TASKS[name]
