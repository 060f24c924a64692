"""Training survives crashes, interrupts and hostile files (end to end, real processes).

- an interrupted and resumed run equals an uninterrupted one, bit for bit;
- SIGINT / SIGTERM save and say how to resume; SIGKILL at any instant (during a save
  included) never leaves a checkpoint that does not load, or a directory that blocks the
  next run;
- a diverging run stops with one line and keeps its last good checkpoints;
- one training process per run directory, and a dead one never leaves it locked;
- a full disk, bad output paths, and malicious, truncated, empty, foreign or damaged
  checkpoints are refused with one line, touching nothing;
- a token cache damaged after it was written is rebuilt, and the run is the same.

The tests marked ``stress`` depend on timing (signals and kills land at moments the clock
chooses, or a second run races a live one); CI runs them all, and
``pytest -m "not stress"`` leaves them out.
"""

from __future__ import annotations

import os
import random
import resource
import shlex
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from smolgpt import checkpoint

from e2e import e2e_assert_one_line_error, e2e_snapshot, flip_bit_in_tensor_data

pytestmark = pytest.mark.slow

VOLATILE = {"elapsed_s", "tokens_per_s", "mfu"}  # timings: differ between any two runs
RUN_FILES = ("best_model.pth", "latest_model.pth", "metrics.jsonl")


def _rows(smol_cli, run_dir: Path) -> list:
    return [
        {k: v for k, v in row.items() if k not in VOLATILE} for row in smol_cli.metrics(run_dir)
    ]


