"""What a run shows while it trains: the progress bar (resumed runs start it where they
were; a time budget shows seconds of the budget, without a rate, and ends at 100%), and an
extended run's learning rate, end to end on a real terminal (a pseudo-terminal)."""

from __future__ import annotations

import fcntl
import io
import os
import re
import struct
import subprocess
import termios

import pytest
import torch

from smolgpt.config import resolve_train_config
from smolgpt.runlog import RunLog


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _renders(text: str) -> list:
    """The successive states of a bar that a terminal would show (tqdm redraws with \\r)."""
    return [r.strip() for r in re.split(r"[\r\n]", text) if r.strip()]


def _fake_terminal(monkeypatch) -> FakeTerminal:
    """stderr, for the rest of the test, is a terminal that records what it shows. (Called
    in the test itself: pytest sets its own stderr between a fixture and the test.)"""
    screen = FakeTerminal()
    monkeypatch.setattr("sys.stderr", screen)
    return screen


def _run_log(tmp_path, iteration=0, elapsed=0.0, **settings) -> RunLog:
    cfg = resolve_train_config({"preset": "nano", "level": "char", "log_interval": 1, **settings})
    return RunLog(
        cfg, tmp_path, flops_per_token=1e6, peak_flops=1e12, iteration=iteration, elapsed=elapsed
    )


def test_a_resumed_runs_bar_starts_where_it_was(tmp_path, monkeypatch):
    terminal = _fake_terminal(monkeypatch)
    with _run_log(tmp_path, iteration=20, max_iters=40) as run_log:
        first = _renders(terminal.getvalue())[0]
        run_log.step(21, torch.tensor(2.0), 1e-3, elapsed=50.0, tokens=1024)
        assert run_log.bar.format_dict["initial"] == 20  # rate and ETA: this process's steps
    shown = _renders(terminal.getvalue())
    assert "20/40" in first and "21/40" in shown[-1]
    assert not any(re.search(r"\b0/40", r) for r in shown)
    assert "left" not in terminal.getvalue()  # the ETA says it


def test_a_time_budget_bar_shows_seconds_of_the_budget_and_ends_full(tmp_path, monkeypatch):
    terminal = _fake_terminal(monkeypatch)
    with _run_log(tmp_path, elapsed=5.0, time_budget=15.0) as run_log:
        run_log.step(1, torch.tensor(2.0), 1e-3, elapsed=6.4, tokens=1024)
        run_log.finish()
    shown = _renders(terminal.getvalue())
    assert "5/15 s" in shown[0] and "6/15 s" in " ".join(shown)
    assert "100%" in shown[-1] and "15/15 s" in shown[-1]
    text = terminal.getvalue()
    assert "s/s" not in text and "it/s" not in text and "left" not in text


# ------------------------------------------------------------------- end to end, on a tty

FLAGS = (
    "--level char --preset nano --n_layer 1 --n_embd 16 --n_head 2 --block_size 16 --batch_size 4 "
    "--eval_iters 2 --eval_interval 10 --warmup_iters 5 --early_stop_patience 0"
).split()


def _train_on_a_terminal(smol_cli, *args) -> str:
    """Run train.py with stdout and stderr on a pseudo-terminal; return what it showed."""
    main, child = os.openpty()
    # A new pseudo-terminal is 0 columns wide, where a bar shows nothing: make it 120.
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        smol_cli.argv("train", *args),
        stdin=subprocess.DEVNULL,
        stdout=child,
        stderr=child,
        env=smol_cli.env(),
        cwd=str(smol_cli.base),
    )
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the child side has closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    text = b"".join(chunks).decode("utf-8", "replace")
    assert proc.wait(timeout=180) == 0, text
    return text


@pytest.mark.slow
def test_extending_a_finished_run_on_a_terminal(smol_cli, tmp_path):
    """--resume --max_iters 40 after a run of 20: the bar starts at 20/40 and ends at 100%,
    and the learning rate goes on from where it was, never up again after warm-up."""
    out = tmp_path / "run"
    base = [*FLAGS, "--data", smol_cli.corpus, "--out_dir", out]
    first = smol_cli.run("train", *base, "--max_iters", "20")
    assert first.returncode == 0, first.describe()
    shown = _renders(_train_on_a_terminal(smol_cli, *base, "--resume", "--max_iters", "40"))
    bars = [r for r in shown if "/40" in r]
    assert "20/40" in bars[0] and "100%" in bars[-1] and "40/40" in bars[-1], bars
    assert not any(re.search(r"\b0/40", r) for r in bars), bars

    rows = smol_cli.metrics(out)
    assert [r["iter"] for r in rows] == [0, 10, 20, 30, 40]
    rates = [r["lr"] for r in rows if r["iter"] >= 10]  # warm-up: the first 5 steps
    assert all(b <= a for a, b in zip(rates, rates[1:])), rates
    final_lr = 0.02 / 10  # nano's char learning rate, decayed to a tenth
    assert [r["lr"] for r in rows[3:]] == pytest.approx([final_lr] * 2)  # goes on at final_lr


@pytest.mark.slow
def test_a_time_budget_bar_ends_at_100_percent_on_a_terminal(smol_cli, tmp_path):
    text = _train_on_a_terminal(
        smol_cli,
        *FLAGS,
        "--data",
        smol_cli.corpus,
        "--out_dir",
        tmp_path / "run",
        "--time_budget",
        "3",
    )
    bars = [r for r in _renders(text) if "/3 s" in r]
    assert bars and "100%" in bars[-1] and "3/3 s" in bars[-1], bars
    assert "s/s" not in text


def test_mfu_is_never_above_100_percent(tmp_path):
    run_log = _run_log(tmp_path)  # 1e6 FLOPs a token against a peak of 1e12 FLOP/s
    assert run_log.mfu(1e5) == pytest.approx(0.1)
    assert run_log.mfu(5e6) == 1.0  # a peak measured too low cannot make it 500%
