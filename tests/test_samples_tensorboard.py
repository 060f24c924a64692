"""What a run shows a learner as it trains: --sample_every's samples (logged and kept in
samples.txt) and --tensorboard's event files, and what happens without the tensorboard
package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import smolgpt
from smolgpt import checkpoint

from e2e import e2e_assert_install_advice, e2e_corpus_text, smolgpt_without

TINY = dict(
    level="char",
    preset="nano",
    n_layer=1,
    n_embd=16,
    n_head=2,
    block_size=16,
    batch_size=4,
    eval_iters=2,
    eval_interval=5,
    max_iters=20,
    early_stop_patience=0,
    plot=False,
    dropout=0.1,
)


@pytest.fixture
def corpus(tmp_path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text(e2e_corpus_text(6_000), encoding="utf-8")
    return str(path)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_samples_come_at_evaluations_sample_every_steps_apart_and_change_nothing(
    tmp_path, corpus, caplog
):
    caplog.set_level("INFO", logger="smolgpt")
    sampled, plain = tmp_path / "sampled", tmp_path / "plain"
    smolgpt.train(data=corpus, out_dir=str(sampled), sample_every=10, **TINY)
    smolgpt.train(data=corpus, out_dir=str(plain), **TINY)
    text = (sampled / "samples.txt").read_text(encoding="utf-8")
    headings = [line for line in text.splitlines() if line.startswith("--- iter")]
    val = {r["iter"]: r["val_loss"] for r in rows(sampled)}
    assert headings == [f"--- iter {i}, val loss {val[i]:.4f} ---" for i in (0, 10, 20)]
    for heading in headings:
        assert heading in caplog.text
    # Each sample is the prompt (a line break) and 100 characters, the same seed each time:
    # the first (untrained) and last differ only because the model learned.
    samples = [part.split("---\n", 1)[1].rstrip("\n") for part in text.split("\n\n--- ")]
    assert len(samples) == 3 and samples[0] != samples[-1]
    assert all(len(s) >= 90 for s in samples)
    # Sampling draws from its own generator with dropout off: training is exactly as without.
    assert [r["val_loss"] for r in rows(sampled)] == [r["val_loss"] for r in rows(plain)]
    a = checkpoint.load(sampled / "latest_model.pth").model
    b = checkpoint.load(plain / "latest_model.pth").model
    assert all(a[k].equal(b[k]) for k in a)
    assert not (plain / "samples.txt").exists()


def test_tensorboard_logs_every_evaluation_and_forgets_what_a_resume_redoes(tmp_path, corpus):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    run = tmp_path / "run"
    smolgpt.train(data=corpus, out_dir=str(run), tensorboard=True, **{**TINY, "max_iters": 10})
    smolgpt.train(data=corpus, out_dir=str(run), tensorboard=True, resume=True, **TINY)

    board = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    metrics = rows(run)
    assert {"loss/train", "loss/val", "val_bits_per_char", "lr"} <= set(board.Tags()["scalars"])
    val = board.Scalars("loss/val")
    assert [e.step for e in val] == [r["iter"] for r in metrics] == [0, 5, 10, 15, 20]
    assert [e.value for e in val] == pytest.approx([r["val_loss"] for r in metrics], abs=1e-6)
    bpc = board.Scalars("val_bits_per_char")
    assert [e.value for e in bpc] == pytest.approx(
        [r["val_bits_per_char"] for r in metrics], abs=1e-6
    )


@pytest.mark.slow
def test_without_tensorboard_training_goes_on_and_says_what_to_install(tmp_path, corpus):
    done = smolgpt_without(
        "tensorboard",
        "train",
        "--data",
        corpus,
        "--out_dir",
        tmp_path / "run",
        "--tensorboard",
        settings=TINY,
    )
    assert done.returncode == 0, done.stderr
    hints = [line for line in done.stderr.splitlines() if "--tensorboard" in line]
    assert len(hints) == 1, done.stderr  # one line naming the flag, and what to install
    e2e_assert_install_advice(hints[0], "tensorboard")
    assert (tmp_path / "run" / "best_model.pth").is_file()
    assert not (tmp_path / "run" / "tensorboard").exists()
