"""The development tools agree: the ruff that pre-commit runs, the one the test extra pins
and the one installed are the same version (ruff's formatting changes between versions, so
two of them would reformat each other's files)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ruff_pins(name: str) -> list[str]:
    return re.findall(r"ruff==([\w.]+)", (ROOT / name).read_text(encoding="utf-8"))


def test_one_ruff_version_everywhere():
    (pinned,) = ruff_pins("pyproject.toml")
    assert ruff_pins(".pre-commit-config.yaml") == [pinned, pinned]  # check and format
    # The environment's own ruff (beside its python), else one on PATH.
    beside = Path(sys.executable).parent / "ruff"
    ruff = str(beside) if beside.exists() else shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed: pip install -e '.[test]'")
    version = subprocess.run([ruff, "--version"], capture_output=True, text=True).stdout
    assert version.split() == ["ruff", pinned]