def _tensors(ckpt: dict, key: str) -> dict:
    """Every tensor under ckpt[key], flattened to {dotted path: tensor}."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            out[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)

    walk(key, ckpt[key])
    return out


def _assert_same_tensors(a: dict, b: dict, key: str) -> None:
    ta, tb = _tensors(a, key), _tensors(b, key)
    assert ta.keys() == tb.keys()
    different = [name for name in ta if not torch.equal(ta[name], tb[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


def _load_raw(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _tmp_files(run_dir: Path) -> list:
    return sorted(p.name for p in Path(run_dir).glob("*.tmp"))


# ------------------------------------------------------------------ interrupt and resume


@pytest.mark.stress
@pytest.mark.parametrize("level", ["char", "word"])
def test_interrupted_and_resumed_equals_uninterrupted(smol_cli, tmp_path, level):
    """SIGINT mid-run (exit 130), then --resume: metrics and weights identical, bit for bit,
    to a run that was never interrupted (default settings: bf16 autocast where native).
    Dropout is on, so the restored random state matters too."""
    flags = ["--max_iters", "200", "--eval_interval", "10", "--dropout", "0.1"]
    whole, broken = tmp_path / "uninterrupted", tmp_path / "interrupted"
    a = smol_cli.popen("train", *smol_cli.train_args(level, whole, *flags))
    b = smol_cli.popen("train", *smol_cli.train_args(level, broken, *flags))

    smol_cli.wait_for(
        lambda: len(smol_cli.metrics(broken)) >= 3, process=b, what="three metrics rows"
    )
    b.send_signal(signal.SIGINT)
    stopped = b.wait()
    assert stopped.returncode == 130, stopped.describe()
    assert "--resume" in stopped.stderr, stopped.describe()
    stopped_at = checkpoint.load(broken / "latest_model.pth").progress.iter
    assert 20 <= stopped_at < 200, stopped.describe()

    resumed = smol_cli.run("train", *smol_cli.train_args(level, broken, *flags, "--resume"))
    assert resumed.returncode == 0, resumed.describe()
    reference = a.wait()
    assert reference.returncode == 0, reference.describe()

    assert _rows(smol_cli, broken) == _rows(smol_cli, whole)
    assert [r["iter"] for r in smol_cli.metrics(broken)] == list(range(0, 201, 10))
    for name in ("latest_model.pth", "best_model.pth"):
        mine, theirs = _load_raw(broken / name), _load_raw(whole / name)
        _assert_same_tensors(mine, theirs, "model")
        _assert_same_tensors(mine, theirs, "optimizer")
        assert mine["progress"]["iter"] == theirs["progress"]["iter"]
        assert mine["progress"]["best_val_loss"] == theirs["progress"]["best_val_loss"]


@pytest.mark.stress
def test_sigterm_saves_and_says_how_to_resume(smol_cli, tmp_path):
    out = tmp_path / "run"
    args = smol_cli.train_args("char", out, "--max_iters", "200")
    proc = smol_cli.popen("train", *args)
    smol_cli.wait_for(
        lambda: len(smol_cli.metrics(out)) >= 2, process=proc, what="two metrics rows"
    )
    proc.send_signal(signal.SIGTERM)
    stopped = proc.wait()
    assert stopped.returncode == 143, stopped.describe()
    assert "Traceback" not in stopped.stderr, stopped.describe()
    saved = checkpoint.load(out / "latest_model.pth")
    assert 10 <= saved.progress.iter < 200

    # The hint is the command as it was started (an interpreter, then train.py as typed),
    # with --resume; tests/test_signals_hints.py pastes such hints into a shell.
    hint = stopped.stderr.rsplit("Resume with:", 1)
    assert len(hint) == 2, stopped.describe()
    words = shlex.split(hint[1].strip().splitlines()[0])
    assert words[1] == str(smol_cli.root / "train.py") and words[-1] == "--resume", hint[1]
    resumed = smol_cli.run("train", *words[2:])
    assert resumed.returncode == 0, resumed.describe()
    assert [r["iter"] for r in smol_cli.metrics(out)] == list(range(0, 201, 10))


# ------------------------------------------------------------------------------ SIGKILL

KILL_FLAGS = ["--eval_interval", "2", "--log_interval", "2", "--max_iters", "100000"]


def _kill_lane(smol_cli, out: Path, env: dict, seed: int, modes: list) -> tuple[list, list]:
    """One run directory, killed once per mode; returns (report lines, problems)."""
    rng = random.Random(seed)
    report, problems = [], []
    for trial, mode in enumerate(modes):
        resume = (out / "latest_model.pth").exists()
        tmp_before = set(_tmp_files(out)) if out.exists() else set()
        rows_before = len(smol_cli.metrics(out))
        proc = smol_cli.popen(
            "train",
            *smol_cli.train_args("char", out, *KILL_FLAGS, *(["--resume"] if resume else [])),
            env=env,
        )
        deadline = time.monotonic() + 90
        if mode == "early":  # anywhere in start-up: imports, tokenizing, first steps
            delay = rng.uniform(0.05, 3.0)
            while proc.poll() is None and time.monotonic() - proc.started < delay:
                time.sleep(0.005)
        elif mode == "late":  # while training: between steps, evaluations and saves
            while (
                proc.poll() is None
                and len(smol_cli.metrics(out)) <= rows_before
                and time.monotonic() < deadline
            ):
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.3))
        else:  # "save": the moment a new temporary checkpoint file appears
            while proc.poll() is None and time.monotonic() < deadline:
                if out.exists() and set(_tmp_files(out)) - tmp_before:
                    break
                time.sleep(0.0005)
        proc.kill()
        result = proc.wait()
        report.append(
            f"{out.name} trial {trial} ({mode}, resume={resume}): exit "
            f"{result.returncode} after {result.seconds:.2f}s, "
            f"{len(smol_cli.metrics(out))} metrics rows"
        )
        if result.returncode not in (-signal.SIGKILL, 0):
            problems.append(
                f"{out.name} trial {trial} ({mode}) was refused or failed:\n{result.describe()}"
            )
            if not (out / "latest_model.pth").exists():
                # Stuck without a checkpoint to resume: clear the run by hand, as a user
                # would have to, so that the remaining trials still test something.
                for name in RUN_FILES:
                    (out / name).unlink(missing_ok=True)
        for name in ("best_model.pth", "latest_model.pth"):
            if (out / name).exists():
                try:
                    checkpoint.load(out / name)
                except Exception as exc:  # noqa: BLE001 (any failure is the finding)
                    problems.append(
                        f"{out.name} trial {trial} ({mode}): {name} does not load: {exc}"
                    )

    # Finish: a few more steps from wherever the kills left the run.
    if (out / "latest_model.pth").exists():
        done = checkpoint.load(out / "latest_model.pth").progress.iter
        final = smol_cli.run(
            "train",
            *smol_cli.train_args(
                "char", out, *KILL_FLAGS, "--resume", "--max_iters", str(done + 4)
            ),
            env=env,
        )
    else:
        final = smol_cli.run(
            "train", *smol_cli.train_args("char", out, *KILL_FLAGS, "--max_iters", "4"), env=env
        )
    report.append(
        f"{out.name} final run: exit {final.returncode}; "
        f"{len(_tmp_files(out))} temporary files left by the kills"
    )
    if final.returncode != 0:
        problems.append(f"{out.name}: the final run failed:\n{final.describe()}")
    else:
        iters = [r["iter"] for r in smol_cli.metrics(out)]
        if iters != sorted(set(iters)):
            problems.append(f"{out.name}: metrics rows repeated or out of order: {iters}")
        for name in ("best_model.pth", "latest_model.pth"):
            checkpoint.load(out / name)
    return report, problems


@pytest.mark.stress
def test_sigkill_at_any_moment_never_breaks_the_run(smol_cli, smol_runs, tmp_path):
    """Kill -9 training processes again and again, at random (seeded) instants: during
    start-up and tokenization, between steps, and in the middle of checkpoint saves
    (--eval_interval 2 saves every other step). After every kill each checkpoint present
    loads, and the next command (--resume if there is a latest_model.pth, else a new run)
    is not refused; a final run completes. Two run directories at once: one new (with an
    empty token cache), one continuing a finished run."""
    fresh = tmp_path / "fresh"
    existing = smol_runs["char"].copy(tmp_path / "existing")
    lanes = [
        (
            fresh,
            smol_cli.env(SMOLGPT_CACHE_DIR=str(tmp_path / "cache")),
            11,
            ["save", "early", "late", "early", "save", "late"],
        ),
        (existing, smol_cli.env(), 22, ["late", "save", "early", "save", "late", "save"]),
    ]
    with ThreadPoolExecutor(len(lanes)) as pool:
        outcomes = list(pool.map(lambda lane: _kill_lane(smol_cli, *lane), lanes))
    report = [line for lines, _ in outcomes for line in lines]
    problems = [p for _, found in outcomes for p in found]
    print("\n".join(report))
    assert sum(len(lane[3]) for lane in lanes) >= 10
    assert not problems, "\n".join(report + problems)


@pytest.mark.parametrize(
    "left",
    [("metrics.jsonl",), ("metrics.jsonl", "best_model.pth")],
    ids=["metrics only", "metrics and best"],
)
def test_run_killed_during_its_first_save_can_be_restarted(smol_cli, smol_runs, tmp_path, left):
    """What SIGKILL leaves when it lands between the first metrics row and the first
    latest_model.pth. Following the messages must lead to a run that trains: a new run, or
    (if that is refused and says to) --resume."""
    out = smol_runs["char"].copy(tmp_path / "run")
    rows = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "metrics.jsonl").write_text(rows[0], encoding="utf-8")
    for name in ("best_model.pth", "latest_model.pth"):
        if name not in left:
            (out / name).unlink()
    args = smol_cli.train_args("char", out, "--max_iters", "10")
    again = smol_cli.run("train", *args)
    if again.returncode != 0:
        assert again.returncode == 2, again.describe()
        assert "--resume" in again.stderr, again.describe()
        again = smol_cli.run("train", *args, "--resume")
    assert again.returncode == 0, again.describe()
    checkpoint.load(out / "latest_model.pth")


# ---------------------------------------------------------------------------- divergence


def test_nan_loss_stops_with_one_line_and_keeps_good_checkpoints(smol_cli, tmp_path):
    out = tmp_path / "run"
    result = smol_cli.run(
        "train",
        *smol_cli.train_args(
            "char",
            out,
            "--learning_rate",
            "1e6",
            "--grad_clip",
            "0",
            "--warmup_iters",
            "0",
            "--max_iters",
            "200",
        ),
    )
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.describe()
    assert "nan" in errors[0].lower() and "iteration" in errors[0], errors[0]
    assert any(ch.isdigit() for ch in errors[0].split("iteration", 1)[1]), errors[0]
    assert result.stderr.strip().splitlines()[-1] == errors[0], result.describe()
    for name in ("best_model.pth", "latest_model.pth"):
        if (out / name).exists():
            ckpt = checkpoint.load(out / name)
            for key, tensor in ckpt.model.items():
                assert torch.isfinite(tensor).all(), f"{name}: {key} is not finite"
    assert not _tmp_files(out)


# ------------------------------------------------------------------------------- locking


@pytest.mark.stress
def test_one_training_process_per_run_directory(smol_cli, tmp_path):
    out = tmp_path / "run"
    args = smol_cli.train_args("char", out, "--max_iters", "1000000", "--eval_interval", "50")
    first = smol_cli.popen("train", *args)
    try:
        smol_cli.wait_for(
            lambda: (out / "latest_model.pth").exists(), process=first, what="the first checkpoint"
        )
        second = smol_cli.run("train", *args, "--resume")
        smol_cli.assert_one_line_error(second, str(out), "in use")
        assert first.poll() is None, "the refused run disturbed the running one"
    finally:
        first.kill()
    killed = first.wait()
    assert killed.returncode == -signal.SIGKILL, killed.describe()
    # The kernel dropped the lock with the process: the run can go on at once.
    resumed = smol_cli.run(
        "train", *smol_cli.train_args("char", out, "--resume", "--max_iters", "1")
    )
    assert resumed.returncode == 0, resumed.describe()


# --------------------------------------------------------------------------- bad places


@pytest.fixture(scope="module")
def refused_commands(smol_cli, smol_runs, tmp_path_factory) -> dict:
    """Commands refused for where they write or what they read, and the files they name:
    {id: (argv of `smolgpt`, the path to watch)}, plus "marker": the file the evil
    checkpoint's payload would create. Refused commands change nothing: tests share them."""
    base = tmp_path_factory.mktemp("refused")
    a_file = base / "not-a-dir"
    a_file.write_text("precious\n", encoding="utf-8")
    good = base / "good.pth"
    shutil.copyfile(smol_runs["char"].out_dir / "best_model.pth", good)
    raw = good.read_bytes()
    truncated = base / "truncated.pth"
    truncated.write_bytes(raw[: len(raw) * 2 // 3])
    empty = base / "empty.pth"
    empty.write_bytes(b"")
    foreign = base / "foreign.pth"
    torch.save({"state_dict": {"w": torch.ones(3)}, "epoch": 7}, foreign)
    damaged = base / "damaged.pth"
    shutil.copyfile(good, damaged)
    flip_bit_in_tensor_data(damaged)
    # Runs to resume whose latest checkpoint was damaged, or cut short, after it was written.
    resume_damaged = smol_runs["char"].copy(base / "resume-damaged")
    flip_bit_in_tensor_data(resume_damaged / "latest_model.pth")
    resume_truncated = smol_runs["char"].copy(base / "resume-truncated")
    latest = resume_truncated / "latest_model.pth"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    marker = base / "pwned"
    evil = base / "evil.pth"
    _write_evil_checkpoint(evil, good, marker)

    def train(out: Path, *extra) -> list:
        return ["train", *smol_cli.train_args("char", out, *extra)]

    return {
        "out_dir is a file": (train(a_file), a_file),
        "out_dir under a file": (train(a_file / "sub"), a_file),
        "evil checkpoint": (["generate", evil, "--prompt", "The "], base),
        "truncated checkpoint": (["generate", truncated], base),
        "empty checkpoint": (["generate", empty], base),
        "foreign checkpoint": (["generate", foreign], base),
        "damaged checkpoint": (["generate", damaged, "--prompt", "The "], base),
        "resume from a damaged checkpoint": (
            train(resume_damaged, "--resume", "--max_iters", "60"),
            resume_damaged,
        ),
        "resume from a truncated checkpoint": (
            train(resume_truncated, "--resume", "--max_iters", "60"),
            resume_truncated,
        ),
        "marker": marker,
    }


def refuse(run, refused_commands: dict, name: str) -> tuple:
    """Run a refused command with run (cli_main: in this process, the command line's own
    code; a process of its own would only import torch again) and return (result, watched
    path, snapshot before, snapshot after)."""
    argv, watch = refused_commands[name]
    before = e2e_snapshot(watch)
    result = run(argv)
    return result, watch, before, e2e_snapshot(watch)


class _Payload:
    """Unpickling this calls open(path, 'w'): it creates a file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _write_evil_checkpoint(evil: Path, good: Path, marker: Path) -> None:
    """A real smolgpt checkpoint with one extra entry whose unpickling creates `marker`."""
    ckpt = _load_raw(good)
    ckpt["notes"] = _Payload(marker)
    torch.save(ckpt, evil)


def test_evil_checkpoint_payload_is_armed(smol_runs, tmp_path):
    """A file made as the refused_outputs fixture makes its evil checkpoint really does
    create its marker when loaded the unsafe way: the refusal tested below is what keeps
    it from running."""
    marker, evil = tmp_path / "armed", tmp_path / "evil.pth"
    _write_evil_checkpoint(evil, smol_runs["char"].out_dir / "best_model.pth", marker)
    assert not marker.exists()
    torch.load(evil, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["out_dir is a file", "out_dir under a file"])
def test_bad_out_dir_is_refused_before_training(cli_main, refused_commands, name):
    result, watch, before, after = refuse(cli_main, refused_commands, name)
    e2e_assert_one_line_error(result, str(watch))
    assert after == before
    assert "eval" not in result.stderr


def test_evil_checkpoint_runs_no_code(smol_cli, refused_commands):
    # A real process, as a user runs generate.py on a file from the internet.
    argv, watch = refused_commands["evil checkpoint"]
    before = e2e_snapshot(watch)
    result = smol_cli.run("module", *argv)
    smol_cli.assert_one_line_error(result, "evil.pth")
    assert not refused_commands["marker"].exists(), "loading the checkpoint ran code"
    assert e2e_snapshot(watch) == before


@pytest.mark.parametrize(
    "name", ["truncated checkpoint", "empty checkpoint", "foreign checkpoint", "damaged checkpoint"]
)
def test_broken_checkpoints_are_refused(cli_main, refused_commands, name):
    result, watch, before, after = refuse(cli_main, refused_commands, name)
    e2e_assert_one_line_error(result, name.split()[0] + ".pth")
    assert result.stdout == ""
    assert after == before


@pytest.mark.parametrize(
    "name, needle",
    [
        ("resume from a damaged checkpoint", "damaged"),
        ("resume from a truncated checkpoint", "truncated"),
    ],
)
def test_resume_refuses_a_checkpoint_damaged_after_it_was_written(
    cli_main, refused_commands, name, needle
):
    result, watch, before, after = refuse(cli_main, refused_commands, name)
    latest = str(watch / "latest_model.pth")
    line = e2e_assert_one_line_error(result, latest)
    assert needle in line.replace(latest, ""), line  # not only in the path
    assert after == before  # nothing overwritten, best_model.pth included


def test_a_damaged_token_cache_is_rebuilt_and_trains_the_same(smol_cli, tmp_path):
    cache = tmp_path / "cache"
    env = smol_cli.env(SMOLGPT_CACHE_DIR=str(cache))
    args = lambda out: smol_cli.train_args("char", out, "--max_iters", "10")  # noqa: E731
    whole = smol_cli.run("train", *args(tmp_path / "whole"), env=env)
    assert whole.returncode == 0, whole.describe()
    (ids,) = cache.glob("tokens/*/tokens.bin")
    os.truncate(ids, ids.stat().st_size // 2)  # as a full disk or an interrupted copy leaves it
    rebuilt = smol_cli.run("train", *args(tmp_path / "rebuilt"), env=env)
    assert rebuilt.returncode == 0, rebuilt.describe()
    lines = rebuilt.stderr.replace(str(tmp_path), "").splitlines()  # "damaged" is in tmp_path
    warnings = [line for line in lines if "damaged" in line]
    assert len(warnings) == 1 and smol_cli.corpus.name in warnings[0], rebuilt.describe()
    assert "tokens.bin" in warnings[0], rebuilt.describe()  # the file found damaged
    strip = lambda row: {k: v for k, v in row.items() if k in ("iter", "train_loss", "val_loss")}  # noqa: E731
    assert [strip(r) for r in smol_cli.metrics(tmp_path / "rebuilt")] == [
        strip(r) for r in smol_cli.metrics(tmp_path / "whole")
    ]


# ------------------------------------------------------------------------------ disk full


def _limit_file_size(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_disk_full_while_saving_keeps_the_previous_checkpoint(smol_cli, smol_runs, tmp_path):
    out = smol_runs["char"].copy(tmp_path / "run")
    before = smol_cli.snapshot(out)
    size = (out / "latest_model.pth").stat().st_size
    # The tokens are cached already (the session run made them); only checkpoints are big.
    result = smol_cli.run(
        "train",
        *smol_cli.train_args("char", out, "--resume", "--max_iters", "40"),
        preexec_fn=_limit_file_size(size // 2),
    )
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], (
        result.describe()
    )
    assert str(out) in errors[0] and ".pth" in errors[0], errors[0]  # the file it could not write
    assert not _tmp_files(out), _tmp_files(out)
    after = smol_cli.snapshot(out)
    for name in ("latest_model.pth", "best_model.pth"):
        assert after[name] == before[name], f"{name} changed"
    checkpoint.load(out / "latest_model.pth")
    # And with room again, the run goes on from the intact checkpoint.
    resumed = smol_cli.run(
        "train", *smol_cli.train_args("char", out, "--resume", "--max_iters", "40")
    )
    assert resumed.returncode == 0, resumed.describe()
    assert [r["iter"] for r in smol_cli.metrics(out)] == [0, 10, 20, 30, 40]
