"""Distributed training on CPUs: real processes started by the real torchrun, talking over
Gloo on 127.0.0.1. Two processes match one process with twice the gradient accumulation;
runs resume across world sizes; two torchrun launches act as two nodes; a signal to one
rank stops them all at the same step; a rank killed outright takes the others down with an
error, not a hang."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

import smolgpt
from smolgpt import checkpoint

from e2e import E2E_ROOT, E2EProcess, E2EResult, e2e_wait_for, unused_port

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # what the torchrun command runs


def torchrun(smol_cli, logs: Path, launch: list, *train_args, **kwargs) -> E2EProcess:
    """torchrun LAUNCH train.py TRAIN_ARGS in the background, in smol_cli's environment."""
    args = [*TORCHRUN, *launch, str(E2E_ROOT / "train.py"), *map(str, train_args)]
    return E2EProcess(args, logs, env=smol_cli.env(), cwd=str(smol_cli.base), **kwargs)


def two_ranks(smol_cli, tmp_path: Path, name: str, *train_args) -> E2EProcess:
    return torchrun(
        smol_cli,
        tmp_path / "logs" / name,
        ["--standalone", "--nproc_per_node=2"],
        *smol_cli.train_args("char", tmp_path / name, *train_args),
    )


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_curves(a: list[dict], b: list[dict]) -> None:
    """The same evaluations, with losses equal but for the order of float sums (gradients
    averaged by an all-reduce instead of accumulated in one process, scores summed over
    ranks): 1e-4 is far below what one optimiser step changes."""
    assert [r["iter"] for r in a] == [r["iter"] for r in b]
    for key in ("train_loss", "val_loss", "val_bits_per_char"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], abs=1e-4), key


def assert_no_traceback_of_ours(stderr: str) -> None:
    """No traceback through smolgpt: when a rank exits non-zero (143 after SIGTERM, as one
    process would), torchrun prints its own traceback (ChildFailedError), not ours."""
    frames = [line for line in stderr.splitlines() if line.lstrip().startswith("File ")]
    assert not [f for f in frames if "smolgpt" in f or "train.py" in f], stderr


def assert_an_ordinary_two_rank_run(result: E2EResult, run_dir: Path, iters: int) -> None:
    """What a finished two-rank run printed and left: Muon (the nano preset's) kept the
    ranks' weights identical, one report by rank 0; one set of files, each written once; an
    ordinary checkpoint that one process loads and samples from."""
    reports = [line for line in result.stderr.splitlines() if "identical" in line]
    assert len(reports) == 1 and "2 ranks" in reports[0], result.describe()
    assert "global batch 16" in result.stderr and "2 ranks" in result.stderr, result.describe()
    assert result.stderr.count(f"done: {iters} iterations") == 1
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".lock",
        "best_model.pth",
        "config.json",
        "latest_model.pth",
        "metrics.jsonl",
    ]
    ckpt = checkpoint.load(run_dir / "latest_model.pth")
    assert ckpt.run_info["world_size"] == 2 and len(ckpt.rng["other_ranks"]["torch"]) == 1
    text = smolgpt.load(run_dir / "best_model.pth", "cpu").generate("The", max_new_tokens=20)
    assert text.startswith("The") and len(text) == 23


