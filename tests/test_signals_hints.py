"""The commands smolgpt prints for the user run as printed, and signals stop a run cleanly
(real processes, real signals, real shells).

- After an interrupt, the ``Resume with:`` command pasted into bash resumes the run; after a
  finished run, the ``sample with:`` command prints text. Under ``python train.py``, the
  ``smolgpt`` console script run outside the repository, and ``python -m smolgpt``.
- SIGHUP (a closed terminal, a dropped SSH session) saves, exits 129 and the run resumes;
  also when the terminal really closed, so that every write to it fails.
- SIGINT during a long evaluation abandons it at once, saves the state from before it, and
  the resumed run writes every metrics row exactly once.

The end-to-end scenarios are mostly start-up (importing torch) and waiting, so the
``scenarios`` fixture starts them all at once; each test checks what its scenario saw.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import pty
import select
import shlex
import signal
import subprocess
import sys
import termios
import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest

from smolgpt import checkpoint, cli

from e2e import E2E_ROOT, E2EProcess, E2EResult

# A model that takes a few milliseconds a step; evaluations at 0, 50, 100, ...
TINY = (
    "--level char --preset nano --n_layer 1 --n_embd 16 --n_head 2 --block_size 16 --batch_size 4 "
    "--eval_iters 2 --eval_interval 50 --log_interval 50 --early_stop_patience 0"
).split()
VENV_BIN = Path(sys.executable).parent  # where the `smolgpt` console script is installed
LAUNCHERS = ["python train.py", "smolgpt", "python -m smolgpt"]


def _iters(smol_cli, run_dir: Path) -> list:
    return [row["iter"] for row in smol_cli.metrics(run_dir)]


def _printed_command(result: E2EResult, label: str) -> str:
    """The command printed after `label` (to the end of its line) on stderr."""
    lines = [line for line in result.stderr.splitlines() if label in line]
    assert len(lines) == 1, f"expected one {label!r} line\n{result.describe()}"
    return lines[0].split(label, 1)[1].strip()


def _progress(run_dir: Path) -> dict:
    return dataclasses.asdict(checkpoint.load(run_dir / "latest_model.pth").progress)


# ---------------------------------------------------------------- printed commands, fast


def test_the_interpreter_is_python_only_where_python_runs_it(tmp_path, monkeypatch):
    """`python` in a printed command must start this very interpreter: a virtual
    environment's python is a link to the base interpreter, and the base one is not it."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "python").symlink_to(os.path.realpath(sys.executable))
    monkeypatch.setenv("PATH", str(elsewhere))
    assert cli.typed_name(str(elsewhere / "python"), "python") == "python"
    assert cli.typed_name(sys.executable, "python") == sys.executable
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert cli.typed_name(sys.executable, "python") == sys.executable


def test_printed_commands_are_quoted_and_resume_the_same_run(tmp_path, monkeypatch):
    (tmp_path / "python").symlink_to(os.path.realpath(sys.executable))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    launcher = cli.Launcher.scripts("../my code")
    args = cli.resume_args(["--out_dir", "runs/it's mine", "--overwrite", "--no-resume"])
    assert (
        launcher.command("train", args)
        == "python '../my code/train.py' --out_dir 'runs/it'\"'\"'s mine' --resume"
    )
    assert launcher.command("generate", ["a b.pth"]) == "python '../my code/generate.py' 'a b.pth'"
    assert cli.Launcher.scripts("").train == ("python", "train.py")


# ------------------------------------------------------------------ the scenarios


def _paste(command: str, cwd: Path, env: dict, logs: Path) -> E2EResult:
    """Run a printed command as the user would: pasted into a shell."""
    return E2EProcess(["bash", "-c", command], logs, env=env, cwd=str(cwd)).wait()


