"""docs/tour.md and docs/exercises.md run as they read: every python block, in order, as one
session, whose asserts are the observations the text promises (shapes, the first loss near
ln(vocab), the hand-made attention head equal to the module's, the collapse without the
causal mask, ...). Every flag the docs name exists, and every link resolves."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from smolgpt.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
GUIDES = ("tour.md", "exercises.md")


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), re.M | re.S)


@pytest.mark.slow
@pytest.mark.parametrize("name", GUIDES)
def test_every_block_runs_and_its_observations_hold(name, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")  # the tour ends with smolgpt inspect
    pytest.importorskip("tokenizers")  # and trains a bpe tokenizer
    monkeypatch.chdir(tmp_path)  # the blocks write shakespeare.txt and runs/ where they run
    blocks = python_blocks(DOCS / name)
    assert len(blocks) >= 6
    session: dict = {"__name__": "__main__"}
    start = time.perf_counter()
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"docs/{name}, python block {number}", "exec"), session)
    seconds = time.perf_counter() - start
    printed = capsys.readouterr().out
    assert printed.strip()  # the blocks show what they compute
    # About 15 s (tour) and 25 s (exercises) on a 2-core CPU; the bound only catches a
    # snippet grown far past what a learner should wait for.
    assert seconds < 120, f"docs/{name} took {seconds:.0f} s: keep it quick for learners and CI"


def _options() -> set[str]:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices.values()
    return {
        option
        for command in commands
        for action in command._actions
        for option in action.option_strings
    }


def test_every_flag_the_docs_name_exists():
    options = _options()
    for name in GUIDES:
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z_-]*[a-z]", (DOCS / name).read_text()))
        assert named <= options, f"docs/{name} names flags smolgpt lacks: {named - options}"
        if name == "exercises.md":  # the ablations' flags, and that the check sees them
            assert {"--no-causal", "--no-tie_embeddings"} <= named


def test_every_link_resolves_and_the_readme_points_into_the_tour():
    for name in GUIDES:
        for target in re.findall(r"\]\(([^)#]+)\)", (DOCS / name).read_text()):
            if not target.startswith("http"):
                assert (DOCS / target).exists(), f"docs/{name} links to {target}"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    learners = readme[readme.index("**For learners:**") : readme.index("**For practitioners:**")]
    assert "docs/tour.md" in learners and "docs/exercises.md" in learners
