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