def _hint_round_trip(smol_cli, base: Path, launcher: str) -> dict:
    """Train under a launcher, SIGINT it, paste its resume command, then its sample command.
    python train.py runs in the repository with the environment's python first on PATH;
    the console script runs outside it, found on PATH; python -m smolgpt runs outside it,
    with no python on PATH that is this one (so the hints name the interpreter by path)."""
    elsewhere = base / "elsewhere"
    elsewhere.mkdir(parents=True)
    path = os.environ.get("PATH", "")
    if launcher == "python -m smolgpt":
        path = os.pathsep.join(
            p
            for p in path.split(os.pathsep)
            if p and os.path.realpath(p) != os.path.realpath(VENV_BIN)
        )
    else:
        path = os.pathsep.join([str(VENV_BIN), path])
    env = smol_cli.env(PATH=path)
    head, cwd = {
        "python train.py": ([sys.executable, "train.py"], E2E_ROOT),
        "smolgpt": ([VENV_BIN / "smolgpt", "train"], elsewhere),
        "python -m smolgpt": ([sys.executable, "-m", "smolgpt", "train"], elsewhere),
    }[launcher]
    # Outside the repository, a relative run directory with a space in its name.
    out_dir = base / "run" if cwd == E2E_ROOT else "my run"
    run_dir = cwd / out_dir
    args = [*head, "--data", smol_cli.corpus, *TINY, "--max_iters", "200", "--out_dir", out_dir]
    proc = E2EProcess([str(a) for a in args], base / "logs" / "train", env=env, cwd=str(cwd))
    smol_cli.wait_for(lambda: smol_cli.metrics(run_dir), process=proc, what="a metrics row")
    proc.send_signal(signal.SIGINT)
    interrupted = proc.wait()
    resumed = _paste(
        _printed_command(interrupted, "Resume with:"), cwd, env, base / "logs" / "resume"
    )
    sampled = _paste(_printed_command(resumed, "sample with:"), cwd, env, base / "logs" / "sample")
    return dict(
        interrupted=interrupted, resumed=resumed, sampled=sampled, iters=_iters(smol_cli, run_dir)
    )


def _sighup(smol_cli, base: Path) -> dict:
    """SIGHUP a run whose output goes to files, then resume it."""
    out = base / "run"
    args = ["--data", smol_cli.corpus, *TINY, "--max_iters", "200", "--out_dir", out]
    proc = smol_cli.popen("train", *args)
    smol_cli.wait_for(lambda: smol_cli.metrics(out), process=proc, what="a metrics row")
    proc.send_signal(signal.SIGHUP)
    stopped = proc.wait()
    saved = _progress(out) if (out / "latest_model.pth").exists() else None
    resumed = smol_cli.run("train", *args, "--resume")
    return dict(stopped=stopped, saved=saved, resumed=resumed, iters=_iters(smol_cli, out))


def _closed_terminal(smol_cli, base: Path) -> dict:
    """A run on a pseudo-terminal (its controlling terminal) that closes, as a terminal
    window or an SSH session does: the kernel sends SIGHUP, and every write to the terminal
    fails from then on. Then resume it."""
    out = base / "run"
    args = ["--data", smol_cli.corpus, *TINY, "--max_iters", "200", "--out_dir", out]
    base.mkdir(parents=True)
    terminal, its_end = pty.openpty()

    def on_the_terminal():  # a new session, whose controlling terminal is the pty
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        smol_cli.argv("train", *args),
        stdin=its_end,
        stdout=its_end,
        stderr=its_end,
        env=smol_cli.env(),
        cwd=str(base),
        preexec_fn=on_the_terminal,
    )
    os.close(its_end)
    shown = b""  # what the terminal showed
    try:
        # Read what the run writes (a progress bar, too), or the terminal's buffer fills
        # and the run waits.
        deadline = time.monotonic() + 120
        while not smol_cli.metrics(out) and proc.poll() is None and time.monotonic() < deadline:
            if select.select([terminal], [], [], 0.01)[0]:
                shown += os.read(terminal, 65536)
        os.close(terminal)  # the terminal closes
        closed = time.monotonic()
        status = proc.wait(timeout=60)
        seconds = time.monotonic() - closed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    saved = _progress(out) if (out / "latest_model.pth").exists() else None
    resumed = smol_cli.run("train", *args, "--resume")
    return dict(
        status=status,
        seconds=seconds,
        shown=shown.decode(errors="replace")[-3000:],
        saved=saved,
        resumed=resumed,
        iters=_iters(smol_cli, out),
    )


def _interrupted_evaluation(smol_cli, base: Path) -> dict:
    """A run of 50 steps, resumed with an evaluation of 2 x 20,000 batches (most of a
    minute) at iteration 100 that SIGINT interrupts; then resumed again with quick ones."""
    out = base / "run"
    args = ["--data", smol_cli.corpus, *TINY, "--out_dir", out]
    first = smol_cli.run("train", *args, "--max_iters", "50")
    assert first.returncode == 0, first.describe()
    proc = smol_cli.popen("train", *args, "--resume", "--max_iters", "150", "--eval_iters", "20000")
    stderr = Path(proc._err.name)
    # The progress line of iteration 100 comes just before its evaluation starts.
    smol_cli.wait_for(
        lambda: "iter 100 |" in stderr.read_text(encoding="utf-8"),
        process=proc,
        what="iteration 100",
    )
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    signalled = time.monotonic()
    stopped = proc.wait()
    seconds = time.monotonic() - signalled
    saved, iters_then = _progress(out), _iters(smol_cli, out)
    resumed = smol_cli.run("train", *args, "--resume", "--max_iters", "150")
    return dict(
        stopped=stopped,
        seconds=seconds,
        saved=saved,
        iters_then=iters_then,
        resumed=resumed,
        iters=_iters(smol_cli, out),
    )


