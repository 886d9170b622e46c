"""The README's Python blocks run as pasted, and print what the README says they print.

Every ```python block is run on its own (a fresh interpreter namespace, the repository root as the working
directory). A block followed by a line ``Prints:`` and a plain ``` block must print exactly that text.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```\n(?:\nPrints:\n\n?```\n(.*?)^```\n)?", re.S | re.M)


def readme_blocks():
    """``[(line, code, expected output or None)]`` of every Python block of the README."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)) for m in _BLOCK.finditer(text)]


def test_the_readme_has_python_blocks():
    assert len(readme_blocks()) >= 4


@pytest.mark.parametrize("line,code,expected", readme_blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_readme_block_runs_as_pasted(line, code, expected, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"README.md line {line}: the block fails:\n{r.stderr[-3000:]}"
    if expected is not None:
        got = "\n".join(l.rstrip() for l in r.stdout.strip().splitlines())
        want = "\n".join(l.rstrip() for l in expected.strip().splitlines())
        assert got == want, f"README.md line {line}: the block prints\n{got}\ninstead of\n{want}"


def test_every_data_key_and_type_is_documented_and_the_readme_is_current():
    from tur_ext.data.build import _ALLOWED, BUILDERS
    from tur_ext.data.keys import DATA_KEYS, DATA_TYPES, markdown
    from tur_ext.train.config import SCHEMA

    accepted = set(_ALLOWED) | set(SCHEMA.fields["data"].fields)
    assert sorted(accepted - set(DATA_KEYS)) == [], "undocumented data keys: add them to tur_ext/data/keys.py"
    assert sorted(set(DATA_KEYS) - accepted) == [], "documented keys nobody accepts"
    assert sorted(set(BUILDERS) ^ set(DATA_TYPES)) == []
    assert markdown() in README.read_text(encoding="utf-8"), \
        "README's Data section is stale: paste the output of `python -m tur_ext.data.keys`"
