"""`smolgpt eval` and what training reports of the validation text: the windows both score,
the validation text read back from a corpus, val bits per character in the log and
metrics.jsonl, and loss.png redrawn at every evaluation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import smolgpt
from smolgpt import sources, tokencache
from smolgpt.evaluate import window_starts

from e2e import (
    e2e_assert_install_advice,
    e2e_assert_one_line_error,
    e2e_corpus_text,
    names,
    smolgpt_without,
)

# Small enough that an evaluation of eval_iters x batch_size = 60 windows of 16 tokens covers
# the whole validation split at either level: the log's val loss is then smolgpt eval's.
TINY = dict(
    preset="nano",
    n_layer=1,
    n_embd=16,
    n_head=2,
    block_size=16,
    batch_size=4,
    eval_iters=15,
    eval_interval=5,
    max_iters=10,
    early_stop_patience=0,
    min_word_freq=1,
)


def smolgpt_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "smolgpt", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------- windows


@pytest.mark.parametrize("n,block", [(2, 8), (9, 8), (10, 8), (100, 7), (65, 16)])
def test_windows_predict_every_token_after_the_first_once(n, block):
    predicted = []
    for start in window_starts(n, block):
        predicted += range(start + 1, min(start + block + 1, n))
    assert predicted == list(range(1, n))


def test_a_capped_evaluation_takes_full_windows_spread_over_the_split():
    starts = window_starts(10_001, 100, max_windows=7)
    assert len(starts) == len(set(starts)) == 7
    assert all(s % 100 == 0 and s + 101 <= 10_001 for s in starts)  # full windows only
    assert starts[0] == 0 and starts[-1] >= 8_000  # from the start to near the end
    assert window_starts(10_001, 100, max_windows=7) == starts  # the same ones every time
    assert window_starts(1_000, 100, max_windows=50) == window_starts(1_000, 100)


# ------------------------------------------------------------- the validation text


@pytest.mark.parametrize("level", ["char", "word"])
def test_the_validation_text_encodes_to_the_validation_ids(tmp_path, monkeypatch, level):
    """Read back from a corpus of two files in many chunks (the split falls inside one),
    with CRLF line endings and curly quotes, the text gives the validation ids again; its
    length and <UNK> bytes are what the cache recorded."""
    monkeypatch.setattr(sources, "CHUNK_BYTES", 700)
    folder = tmp_path / "books"
    folder.mkdir()
    text = e2e_corpus_text(12_000).replace("'", "\u2019").replace("\n", "\r\n")
    (folder / "a.txt").write_text(text[:5_000], encoding="utf-8", newline="")
    (folder / "b.txt").write_text(text[5_000:], encoding="utf-8", newline="")
    tokens = tokencache.prepare(sources.resolve_corpus(str(folder)), level, min_word_freq=4)
    val_text = tokens.val_text()
    assert tokens.tokenizer.encode(val_text) == tokens.val.tolist()
    assert tokens.val_chars == len(val_text)
    assert "\r" not in val_text and "\u2019" not in val_text
    if level == "word":
        assert tokens.val_unk_bytes == sum(tokens.tokenizer.unk_bytes(val_text)[1:]) > 0
    else:
        assert tokens.val_unk_bytes == 0


# ------------------------------------------------------- the log agrees with eval


@pytest.mark.slow
@pytest.mark.parametrize("level", ["char", "word"])
def test_eval_agrees_with_the_training_log_on_the_same_windows(
    tmp_path, level, cpu_precision, cli_main
):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(e2e_corpus_text(7_000), encoding="utf-8")
    run = tmp_path / "run"
    smolgpt.train(data=str(corpus), level=level, out_dir=str(run), plot=False, **TINY)
    last = rows(run)[-1]
    assert last["iter"] == 10 and "val_bits_per_char" in last

    # The command line in this process: a second process would only import torch again.
    done = cli_main(["eval", run / "latest_model.pth", "--json"])
    assert done.returncode == 0, done.stderr
    scores = json.loads(done.stdout)
    assert set(scores) == {"loss", "perplexity", "bits_per_char", "tokens", "chars", "unk_tokens"}
    # The same windows: equal up to how the policy rounds (eval groups them otherwise).
    tolerance = cpu_precision.loss_tolerance
    assert scores["loss"] == pytest.approx(last["val_loss"], abs=tolerance)
    assert scores["bits_per_char"] == pytest.approx(last["val_bits_per_char"], abs=tolerance * 1.5)
    assert scores["perplexity"] == pytest.approx(math.exp(scores["loss"]))
    tokens = tokencache.prepare(sources.resolve_corpus(str(corpus)), level, 1)
    assert scores["tokens"] == len(tokens.val) and scores["chars"] == tokens.val_chars
    # Characters are one denominator for both levels: each level's count is of the same text.
    ratio = scores["chars"] / scores["tokens"]
    assert ratio == 1.0 if level == "char" else ratio > 3

    # The same numbers from Python, and the table for people.
    model = smolgpt.load(run / "latest_model.pth")
    assert model.evaluate().to_dict() == pytest.approx(scores, abs=1e-9)
    table = cli_main(["eval", run])
    assert table.returncode == 0, table.stderr
    assert f"bits per char  {scores['bits_per_char']:.4f}" in table.stdout
    assert "the validation split of" in table.stdout


@pytest.mark.slow
def test_eval_scores_any_text_and_refuses_what_it_cannot_read(tmp_path, cli_main):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(e2e_corpus_text(7_000), encoding="utf-8")
    run = tmp_path / "run"
    smolgpt.train(
        data=str(corpus),
        level="char",
        out_dir=str(run),
        plot=False,
        **{**TINY, "max_iters": 2, "eval_interval": 2},
    )
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text(encoding="utf-8")[:3_000], encoding="utf-8")
    done = smolgpt_cli("eval", run, "--data", other, "--json")
    assert done.returncode == 0, done.stderr
    scores = json.loads(done.stdout)
    assert scores["chars"] == len(other.read_text()) and scores["tokens"] == scores["chars"]

    def refused(*args, needles: tuple) -> None:
        # The command line's own code, in this process (a process each costs seconds; the
        # first case runs as a real process, for its exit status and stderr).
        result = cli_main(["eval", *args])
        e2e_assert_one_line_error(result, *needles)
        assert result.stdout == ""

    result = smolgpt_cli("eval", run, "--data", tmp_path / "missing.txt")
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "missing.txt" in result.stderr and "Traceback" not in result.stderr
    refused(run, "--batch_size", "0", needles=("--batch_size",))
    (tmp_path / "odd.txt").write_text("zzz \u2603 qqq", encoding="utf-8")
    refused(run, "--data", tmp_path / "odd.txt", needles=("'z'", "'\u2603'"))  # the unknown ones
    refused(tmp_path / "nothing-here", needles=("nothing-here",))
    # The run's text changed since: its validation split is gone; --data gives another.
    corpus.write_text(e2e_corpus_text(7_000, seed=99), encoding="utf-8")
    refused(run, needles=(str(corpus), "changed", "--data"))
    corpus.unlink()
    refused(run, needles=("corpus.txt",))


# ---------------------------------------------------------------- loss.png in a run


@pytest.mark.slow
def test_training_redraws_loss_png_at_every_evaluation(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(e2e_corpus_text(7_000), encoding="utf-8")
    run = tmp_path / "run"
    smolgpt.train(data=str(corpus), level="char", out_dir=str(run), **TINY)
    png = run / "loss.png"
    image = imread(png)
    assert image.shape[:2] == (400, 1000)
    assert len(rows(run)) == 3 and not list(run.glob(".*.tmp"))
    # Both curves are drawn: matplotlib's first two colours, train and val.
    for rgb in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        close = (abs(image[..., :3] - [c / 255 for c in rgb]).max(axis=-1) < 0.04).sum()
        assert close > 100, rgb

    # A resumed run redraws it with its new rows; --no-plot leaves it alone.
    before = png.read_bytes()
    smolgpt.train(
        data=str(corpus), level="char", out_dir=str(run), resume=True, **{**TINY, "max_iters": 15}
    )
    assert png.read_bytes() != before
    after = png.read_bytes()
    smolgpt.train(
        data=str(corpus),
        level="char",
        out_dir=str(run),
        resume=True,
        plot=False,
        **{**TINY, "max_iters": 20},
    )
    assert png.read_bytes() == after and len(rows(run)) == 5


@pytest.mark.slow
def test_without_matplotlib_training_works_and_says_how_to_get_plots(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(e2e_corpus_text(7_000), encoding="utf-8")
    done = smolgpt_without(
        "matplotlib",
        "train",
        "--data",
        corpus,
        "--level",
        "char",
        "--out_dir",
        tmp_path / "run",
        settings=TINY,
    )
    assert done.returncode == 0, done.stderr
    hints = [line for line in done.stderr.splitlines() if "loss.png" in line]
    assert len(hints) == 1, hints  # what to install, and the flag that silences the hint
    assert "--no-plot" in hints[0], hints
    e2e_assert_install_advice(hints[0], "plot")
    assert "Traceback" not in done.stderr
    assert (tmp_path / "run" / "best_model.pth").is_file()
    assert not (tmp_path / "run" / "loss.png").exists()


def test_a_run_without_a_checkpoint_yet_is_not_read_as_an_export(tmp_path):
    """A run killed before its first save holds config.json (the run's settings), the name
    transformers gives its config too: loading it says what it is."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"preset": "nano", "smolgpt_version": "0.7.0"}))
    with pytest.raises(smolgpt.SmolGPTError, match=names(str(run), "training run", "checkpoint")):
        smolgpt.load(run)