@pytest.fixture(scope="module")
def scenarios(smol_cli, tmp_path_factory) -> dict[str, Future]:
    """{name: the Future of what the scenario saw}, every scenario run at once and finished
    (a test that fails kills the processes still running: they must be no one else's)."""
    base = tmp_path_factory.mktemp("signals")
    work = {
        **{name: partial(_hint_round_trip, launcher=name) for name in LAUNCHERS},
        "sighup": _sighup,
        "closed terminal": _closed_terminal,
        "evaluation": _interrupted_evaluation,
    }
    with ThreadPoolExecutor(3) as pool:  # waits for every scenario when the block ends
        return {
            name: pool.submit(run, smol_cli, base / str(i))
            for i, (name, run) in enumerate(work.items())
        }


# -------------------------------------------------------------------------- the tests


@pytest.mark.slow
@pytest.mark.stress
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_pasted_resume_and_sample_commands_work(scenarios, launcher):
    trip = scenarios[launcher].result()
    interrupted, resumed, sampled = trip["interrupted"], trip["resumed"], trip["sampled"]
    assert interrupted.returncode == 130, interrupted.describe()
    assert "SIGINT received" in interrupted.stderr, interrupted.describe()
    resume = shlex.split(_printed_command(interrupted, "Resume with:"))
    sample = shlex.split(_printed_command(resumed, "sample with:"))
    expected_head = {
        "python train.py": (["python", "train.py"], ["python", "generate.py"]),
        "smolgpt": (["smolgpt", "train"], ["smolgpt", "generate"]),
        "python -m smolgpt": (
            [sys.executable, "-m", "smolgpt", "train"],
            [sys.executable, "-m", "smolgpt", "generate"],
        ),
    }[launcher]
    assert resume[: len(expected_head[0])] == expected_head[0], resume
    assert resume[-1] == "--resume", resume
    assert sample[: len(expected_head[1])] == expected_head[1], sample

    assert resumed.returncode == 0, resumed.describe()
    assert "done: 200 iterations" in resumed.stderr, resumed.describe()
    assert trip["iters"] == [0, 50, 100, 150, 200]
    assert sampled.returncode == 0, sampled.describe()
    assert len(sampled.stdout.strip()) > 20, sampled.describe()


@pytest.mark.slow
@pytest.mark.stress
def test_sighup_saves_exits_129_and_resumes(scenarios):
    seen = scenarios["sighup"].result()
    stopped, resumed = seen["stopped"], seen["resumed"]
    assert stopped.returncode == 129, stopped.describe()
    assert "interrupted by SIGHUP" in stopped.stderr, stopped.describe()
    assert "Resume with:" in stopped.stderr, stopped.describe()
    assert seen["saved"] and seen["saved"]["iter"] > 0 and not seen["saved"]["evaluated"], seen[
        "saved"
    ]
    assert resumed.returncode == 0, resumed.describe()
    assert seen["iters"] == [0, 50, 100, 150, 200]


@pytest.mark.slow
@pytest.mark.stress
def test_closing_the_terminal_saves_the_run(scenarios):
    seen = scenarios["closed terminal"].result()
    assert seen["status"] == 129, f"exit {seen['status']}; the terminal showed:\n{seen['shown']}"
    assert seen["seconds"] < 10
    # Saved where the signal stopped it, not only at the evaluation before.
    assert seen["saved"] and seen["saved"]["iter"] > 0 and not seen["saved"]["evaluated"], seen[
        "saved"
    ]
    assert seen["resumed"].returncode == 0, seen["resumed"].describe()
    assert seen["iters"] == [0, 50, 100, 150, 200]


@pytest.mark.slow
@pytest.mark.stress
def test_sigint_during_a_long_evaluation_stops_it_at_once(scenarios):
    seen = scenarios["evaluation"].result()
    stopped, resumed = seen["stopped"], seen["resumed"]
    assert stopped.returncode == 130, stopped.describe()
    assert seen["seconds"] < 5, f"took {seen['seconds']:.1f}s to stop\n{stopped.describe()}"
    said = [line for line in stopped.stderr.splitlines() if "SIGINT received" in line]
    assert said and "evaluation" in said[0], stopped.describe()  # what it stops
    assert "Resume with:" in stopped.stderr, stopped.describe()
    # The state from before the evaluation, which the resumed run makes again.
    assert (seen["saved"]["iter"], seen["saved"]["evaluated"]) == (100, False), seen["saved"]
    assert seen["iters_then"] == [0, 50]
    assert resumed.returncode == 0, resumed.describe()
    assert seen["iters"] == [0, 50, 100, 150]
