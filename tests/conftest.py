"""Shared test configuration: the devices to run device-parametrised tests on, and the shared/ fixture path."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"


def available_devices() -> list:
    """CPU always; CUDA (marked ``cuda``) when a device is present."""
    devices = [pytest.param("cpu", id="cpu")]
    if torch.cuda.is_available():
        devices.append(pytest.param("cuda", id="cuda", marks=pytest.mark.cuda))
    return devices


@pytest.fixture(params=available_devices())
def device(request) -> str:
    return request.param


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Says how many tests of each optional part were skipped and why (a plain `-q` run shows only a total):
    the C++ runner (tests/export_helpers.py) and the official fixtures (tests/fixtures.py)."""
    from export_helpers import RUNNER_MISSING
    from fixtures import FIXTURES_ABSENT

    parts = {"runner": RUNNER_MISSING, "fixture": FIXTURES_ABSENT}
    found: dict = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = str(longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else longrepr)
        reason = reason.removeprefix("Skipped: ")
        for part, marker in parts.items():
            if marker in reason:
                found.setdefault(part, {}).setdefault(reason, 0)
                found[part][reason] += 1
    for part, reasons in found.items():
        for reason, count in reasons.items():
            terminalreporter.write_line(f"{count} {part} test(s) skipped: {reason}", yellow=True)
