"""Time to a target validation loss: the wall time of the whole `python train.py ...` process.

Each scenario runs train.py in a subprocess with a fresh temporary --out_dir and measures
start to finish with time.perf_counter (interpreter start, imports, data loading, training,
evaluations, checkpoints: everything a user waits for). Afterwards it reads the run's
metrics.jsonl for the best and last val loss and the training time (``elapsed_s``) of the
first evaluation at or below the target.

The token cache is the user's own (SMOLGPT_CACHE_DIR or ~/.cache/smolgpt), as in everyday
use; before the timed runs, each corpus/level is prepared once untimed, so the timing
excludes first-time tokenization (a steady-state run, not a first run).

    python benchmarks/time_to_loss.py                                  # all scenarios
    python benchmarks/time_to_loss.py --scenario shakespeare-char-micro-20s
    python benchmarks/time_to_loss.py --scenario sherlock-char-micro-200s \\
        --extra "--learning_rate 1e-3"
    python benchmarks/time_to_loss.py --quick                          # 5 s smoke test
    python benchmarks/time_to_loss.py --scenario shakespeare-char-micro-20s --data-dir DIR \\
        --extra "--time_budget 1 --n_layer 1 --n_embd 32 --n_head 2 --eval_iters 2"  # toy size
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import common


@dataclass(frozen=True)
class Scenario:
    name: str
    corpus: str  # a file name under --data-dir
    flags: tuple[str, ...]
    target: float  # val loss to reach
    max_wall_s: Optional[float] = None  # the whole process must also finish within this
    max_overfit: Optional[float] = None  # last val loss - best val loss must not exceed this
    source: str = ""


SCENARIOS = (
    Scenario(
        "shakespeare-char-micro-20s",
        "tinyshakespeare.txt",
        ("--level", "char", "--preset", "micro", "--time_budget", "20"),
        target=1.886,
        max_wall_s=25.0,
        source="nanoGPT's CPU baby GPT: val 1.8857 in 64 s of wall time here",
    ),
    Scenario(
        "sherlock-char-micro-200s",
        "sherlock.txt",
        ("--level", "char", "--preset", "micro", "--time_budget", "200"),
        target=1.3679,
        source="original smolgpt char micro: best val 1.3679 (T4, 197 s)",
    ),
    Scenario(
        "sherlock-word-micro-120s",
        "sherlock.txt",
        ("--level", "word", "--preset", "micro", "--time_budget", "120"),
        target=4.38,
        max_overfit=0.1,
        source="original smolgpt word micro: best val 4.3806, final 5.2630 (overfit)",
    ),
)
QUICK_FLAGS = ("--time_budget", "5", "--eval_iters", "10")


def train_args(s: Scenario, data_dir: Path, extra: list[str]) -> list[str]:
    return ["--data", str(data_dir / s.corpus), *s.flags, *extra]


def warm_token_cache(args: list[str]) -> str:
    """Prepare the run's corpus at its level once (untimed), through the user's cache, using
    the same flag parsing as train.py so --extra flags such as --min_word_freq count."""
    from smolgpt import sources, tokencache
    from smolgpt.cli import build_parser
    from smolgpt.config import resolve_train_config
    from smolgpt.files import cache_dir

    explicit = vars(build_parser().parse_args(["train", *args]))
    explicit.pop("command")
    cfg = resolve_train_config(explicit)
    start = time.perf_counter()
    tokencache.prepare(sources.resolve_corpus(cfg.data), cfg.level, cfg.min_word_freq)
    seconds = time.perf_counter() - start
    return f"{cfg.level} {Path(cfg.data).name}: ready in {seconds:.2f}s ({cache_dir()})"


def run_scenario(
    s: Scenario, data_dir: Path, extra: list[str], keep_logs: Optional[Path], repeat: int = 1
) -> dict:
    """Run one scenario's train.py in a fresh run directory; its results and checks."""
    with tempfile.TemporaryDirectory(prefix=f"smolgpt-ttl-{s.name}-") as tmp:
        run = common.run_train(train_args(s, data_dir, extra), Path(tmp) / "run")
    if keep_logs is not None:
        keep_logs.mkdir(parents=True, exist_ok=True)
        (keep_logs / f"{s.name}-{repeat}.log").write_text(run.output)
    rows = run.rows
    vals = [r["val_loss"] for r in rows]
    best = min(vals) if vals else None
    last = vals[-1] if vals else None
    first_hit = next((r for r in rows if r["val_loss"] <= s.target), None)
    met = first_hit is not None
    checks = {"target": met}
    if s.max_wall_s is not None:
        checks["wall"] = run.wall_s <= s.max_wall_s
    if s.max_overfit is not None:
        checks["overfit"] = last is not None and last - best <= s.max_overfit
    return {
        "scenario": s.name,
        "source": s.source,
        "command": shlex.join(["python", *run.command[1:]]),
        "exit_code": run.exit_code,
        "target_val_loss": s.target,
        "max_wall_s": s.max_wall_s,
        "max_overfit": s.max_overfit,
        "wall_s": round(run.wall_s, 2),
        "best_val_loss": best,
        "last_val_loss": last,
        "target_met": met,
        # metrics.jsonl's own clock (the training loop's elapsed_s) at the first row at or
        # below the target, and this script's clock (since process start) when it appeared.
        "elapsed_s_at_target": first_hit["elapsed_s"] if met else None,
        "process_s_at_target": first_hit["process_s"] if met else None,
        "iter_at_target": first_hit["iter"] if met else None,
        "final_iter": rows[-1]["iter"] if rows else None,
        "final_elapsed_s": rows[-1]["elapsed_s"] if rows else None,
        "tokens_per_s_last_window": rows[-1]["tokens_per_s"] if rows else None,
        "checks": checks,
        "passed": run.exit_code == 0 and all(checks.values()),
        "metrics": rows,
        "log_tail": run.output[-2000:] if run.exit_code else "",
    }


