"""A newcomer's first hour (issue #18), the parts about run directories, checkpoints and
prompts: starting over keeps the old run, a run directory or a wrong file given as a
checkpoint gets the right advice, and the default prompt is one the model can read."""

from __future__ import annotations

import logging
import os

import pytest

import smolgpt

from e2e import e2e_assert_one_line_error, e2e_snapshot

pytestmark = pytest.mark.slow

TINY = (
    "--preset nano --n_layer 1 --n_embd 16 --n_head 2 --block_size 16 --batch_size 4 "
    "--eval_iters 2 --eval_interval 5 --max_iters 5"
).split()


# Refusals run the command line's code in this process (cli_main): a process of their own
# would only import torch again. Each test keeps one real process for what it checks.


def test_overwrite_moves_the_old_run_aside_and_never_deletes_it(
    smol_cli, smol_runs, cli_main, tmp_path
):
    run = smol_runs["char"].copy(tmp_path / "run")
    before = e2e_snapshot(run)
    train = ["train", "--level", "char", "--out_dir", run, *TINY]
    # Without --overwrite, the run is refused; with it and a bad text, nothing moves.
    refused = cli_main([*train, "--data", smol_cli.corpus])
    e2e_assert_one_line_error(refused, "--overwrite", "--resume")
    missing = cli_main([*train, "--data", tmp_path / "nope.txt", "--overwrite"])
    e2e_assert_one_line_error(missing, "nope.txt")
    assert e2e_snapshot(run) == before

    fresh = smol_cli.run("module", *train, "--data", smol_cli.corpus, "--overwrite")
    assert fresh.returncode == 0, fresh.describe()
    (moved,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.")]
    assert str(moved) in fresh.stderr  # where the old run went
    assert {k: v for k, v in e2e_snapshot(moved).items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"
    }  # the old run, byte for byte
    assert [row["iter"] for row in smol_cli.metrics(run)] == [0, 5]  # the new run alone
    both = cli_main([*train, "--data", smol_cli.corpus, "--overwrite", "--resume"])
    e2e_assert_one_line_error(both, "--resume", "--overwrite")


def test_a_run_directory_or_a_wrong_file_as_checkpoint(smol_cli, smol_runs, cli_main, tmp_path):
    run = smol_runs["char"].out_dir
    sample = ["--prompt", "The ", "--max_new_tokens", "10"]
    by_dir = smol_cli.run("generate", run, *sample)
    assert by_dir.returncode == 0, by_dir.describe()
    assert str(run / "best_model.pth") in by_dir.stderr  # which checkpoint of the run
    by_file = cli_main(["generate", run / "best_model.pth", *sample])
    assert by_dir.stdout == by_file.stdout

    (tmp_path / "empty_run").mkdir()
    notes = tmp_path / "notes.pth"
    notes.write_text("not a model, just notes\n")
    noise = tmp_path / "noise.pth"
    noise.write_bytes(os.urandom(4096).replace(b"\x80", b"\x81"))
    for path, needle in [
        (tmp_path / "empty_run", "best_model.pth"),  # what a run directory holds
        (notes, "smolgpt checkpoint"),
        (noise, "smolgpt checkpoint"),
    ]:
        line = e2e_assert_one_line_error(cli_main(["generate", path]), str(path), needle)
        assert "run code" not in line  # kept for real pickles that carry code


@pytest.mark.parametrize("level", ["char", "word"])
def test_the_default_prompt_is_one_the_model_can_read(smol_runs, level, caplog):
    model = smolgpt.load(smol_runs[level].out_dir / "best_model.pth")
    prompt = model.default_prompt()
    assert model.tokenizer.unknown(prompt) == []
    if level == "char":
        assert prompt == "\n"
    else:
        (prompt_id,) = model.tokenizer.encode(prompt)
        words = [i for i, w in enumerate(model.tokenizer.itos) if w.isalpha()]
        assert prompt.isalpha() and prompt_id == min(words)  # the most frequent word
    text = model.generate(max_new_tokens=8)
    assert text.startswith(prompt) and "<UNK>" not in text.split()[0]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no unknown words


def test_one_iteration_is_said_in_the_singular(smol_cli, cli_main, tmp_path):
    done = cli_main(
        ["train", "--level", "char", "--data", smol_cli.corpus, "--out_dir", tmp_path / "run"]
        + [*TINY, "--max_iters", "1", "--no-plot"]  # the last --max_iters wins
    )
    assert done.returncode == 0, done.describe()
    assert "done: 1 iteration in " in done.stderr, done.describe()
