"""The manual (mkdocs.yml, docs/) builds without a warning, and its command-line reference,
docs/reference/cli.md, is what ``--help`` says: written by ``python -m smolgpt.docs``, one
section per command, every flag with its default."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from smolgpt import docs
from smolgpt.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
CLI_PAGE = REPO / "docs" / "reference" / "cli.md"


def page_sections() -> dict[str, str]:
    """The reference's text under each `## command` heading."""
    parts = re.split(r"^## (\S+)\n", CLI_PAGE.read_text(encoding="utf-8"), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def table_rows(section: str, header: str) -> list[list[str]]:
    """The cells of every row of the tables with this header in a section, unescaped."""
    rows = []
    for table in section.split(header + "\n")[1:]:
        for line in table.splitlines()[1:]:
            if not line.startswith("| "):
                break
            rows.append([html.unescape(c.strip()) for c in line.strip("|").split(" | ")])
    return rows


def subcommands() -> dict:
    return docs.subcommands(build_parser()).choices


def test_every_command_has_its_section_in_the_parsers_order():
    assert list(page_sections()) == list(subcommands())


@pytest.mark.parametrize("command", list(subcommands()))
def test_documented_flags_and_arguments_are_the_help(command):
    parser = subcommands()[command]
    section = page_sections()[command]
    documented = [
        (flag.split("`")[1], f"{what} (default: {default})" if default else what)
        for flag, default, what in table_rows(section, docs.HEADER)
    ]
    helped = [
        (a.option_strings[0], a.help)
        for group in parser._action_groups
        for a in group._group_actions
        if a.option_strings and a.help and a.option_strings[0] != "-h"
    ]
    assert documented == helped
    positional = [
        (name.strip("`"), what) for name, what in table_rows(section, docs.POSITIONAL_HEADER)
    ]
    assert positional == [
        (docs.positional_name(a), a.help) for a in parser._positionals._group_actions
    ]
    for group in parser._action_groups[2:]:  # the titled ones, after positionals and options
        assert f"\n### {group.title}\n" in section


def test_the_page_is_what_the_script_writes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the page is the same wherever it is written from
    assert CLI_PAGE.read_text(encoding="utf-8") == docs.reference(), (
        "docs/reference/cli.md differs from the parser: run python -m smolgpt.docs"
    )
    text = docs.reference()
    stale = text.replace("| `--port` | 8000 |", "| `--port` | 8080 |")
    assert stale != text
    copy = tmp_path / "cli.md"
    copy.write_text(stale, encoding="utf-8")
    assert docs.main([str(copy), "--check"]) == 1
    assert copy.read_text(encoding="utf-8") == stale  # --check changes nothing
    assert docs.main([str(copy)]) == 0
    assert copy.read_text(encoding="utf-8") == text
    assert docs.main([str(copy), "--check"]) == 0


def test_the_site_builds_without_a_warning(tmp_path):
    pytest.importorskip("mkdocs", reason='the site needs the docs extra: pip install -e ".[docs]"')
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's notice of its end of life
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert (tmp_path / "reference" / "python" / "index.html").is_file()
    assert (tmp_path / "search" / "search_index.json").is_file()
    # The theme's own files too (an exclude_docs pattern can drop them without a warning).
    assert list((tmp_path / "assets" / "stylesheets").glob("main.*.css"))
