"""What the benchmark scripts share: the report every one prints and records, timing in
alternating rounds, real smolgpt Trainers over random token ids, whole ``train.py`` runs,
and corpora made by repeating a text.

The scripts run as ``python benchmarks/<name>.py``: Python puts the script's folder first on
the module path, so ``import common`` finds this file, and ``import smolgpt`` finds the
installed package. smolgpt (and torch with it) is imported inside the functions that need
it: importing this module costs nothing, and a script's ``--help`` answers at once.
"""

from __future__ import annotations

import functools
import json
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out"  # where the JSON records go by default (git-ignored)
SHARED_DATA = REPO.parent / "shared" / "data"  # reference corpora beside the repository
MB = 1_000_000  # the benchmarks' megabyte: 10^6 bytes


# ------------------------------------------------------------------------------ reports


def print_machine() -> None:
    """Print the line every table stands under: the CPU, its precision flags and smolgpt's
    precision policy for it (numbers from CPUs with and without native bf16 differ), then a
    blank line."""
    from smolgpt import hardware

    print(hardware.this_cpu()["line"] + "\n")


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table: the header, the separator, then one line per row of cells."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def print_command(script: str, argv: Optional[Sequence[str]]) -> None:
    """Print the command that made the report, to quote beside its table. script: the
    calling script's __file__; argv: its arguments (None: the process's own)."""
    args = sys.argv[1:] if argv is None else argv
    print(f"Command: python benchmarks/{Path(script).name} {shlex.join(args)}".rstrip())


def write_record(path: Path, benchmark: str, **fields: object) -> None:
    """Write the full results as JSON to path (folders created): the benchmark's name, the
    machine under "hardware" (``smolgpt.hardware.this_cpu()``), the Python version, then
    fields. Says where on stderr."""
    from smolgpt import hardware

    record = {
        "benchmark": benchmark,
        "hardware": hardware.this_cpu(),
        "python": platform.python_version(),
        **fields,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


# ------------------------------------------------------------------------------- timing


def time_steps(step: Callable[[], object], n: int) -> float:
    """Seconds that n calls of step take."""
    start = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - start


def rotated(items: Sequence, r: int) -> list:
    """items, starting from the r-th (modulo their number): rotating the order each round
    means none always runs first, on a cold machine, or last, on a hot one."""
    r %= len(items)
    return list(items[r:]) + list(items[:r])


def tokens_per_s_rounds(
    steps: dict[str, Callable[[], object]],
    n_steps: dict[str, int],
    tokens_per_step: int,
    rounds: int,
) -> dict[str, list[float]]:
    """Tokens/s of each step function, once per round: in each round every function takes
    n_steps[name] steps, in an order rotated from round to round. A shared 2-core machine has
    slow spells; they slow every function of a round alike, so compare within rounds
    (:func:`median_ratio`)."""
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        for name in rotated(list(steps), r):
            seconds = time_steps(steps[name], n_steps[name])
            rates[name].append(n_steps[name] * tokens_per_step / seconds)
    return rates


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """The median over rounds of a[i] / b[i]: each ratio compares two measurements made
    seconds apart, so it stands even when the machine's speed moved between rounds."""
    return statistics.median(x / y for x, y in zip(a, b))


# ---------------------------------------------------------------------- training steps


def random_token_data(vocab_size: int, level: str = "char", n_tokens: int = 200_000, seed: int = 0):
    """A smolgpt.tokendata.TokenData of uniformly random ids, in memory, with a real tokenizer of
    vocab_size at level: what a Trainer needs, without a corpus."""
    import numpy as np

    from smolgpt.tokendata import TokenData
    from smolgpt.tokenizer import CharTokenizer, WordTokenizer

    ids = np.random.default_rng(seed).integers(0, vocab_size, size=n_tokens).astype(np.uint16)
    if level == "char":
        tokenizer = CharTokenizer(chr(0x100 + i) for i in range(vocab_size))
    else:  # a word tokenizer adds <PAD> and <UNK> to its words
        tokenizer = WordTokenizer([f"w{i}" for i in range(vocab_size - 2)])
    assert tokenizer.vocab_size == vocab_size
    split = int(n_tokens * 0.9)
    return TokenData("random", ids[:split], ids[split:], tokenizer, fingerprint="benchmark-random")


@functools.cache
def _scratch_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="smolgpt-bench-")  # removed at exit


