"""The official-release fixtures (``../shared/fixtures/<name>_official.json``) for every test module that compares
a model with an authors' release.

The fixtures live beside the checkout, never inside it. Where ``../shared`` itself is absent (a bare clone
outside CI) the tests that need them skip, saying so; where ``../shared`` exists (CI, the development machines) a
missing or unreadable fixture is an error, so that a broken fixture tree cannot pass silently.
``TUR_REQUIRE_FIXTURES=1`` makes a missing ``../shared`` an error as well.

Use::

    from fixtures import load_official_fixture

    @pytest.fixture(scope="module")
    def official() -> dict:
        return load_official_fixture("promptir")      # ../shared/fixtures/promptir_official.json
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures"
#: In the reason of every skip for absent fixtures (tests/conftest.py counts them in the summary).
FIXTURES_ABSENT = "the fixtures live beside the checkout"


def fixture_path(name: str) -> Path:
    """The path of fixture ``name``: ``"promptir"`` -> ``../shared/fixtures/promptir_official.json`` (a name that
    already ends in ``.json`` is taken as the file name)."""
    return FIXTURES / (name if name.endswith(".json") else f"{name}_official.json")


def fixtures_required() -> bool:
    """True where a missing fixture must fail: ``../shared`` exists, or ``TUR_REQUIRE_FIXTURES=1``."""
    return SHARED.is_dir() or os.environ.get("TUR_REQUIRE_FIXTURES") == "1"


@lru_cache(maxsize=None)
def _read(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_official_fixture(name: str) -> dict:
    """The parsed fixture ``name`` (cached per session: callers must not modify it). Skips the calling test when
    ``../shared`` is absent; fails it when ``../shared`` exists but the fixture is missing or not valid JSON."""
    path = fixture_path(name)
    if not path.is_file():
        if not fixtures_required():
            pytest.skip(f"{path.name}: {SHARED} is absent ({FIXTURES_ABSENT}; CI has them)")
        pytest.fail(f"{path}: fixture missing although {SHARED} exists (set up ../shared/fixtures as in CI)",
                    pytrace=False)
    try:
        return _read(path)
    except (OSError, json.JSONDecodeError) as exc:
        pytest.fail(f"{path}: not a readable JSON fixture ({exc})", pytrace=False)
