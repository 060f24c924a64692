"""The README's flag tables, written from the settings dataclasses (through the parser that
is generated from them), so that they cannot drift from ``--help``.

``python -m smolgpt.docs`` rewrites the tables in README.md (or the file named);
``python -m smolgpt.docs --check`` only says whether they are up to date, and exits 1 if
not (``tests/test_readme.py`` checks the same).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .flags import build_parser

# The README section that holds each command's table (its first flag table).
TABLES = {"Training": "train", "Generation": "generate", "Serving": "serve"}
HEADER = "| flag | default | what it does |"
README = Path(__file__).resolve().parents[2] / "README.md"  # in a checkout


def flag_rows(command: str) -> list[str]:
    """The table rows of a subcommand's flags, in --help order: `--flag` (and `--no-flag`),
    the default, and what it does."""
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = commands.choices[command]
    rows = []
    for group in parser._action_groups:
        for action in group._group_actions:
            if not action.option_strings or not action.help or action.option_strings[0] == "-h":
                continue
            flags = " / ".join(f"`{name}`" for name in action.option_strings)
            what, _, default = action.help.rpartition(" (default: ")
            if not what:  # a help without a default
                what, default = action.help, ")"
            rows.append(f"| {flags} | {default[:-1]} | {what} |")
    return rows


def write_tables(text: str) -> str:
    """text (a README) with each command's flag table rewritten; the rest left as it is."""
    for title, command in TABLES.items():
        section = text.index(f"\n## {title}\n")
        header = text.index(HEADER, section)
        start = text.index("\n", text.index("\n", header) + 1) + 1  # after |---|---|---|
        end = start
        while text.startswith("| `--", end):
            end = text.index("\n", end) + 1
        text = text[:start] + "".join(row + "\n" for row in flag_rows(command)) + text[end:]
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smolgpt.docs", description=__doc__)
    parser.add_argument("readme", nargs="?", default=str(README), help="default: README.md")
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if the tables are stale"
    )
    args = parser.parse_args(argv)
    path = Path(args.readme)
    text = path.read_text(encoding="utf-8")
    written = write_tables(text)
    if written == text:
        print(f"{path}: the flag tables are up to date", file=sys.stderr)
        return 0
    if args.check:
        print(f"{path}: the flag tables differ from --help: run python -m smolgpt.docs")
        return 1
    path.write_text(written, encoding="utf-8")
    print(f"{path}: rewrote the flag tables", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