def trainer(data, device: str, **settings):
    """A real ``smolgpt.training.Trainer`` of ``TrainConfig(device=device, **settings)`` over
    data. Its ``train_step()`` is exactly what ``train.py`` runs each step (autocast by the
    device's precision policy, backward, clipping, the run's optimisers), so time that. Its
    run directory is an empty temporary one: steps write nothing there."""
    import torch

    from smolgpt.config import TrainConfig
    from smolgpt.training import Trainer

    cfg = TrainConfig(device=device, **settings)
    return Trainer(cfg, data, Path(_scratch_dir().name), torch.device(device))


def cpu_trainer(data, **settings):
    """:func:`trainer` on the CPU."""
    return trainer(data, "cpu", **settings)


# ---------------------------------------------------------------- whole training runs


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of a finished run's metrics.jsonl, oldest first ([] if it has none)."""
    from smolgpt.rundir import METRICS

    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class TrainRun:
    """A finished ``python train.py`` process."""

    command: list[str]
    out_dir: Path
    exit_code: int
    wall_s: float  # process start to exit: everything a user waits for
    rows: list[dict]  # metrics.jsonl; each row with "process_s", when it appeared
    output: str  # stdout and stderr, interleaved


def _rows_written(metrics: Path) -> int:
    return metrics.read_bytes().count(b"\n") if metrics.exists() else 0


def run_train(
    train_args: Sequence[str],
    out_dir: Path,
    poll_s: float = 0.25,
    python_args: Sequence[str] = (),
    env: Optional[dict] = None,
) -> TrainRun:
    """Run ``python *python_args train.py *train_args --out_dir out_dir`` from the
    repository root to its end (in env, None: this process's), timed with
    time.perf_counter. While it runs, its metrics.jsonl is polled every poll_s seconds, so
    each row's "process_s" is the second (since process start, to within poll_s) at which
    the row appeared."""
    from smolgpt.rundir import METRICS

    command = [sys.executable, *python_args, "train.py", *train_args, "--out_dir", str(out_dir)]
    metrics = Path(out_dir) / METRICS
    appeared: list[float] = []
    with tempfile.TemporaryFile("w+", errors="replace") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                try:
                    proc.wait(timeout=poll_s)  # returns as soon as the process ends
                    break
                except subprocess.TimeoutExpired:
                    now = time.perf_counter() - start
                    appeared += [now] * (_rows_written(metrics) - len(appeared))
        except BaseException:  # Ctrl-C here: do not leave train.py running
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - start
        log.seek(0)
        output = log.read()
    appeared += [wall] * (_rows_written(metrics) - len(appeared))  # rows of the last interval
    rows = read_metrics(out_dir)
    for row, seconds in zip(rows, appeared):
        row["process_s"] = round(seconds, 2)
    return TrainRun(command, Path(out_dir), proc.returncode, wall, rows, output)


def evaluate_checkpoint(checkpoint: Path, device: str = "cpu") -> dict:
    """``smolgpt eval CHECKPOINT --json --device DEVICE``: the loss over the run's whole
    validation split (every token after the first scored once), in its own process as a
    user runs it. Raises RuntimeError with its stderr if it fails."""
    result = subprocess.run(
        [sys.executable, "-m", "smolgpt", "eval", str(checkpoint), "--json", "--device", device],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if result.returncode != 0:
        raise RuntimeError(f"smolgpt eval {checkpoint} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)


# ------------------------------------------------------------------------------ corpora


def make_corpus(source: Path, mb: float, dest: Path) -> int:
    """Write source repeated to about mb megabytes (a blank line between copies, the last
    copy cut at a line break) to dest; return the bytes written."""
    text = source.read_bytes()
    target = max(int(mb * MB), 1)
    written = 0
    with open(dest, "wb") as f:
        while written < target:
            piece = (b"\n\n" if written else b"") + text
            last = written + len(piece) >= target
            if last:
                cut = piece.rfind(b"\n", 0, target - written) + 1
                piece = piece[:cut] if cut > 2 else b""
            f.write(piece)
            written += len(piece)
            if last:
                break
    return written


def import_transformers():
    """(transformers, None), or (None, why not) where it cannot be imported; quiet (no
    warnings, no "Loading weights" bars on stderr)."""
    try:
        import transformers
    except ImportError as exc:
        return None, str(exc)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers, None
