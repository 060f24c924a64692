"""Training on a CPU that other programs keep busy: smolgpt's threads against OpenMP's.

A laptop with a browser open, or a server running other jobs, gives a run only part of its
cores. This runs the same time-budgeted ``train.py`` on a quiet CPU and beside busy loops
(one per core: the run gets about half the CPU), in two ways:

- ``smolgpt``: as smolgpt runs, with compute threads that wait passively and a thread count
  chosen from a timed training pass;
- ``openmp-default``: the peer, what a PyTorch program gets without that care: torch
  imported before smolgpt (so OpenMP's own wait policy, threads spinning between
  operations) and every core computing (OMP_NUM_THREADS set to the core count).

It prints the steps each made in the budget (every round: the collapse of spinning threads
comes and goes), the training tokens/s, and the ratio busy/quiet: in proportion to the CPU
a run gets would be about 0.5.

    python benchmarks/busy_cpu.py                  # char nano, 20 s budgets, 3 rounds (~5 min)
    python benchmarks/busy_cpu.py --level word --budget 30
    python benchmarks/busy_cpu.py --budget 2 --rounds 1 --busy-loops 1 --extra "--n_layer 1"
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import common

# The peer's way to start train.py: torch loaded before smolgpt, as in a program that
# imported torch first; runpy then runs train.py as the script it is.
TORCH_FIRST = (
    "import sys, runpy, torch; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], "
    "run_name='__main__')"
)


WAYS = ("smolgpt", "openmp-default")


def busy_loops(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def one_run(way: str, busy: int, train_args: list[str], out_dir: Path) -> dict:
    """One train.py run the given way beside `busy` busy loops: steps, tokens/s, wall s."""
    cores = os.cpu_count() or 1
    env = dict(os.environ)
    python_args: list[str] = []
    if way == "openmp-default":
        python_args = ["-c", TORCH_FIRST]
        env.update(OMP_NUM_THREADS=str(cores), MKL_NUM_THREADS=str(cores))
        env.pop("OMP_WAIT_POLICY", None)
    loops = busy_loops(busy)
    try:
        run = common.run_train(train_args, out_dir, python_args=python_args, env=env)
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    if run.exit_code != 0:
        sys.exit(f"{way} run failed:\n{run.output[-2000:]}")
    training = [r for r in run.rows if r["iter"] > 0]
    tokens_per_s = sum(r["tokens_per_s"] for r in training) / len(training) if training else 0
    line = next((x for x in run.output.splitlines() if x.startswith("cpu: ")), "cpu: ?")
    threads = line.split("cpu: ", 1)[1].split(" ", 1)[0]
    if "other programs kept" in line:
        threads += " (timed)"
    return {
        "way": way,
        "busy_loops": busy,
        "steps": run.rows[-1]["iter"] if run.rows else 0,
        "tokens_per_s": round(tokens_per_s),
        "wall_s": round(run.wall_s, 1),
        "threads": threads,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--level", default="char")
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--budget", type=float, default=20.0, help="--time_budget of each run")
    parser.add_argument("--extra", default="", help="more train.py flags, as one string")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each kind")
    parser.add_argument(
        "--busy-loops", type=int, default=None, help="busy loops beside (default: one a core)"
    )
    parser.add_argument("--out", type=Path, default=common.OUT / "busy_cpu.json")
    args = parser.parse_args(argv)
    cores = args.busy_loops if args.busy_loops is not None else os.cpu_count() or 1
    train_args = [
        "--level", args.level, "--preset", args.preset, "--time_budget", str(args.budget),
        "--no-plot", *shlex.split(args.extra),
    ]  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(args.rounds):  # alternating, so that a noisy minute hits every way
            for way in common.rotated(WAYS, r):
                for busy in (0, cores):
                    out_dir = Path(scratch) / f"{way}-{busy}-{r}"
                    results.append({"round": r, **one_run(way, busy, train_args, out_dir)})
    common.print_machine()
    rows = []
    for way in WAYS:
        quiet = [r for r in results if r["way"] == way and r["busy_loops"] == 0]
        busy = [r for r in results if r["way"] == way and r["busy_loops"] == cores]
        for runs in (quiet, busy):
            steps = [r["steps"] for r in runs]
            ratio = statistics.median(steps) / max(statistics.median(r["steps"] for r in quiet), 1)
            rows.append(
                [way, runs[0]["busy_loops"], ", ".join(sorted({r["threads"] for r in runs})),
                 " / ".join(map(str, steps)), f"{min(steps)}",
                 f"{statistics.median(r['tokens_per_s'] for r in runs):,.0f}",
                 f"{ratio:.2f}" if runs is busy else ""]
            )  # fmt: skip
    print(
        common.markdown_table(
            [
                "way",
                "busy loops",
                "threads",
                "steps (each round)",
                "fewest",
                "train tokens/s (median)",
                "median steps busy/quiet",
            ],
            rows,
        )  # fmt: skip
    )
    common.print_command(__file__, argv)
    common.write_record(args.out, "busy_cpu", results=results, train_args=train_args)


if __name__ == "__main__":
    main()
