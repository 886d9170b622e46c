"""Shared by test_export.py, test_inference.py and test_runner.py: one small model, and its exports built once per
test session (compiling an AOTInductor package takes about a minute on 2 CPU cores, so it happens once).

The artifacts live under the session's pytest base temp folder; every test module asks :func:`session_artifacts`
for them and the first one to ask builds them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, NamedTuple

import numpy as np
import pytest
import torch

from tur_ext.export import ExportResult, export_aoti, export_torchscript
from tur_ext.models import build

REPO_ROOT = Path(__file__).resolve().parents[1]
TASKS = "3task"
#: A 2-level NAFNet of width 8 (size multiple 4): the smallest network that still has every kind of layer.
TINY_CONFIG = dict(width=8, enc_blocks=[1, 1], middle_blocks=1, dec_blocks=[1, 1])


def tiny_model(seed: int = 0, uncertainty: bool = True) -> torch.nn.Module:
    """The test network with random (not published-init) weights: NAFNet zero-initialises its residual scales, which
    would make every block an identity and hide errors in them. The output convolution is scaled down so that the
    result stays an image near the input (a mean change of about 9 levels in 255 on :func:`photo_crop`)."""
    torch.manual_seed(seed)
    model = build("nafnet-tiny", uncertainty=uncertainty, **TINY_CONFIG)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("beta", "gamma")):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        model.ending.weight.mul_(0.1)
        model.ending.bias.mul_(0.1)
    return model.eval()


class Artifacts(NamedTuple):
    model: torch.nn.Module          # the model with its uncertainty head
    folder: Path
    torchscript: ExportResult
    aoti: ExportResult


_CACHE: Dict[Path, Artifacts] = {}


def session_artifacts(tmp_path_factory) -> Artifacts:
    """The tiny model exported to TorchScript and AOTInductor, once per session."""
    base = tmp_path_factory.getbasetemp()
    if base not in _CACHE:
        folder = base / "export_artifacts"
        folder.mkdir(exist_ok=True)
        model = tiny_model()
        ts = export_torchscript(model, folder / "tiny.pt", tasks=TASKS)
        aoti = export_aoti(model, folder / "tiny.pt2", tasks=TASKS)
        _CACHE[base] = Artifacts(model, folder, ts, aoti)
    return _CACHE[base]


def photo_crop(height: int = 70, width: int = 95) -> np.ndarray:
    """An (H, W, 3) uint8 RGB crop of scikit-image's astronaut (a real photo: edges, texture, flat areas)."""
    from skimage import data

    img = data.astronaut()
    return np.ascontiguousarray(img[100:100 + height, 140:140 + width])


def runner_binary() -> Path:
    """The tur-restore executable: $TUR_RESTORE, else build/tur-restore (`make runner` puts it there)."""
    env = os.environ.get("TUR_RESTORE")
    return Path(env) if env else REPO_ROOT / "build" / "tur-restore"


#: Starts the reason of every skip for a missing runner (tests/conftest.py counts them in the summary).
RUNNER_MISSING = "the C++ runner is not built"


def require_runner() -> Path:
    """The runner binary, for tests that need it: skips the test when it is absent, or fails it when
    ``TUR_REQUIRE_RUNNER=1`` (CI builds the runner first, so a missing one there is a broken build, not an
    optional part)."""
    path = runner_binary()
    if path.is_file():
        return path
    message = f"{RUNNER_MISSING} ({path} missing): run `make runner` or set TUR_RESTORE"
    if os.environ.get("TUR_REQUIRE_RUNNER") == "1":
        pytest.fail(f"TUR_REQUIRE_RUNNER=1 but {message}", pytrace=False)
    pytest.skip(message)


def repackage_with_torch_version(src: Path, dst: Path, version: str) -> None:
    """Copy the AOTInductor package ``src`` to ``dst`` with its metadata claiming another torch release: what a
    package compiled by that release looks like to the loader's version check (which reads only the metadata)."""
    import json
    import zipfile

    from tur_ext.integrity import MANIFEST_NAME, add_manifest

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if info.filename.endswith("/" + MANIFEST_NAME):
                continue  # rewritten below, as that release's export would have written it
            data = zin.read(info)
            if info.filename.endswith("_metadata.json"):
                entries = json.loads(data)
                if "tur_meta" in entries:
                    meta = json.loads(entries["tur_meta"])
                    meta["torch_version"] = version
                    entries["tur_meta"] = json.dumps(meta)
                    data = json.dumps(entries).encode()
            zout.writestr(info.filename, data)
    add_manifest(dst)


def write_photos(folder: Path, sizes: Dict[str, tuple]) -> Dict[str, Path]:
    """``{name: (h, w)}`` -> PNG crops of one photo (:func:`photo_crop`) written under ``folder``; their paths."""
    import cv2

    out = {}
    for name, (h, w) in sizes.items():
        assert cv2.imwrite(str(folder / name), np.ascontiguousarray(photo_crop(h, w)[:, :, ::-1]))
        out[name] = folder / name
    return out


def run_runner(model: Path, image: Path, out: Path, *extra: str) -> np.ndarray:
    """``build/tur-restore`` on one image (must succeed); its output read back as int64 BGR samples."""
    import subprocess

    import cv2

    proc = subprocess.run([str(runner_binary()), "--model", str(model), "--input", str(image), "--output", str(out),
                           *extra], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return cv2.imread(str(out)).astype(np.int64)
