"""The README and the pages of docs/ tell the truth.

docs/tour.md and docs/exercises.md run as they read: every python block, in order, as one
session, whose asserts are the observations the text promises (shapes, the first loss near
ln(vocab), the hand-made attention head equal to the module's, the collapse without the
causal mask, ...). Every command the README and the pages show parses with the command line's
own parser, every flag they name exists, every link resolves, and the README stays a
five-minute read."""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

import pytest

from smolgpt.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
GUIDES = ("tour.md", "exercises.md")
README = REPO / "README.md"
# Every page a reader meets: the README and the documentation site's pages (the generated
# reference included).
PAGES = (README, *sorted(DOCS.rglob("*.md")))


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
        for command in (parser, *commands)  # smolgpt --version, and every command's
        for action in command._actions
        for option in action.option_strings
    }


def test_every_flag_the_docs_name_exists():
    options = _options()
    # The performance and development pages name the benchmark scripts' own flags too
    # (`python benchmarks/NAME.py --help` lists them): their smolgpt commands are checked by
    # test_every_command_shown_parses.
    for page in (p for p in PAGES if p.name not in ("performance.md", "development.md")):
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]", page.read_text()))
        # Flags of other programs the pages show: torchrun's, pip's, pytest's, the
        # benchmarks' (their own --help lists them).
        named -= {n for n in named if n in OTHER_PROGRAMS_FLAGS}
        assert named <= options, (
            f"{page.relative_to(REPO)} names flags smolgpt lacks: {named - options}"
        )
        if page.name == "exercises.md":  # the ablations' flags, and that the check sees them
            assert {"--no-causal", "--no-tie_embeddings"} <= named


def test_every_link_resolves_and_the_readme_points_into_the_tour():
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), (
                    f"{page.relative_to(REPO)} links to {target}"
                )
    learners = (
        README.read_text(encoding="utf-8").split("**Learn how it works:**")[1].split("\n- ")[0]
    )
    assert "docs/tour.md" in learners and "docs/exercises.md" in learners


def test_the_readme_is_a_five_minute_read():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < 250, f"README.md has {lines} lines: move the detail into docs/"


def shown_commands(page: Path) -> list[str]:
    """The smolgpt command lines in a page's bash blocks (continuation lines joined, comments
    dropped): `smolgpt ...`, `python -m smolgpt ...`, `python train.py ...`, `python
    generate.py ...`, and those that torchrun launches."""
    text = page.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"^```(?:bash|sh|console)\n(.*?)^```", text, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("$ "):
                line = line[2:]
            words = shlex.split(line, comments=True) if line else []
            if "torchrun" in words[:1]:
                words = _after_torchrun(words)
            for start, command in enumerate(words):
                rest = words[start + 1 :]
                if command == "smolgpt" or command.endswith("/smolgpt"):
                    commands.append(rest)
                elif command in ("train.py", "generate.py"):
                    commands.append([command[: -len(".py")], *rest])
                elif command == "-m" and rest[:1] == ["smolgpt"]:
                    commands.append(rest[1:])
                else:
                    continue
                break
    return [" ".join(shlex.quote(w) for w in c) for c in commands]


def _after_torchrun(words: list[str]) -> list[str]:
    """What torchrun runs: from its script (train.py) or -m on."""
    for i, word in enumerate(words):
        if word.endswith("train.py") or word == "-m":
            return words[i:]
    return []


def test_every_command_shown_parses():
    """The README's and the pages' command lines are ones smolgpt accepts (each parsed by
    the command line's parser; the tour and exercises run theirs for real)."""
    parser = build_parser()
    seen = 0
    for page in PAGES:
        for command in shown_commands(page):
            words = shlex.split(command)
            try:
                parser.parse_args(words)
            except SystemExit as exc:
                raise AssertionError(
                    f"{page.relative_to(REPO)}: smolgpt {command} does not parse"
                ) from exc
            seen += 1
    assert seen >= 25, seen  # the check sees the pages' commands


# Flags of other programs that the guides show: torchrun's, pip's, TensorBoard's, llama.cpp's,
# lm_eval's,
# the reference curves' and the corpus preparation benchmark scripts'.
OTHER_PROGRAMS_FLAGS = {
    "--mb",
    "--standalone",
    "--model",
    "--model_args",
    "--tasks",
    "--include_path",
    "--temp",
    "--top-k",
    "--ignore-eos",
    "--logdir",
    "--out-runs",
    "--nproc_per_node",
    "--nnodes",
    "--node_rank",
    "--rdzv_backend",
    "--rdzv_endpoint",
    "--rdzv_id",
    "--index-url",
    "--dist",
    "--plot",
    "--out",
    "--preset",
}