def fmt(x, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(results: list[dict]) -> str:
    head = [
        "scenario",
        "target val",
        "best val",
        "last val",
        "target met",
        "elapsed_s at target",
        "process s at target",
        "iter at target",
        "wall s (whole process)",
        "other checks",
        "pass",
    ]
    rows = []
    for r in results:
        other = []
        if r["max_wall_s"] is not None:
            other.append(f"wall ≤ {r['max_wall_s']:g}s: {'yes' if r['checks']['wall'] else 'NO'}")
        if r["max_overfit"] is not None:
            other.append(
                f"last − best ≤ {r['max_overfit']:g}: {'yes' if r['checks']['overfit'] else 'NO'}"
            )
        if r["exit_code"]:
            other.append(f"exit code {r['exit_code']}")
        rows.append(
            [
                r["scenario"],
                fmt(r["target_val_loss"]),
                fmt(r["best_val_loss"]),
                fmt(r["last_val_loss"]),
                "yes" if r["target_met"] else "no",
                fmt(r["elapsed_s_at_target"], ".1f"),
                fmt(r["process_s_at_target"], ".1f"),
                fmt(r["iter_at_target"], "d"),
                fmt(r["wall_s"], ".1f"),
                "; ".join(other) or "-",
                "PASS" if r["passed"] else "FAIL",
            ]
        )
    return common.markdown_table(head, rows)


def main(argv: Optional[list[str]] = None) -> int:
    names = [s.name for s in SCENARIOS]
    parser = argparse.ArgumentParser(
        description="Wall time of the whole `python train.py ...` process to reach a target "
        "val loss; prints a markdown table and writes JSON."
    )
    parser.add_argument(
        "--scenario",
        nargs="+",
        choices=names + ["all"],
        default=["all"],
        help="scenarios to run (default: all)",
    )
    parser.add_argument(
        "--extra",
        default="",
        help="flags appended to every train.py command line, e.g. "
        '"--learning_rate 1e-3 --dropout 0" (later flags win)',
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: append --time_budget 5 --eval_iters 10 (the targets will not be met)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="run each scenario this many times (default: 1)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=common.SHARED_DATA,
        help="directory holding tinyshakespeare.txt and sherlock.txt "
        "(default: ../shared/data from the repository root)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=common.OUT / "time_to_loss.json",
        help="JSON results file (default: benchmarks/out/time_to_loss.json)",
    )
    parser.add_argument(
        "--logs", type=Path, default=None, help="keep each run's train.py output in this directory"
    )
    args = parser.parse_args(argv)

    chosen = [s for s in SCENARIOS if "all" in args.scenario or s.name in args.scenario]
    extra = shlex.split(args.extra) + (list(QUICK_FLAGS) if args.quick else [])
    for s in chosen:
        path = args.data_dir / s.corpus
        if not path.is_file():
            parser.error(f"{path} not found: point --data-dir at the folder with {s.corpus}")

    print(
        "Untimed warm-up: preparing each corpus/level once, so the timed runs exclude "
        "first-time tokenization (the user's token cache is kept).",
        file=sys.stderr,
    )
    warmed = set()
    for s in chosen:
        targs = train_args(s, args.data_dir, extra)
        key = tuple(targs)
        if key not in warmed:
            warmed.add(key)
            print("  " + warm_token_cache(targs), file=sys.stderr, flush=True)

    results = []
    for rep in range(args.repeats):
        for s in chosen:
            print(
                f"running {s.name}{f' (repeat {rep + 1})' if args.repeats > 1 else ''} ...",
                file=sys.stderr,
                flush=True,
            )
            r = run_scenario(s, args.data_dir, extra, args.logs, rep + 1)
            r["repeat"] = rep + 1
            results.append(r)
            print(
                f"  wall {r['wall_s']:.1f}s, best val {fmt(r['best_val_loss'])}, "
                f"exit {r['exit_code']}",
                file=sys.stderr,
                flush=True,
            )
            if r["exit_code"]:
                print(r["log_tail"], file=sys.stderr)

    common.print_machine()
    print(markdown_table(results))
    print()
    print(
        "Wall time is the whole `python train.py` process (start to exit). At the first "
        'evaluation at or below the target: "elapsed_s" is metrics.jsonl\'s own field '
        '(the training loop\'s clock), "process s" is when that row appeared in '
        "metrics.jsonl, counted from process start (polled every 0.25 s). Token caches "
        "were warmed untimed first, so first-time tokenization is excluded."
    )
    if extra:
        print(f"Extra flags: {shlex.join(extra)}")
    common.print_command(__file__, argv)
    common.write_record(
        args.out,
        "time_to_loss",
        settings={
            "scenarios": [s.name for s in chosen],
            "extra": extra,
            "repeats": args.repeats,
            "data_dir": str(args.data_dir),
        },
        scenarios=[asdict(s) for s in chosen],
        results=results,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