def workers(launcher: E2EProcess, count: int) -> dict[int, int]:
    """{rank: pid} of the training processes torchrun started, once all are up."""
    found: dict[int, int] = {}

    def look() -> bool:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                environ = (proc / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == launcher.pid:
                rank = next((e[5:] for e in environ if e.startswith(b"RANK=")), None)
                if rank is not None:
                    found[int(rank)] = int(proc.name)
        return len(found) == count

    e2e_wait_for(look, process=launcher, what="torchrun's workers")
    return found


def test_a_signal_to_one_rank_stops_all_and_the_run_resumes_at_any_world_size(smol_cli, tmp_path):
    steps = ("--max_iters", "200", "--eval_interval", "50")
    straight = two_ranks(smol_cli, tmp_path, "straight", *steps)
    stopped = two_ranks(smol_cli, tmp_path, "stopped", *steps)
    ranks = workers(stopped, 2)
    e2e_wait_for(
        lambda: (tmp_path / "stopped" / "latest_model.pth").exists(),
        process=stopped,
        what="the first checkpoint",
    )
    time.sleep(0.3)  # a few steps on
    os.kill(ranks[1], signal.SIGTERM)  # one rank only, not rank 0
    result = stopped.wait(120)
    assert result.returncode != 0, result.describe()
    assert "interrupted by SIGTERM" in result.stderr, result.describe()
    assert "Resume with: torchrun --standalone --nproc_per_node=2 " in result.stderr
    assert_no_traceback_of_ours(result.stderr)
    saved = checkpoint.load(tmp_path / "stopped" / "latest_model.pth").progress.iter
    assert 0 < saved < 200, saved
    again = tmp_path / "again"  # the stopped run as it is now, to resume in one process below
    shutil.copytree(tmp_path / "stopped", again)

    resumed = two_ranks(smol_cli, tmp_path, "stopped", *steps, "--resume").wait(240)
    assert resumed.returncode == 0, resumed.describe()
    done = straight.wait(240)
    assert done.returncode == 0, done.describe()
    assert_an_ordinary_two_rank_run(done, tmp_path / "straight", iters=200)
    # Every rank's RNG and the batch stream were saved: the resumed run is the straight one.
    assert_same_curves(rows(tmp_path / "stopped"), rows(tmp_path / "straight"))

    # And in one process with twice the accumulation, from the stopped run's checkpoint:
    # the same global batch from the same stream, so the same run again.
    single = smol_cli.run(
        "train",
        *smol_cli.train_args(
            "char", again, *steps, "--gradient_accumulation_steps", "2", "--resume"
        ),
    )
    assert single.returncode == 0, single.describe()
    # The setting a resume changed, from its old value to its new one.
    assert re.search(r"gradient_accumulation_steps\b.*\b1\b.*\b2\b", single.stderr), single.stderr
    assert_same_curves(rows(again), rows(tmp_path / "straight"))


def test_two_launches_on_one_machine_act_as_two_nodes(smol_cli, tmp_path):
    endpoint = f"127.0.0.1:{unused_port()}"
    launches = [
        torchrun(
            smol_cli,
            tmp_path / "logs" / f"node{n}",
            [
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={n}",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint={endpoint}",
                "--rdzv_id=smolgpt-test",
            ],
            # Rank 0's clock ends the run for both: --time_budget is agreed.
            *smol_cli.train_args(
                "char", tmp_path / "run", "--time_budget", "4", "--max_iters", "100000"
            ),
        )
        for n in (0, 1)
    ]
    results = [launch.wait(240) for launch in launches]
    for result in results:
        assert result.returncode == 0, result.describe()
    assert sum(r.stderr.count("done: ") for r in results) == 1
    assert "2 ranks (Gloo)" in "".join(r.stderr for r in results)
    last = rows(tmp_path / "run")[-1]
    assert last["iter"] > 0 and last["elapsed_s"] <= 12, last
    assert checkpoint.load(tmp_path / "run" / "latest_model.pth").progress.iter == last["iter"]


def test_a_rank_killed_outright_ends_the_run_without_a_hang(smol_cli, tmp_path):
    run = two_ranks(smol_cli, tmp_path, "run", "--max_iters", "100000", "--eval_interval", "50")
    ranks = workers(run, 2)
    e2e_wait_for(
        lambda: (tmp_path / "run" / "latest_model.pth").exists(),
        process=run,
        what="the first checkpoint",
    )
    os.kill(ranks[1], signal.SIGKILL)
    result = run.wait(120)  # the launcher notices and ends rank 0: within seconds
    assert result.returncode != 0, result.describe()
    assert result.seconds < 100, result.describe()
    # Rank 0 says why in one line, and what it saved before is intact.
    lines = result.stderr.splitlines()
    assert any(
        "error:" in line and "rank 0" in line and "lost contact" in line for line in lines
    ), result.describe()
    assert_no_traceback_of_ours(result.stderr)
    checkpoint.load(tmp_path / "run" / "latest_model.pth")


@pytest.mark.parametrize(
    "signum,to_group",
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["ctrl-c", "sigterm-to-torchrun"],
)
def test_a_signal_to_the_launch_stops_every_rank_at_one_step(smol_cli, tmp_path, signum, to_group):
    """SIGTERM to torchrun: it forwards it to every rank. A terminal's Ctrl-C sends SIGINT
    to torchrun and to every rank, and torchrun forwards it again: that repeat is not taken
    for a second Ctrl-C."""
    run = torchrun(
        smol_cli,
        tmp_path / "logs",
        ["--standalone", "--nproc_per_node=2"],
        *smol_cli.train_args(
            "char", tmp_path / "run", "--max_iters", "100000", "--eval_interval", "50"
        ),
        start_new_session=True,
    )  # its own process group, as a terminal gives
    workers(run, 2)
    e2e_wait_for(
        lambda: (tmp_path / "run" / "latest_model.pth").exists(),
        process=run,
        what="the first checkpoint",
    )
    time.sleep(0.3)
    if to_group:
        os.killpg(run.pid, signum)
    else:
        run.send_signal(signum)
    result = run.wait(120)
    name = signal.Signals(signum).name
    assert result.seconds < 100, result.describe()
    assert f"interrupted by {name}" in result.stderr, result.describe()
    assert "lost contact" not in result.stderr and "KeyboardInterrupt" not in result.stderr
    assert_no_traceback_of_ours(result.stderr)
    saved = checkpoint.load(tmp_path / "run" / "latest_model.pth").progress
    # The iteration it stopped at is the one it saved.
    stops = [line for line in result.stderr.splitlines() if f"interrupted by {name}" in line]
    assert any(re.search(rf"\b{saved.iter}\b", line) for line in stops), result.describe()


def test_one_process_under_torchrun_joins_a_group_of_one_and_a_plain_process_resumes(
    smol_cli, tmp_path
):
    """--nproc_per_node=1 takes the multi-process path (a process group, DDP, the ranks'
    checks), as on a machine with one GPU where it is the way to try a multi-GPU setup: it
    trains as a plain process does, and a plain process resumes its run."""
    steps = ("--max_iters", "60", "--eval_interval", "30")
    launched = torchrun(
        smol_cli,
        tmp_path / "logs",
        ["--standalone", "--nproc_per_node=1"],
        *smol_cli.train_args("char", tmp_path / "launched", *steps),
    ).wait(240)
    assert launched.returncode == 0, launched.describe()
    assert "distributed: 1 rank (Gloo); global batch" in launched.stderr, launched.describe()
    plain = smol_cli.run("train", *smol_cli.train_args("char", tmp_path / "plain", *steps))
    assert plain.returncode == 0, plain.describe()
    assert "distributed" not in plain.stderr
    assert_same_curves(rows(tmp_path / "launched"), rows(tmp_path / "plain"))

    more = ("--max_iters", "90", "--eval_interval", "30", "--resume")
    resumed = smol_cli.run("train", *smol_cli.train_args("char", tmp_path / "launched", *more))
    assert resumed.returncode == 0, resumed.describe()
    assert [r["iter"] for r in rows(tmp_path / "launched")] == [0, 30, 60, 90]
    ckpt = checkpoint.load(tmp_path / "launched" / "latest_model.pth")
    assert ckpt.progress.iter == 90 and ckpt.run_info["world_size"] == 1
