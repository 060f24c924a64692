"""Recipe experiments: the same short training run under several sets of flags, side by side.

Each variant is one whole `python train.py ...` process with a fresh --out_dir; the table
shows its final and best val loss, the steps it made and its training time (from the run's
own metrics.jsonl). The named sweeps are the experiments behind the presets
(benchmarks/RESULTS.md):

- ``shakespeare-steps``: tiny Shakespeare, char micro, 200 steps of batch 16 x 128. A fixed
  number of steps, so the losses do not depend on how busy the machine was; it compares
  position encodings, optimisers and learning rates.
- ``sherlock-nano-60s`` / ``sherlock-nano-word-60s``: Sherlock Holmes, nano, 60 s budgets
  (time-budget runs: the step counts move with machine load).

    python benchmarks/recipe_sweep.py                              # shakespeare-steps
    python benchmarks/recipe_sweep.py --sweep sherlock-nano-60s
    python benchmarks/recipe_sweep.py --sweep shakespeare-steps --only 0 6
    python benchmarks/recipe_sweep.py --only 0 5 --data-dir DIR --extra "--max_iters 4 \\
        --eval_interval 4 --eval_iters 2 --n_layer 1 --n_head 2 --n_embd 32"   # toy size
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Optional

import common

# name -> (corpus file, flags common to every variant, variants)
SWEEPS: dict[str, tuple[str, str, list[str]]] = {
    "shakespeare-steps": (
        "tinyshakespeare.txt",
        "--level char --preset micro --max_iters 200 --warmup_iters 10 --batch_size 16 "
        "--dropout 0 --eval_interval 200",
        [
            "--optimizer adamw --position learned --learning_rate 2e-3",
            "--optimizer adamw --position learned --learning_rate 5e-3",
            "--optimizer adamw --position rope --learning_rate 2e-3",
            "--optimizer adamw --position rope --learning_rate 5e-3",
            "--optimizer muon --position learned --learning_rate 5e-2",
            "--optimizer muon --learning_rate 1e-2",
            "--optimizer muon --learning_rate 5e-2",
            "--optimizer muon --learning_rate 1e-1",
            "--optimizer muon --learning_rate 5e-2 --muon_lr 0.1",
        ],
    ),
    "sherlock-nano-60s": (
        "sherlock.txt",
        "--level char --preset nano --time_budget 60",
        [
            "--optimizer adamw --learning_rate 3e-3",
            "--optimizer muon --learning_rate 5e-2 --batch_size 16",
            "--optimizer muon --learning_rate 2e-2",
        ],
    ),
    "sherlock-nano-word-60s": (
        "sherlock.txt",
        "--level word --preset nano --time_budget 60 --eval_interval 100",
        [
            "--optimizer adamw --learning_rate 2e-3",
            "--optimizer muon --learning_rate 1e-2",
        ],
    ),
}


def run_variant(corpus: Path, common_flags: str, variant: str, extra: str) -> dict:
    """One whole train.py run of the variant in a fresh run directory; what its last
    metrics row says."""
    with tempfile.TemporaryDirectory(prefix="smolgpt-sweep-") as tmp:
        run = common.run_train(
            [
                "--data",
                str(corpus),
                *shlex.split(common_flags),
                *shlex.split(variant),
                *shlex.split(extra),
            ],
            Path(tmp) / "run",
        )
    last = run.rows[-1] if run.rows else {}
    return {
        "variant": variant,
        "exit_code": run.exit_code,
        "final_val": last.get("val_loss"),
        "best_val": last.get("best_val_loss"),
        "train_loss": last.get("train_loss"),
        "steps": last.get("iter"),
        "train_s": last.get("elapsed_s"),
        "wall_s": round(run.wall_s, 1),
        "error": run.output[-1500:] if run.exit_code else "",
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", choices=SWEEPS, default="shakespeare-steps")
    parser.add_argument(
        "--only", type=int, nargs="+", metavar="I", help="run only these variants (0-based indices)"
    )
    parser.add_argument(
        "--extra",
        default="",
        help="flags appended to every train.py command line, after the "
        'variant\'s (later flags win), e.g. "--seed 1"',
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=common.SHARED_DATA,
        help="where the corpus files are (default: ../shared/data)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON results (default: benchmarks/out/sweep-<name>.json)",
    )
    args = parser.parse_args(argv)

    corpus_name, common_flags, variants = SWEEPS[args.sweep]
    corpus = args.data_dir / corpus_name
    if not corpus.is_file():
        parser.error(f"{corpus} does not exist: pass --data-dir")
    chosen = [(i, v) for i, v in enumerate(variants) if args.only is None or i in args.only]
    results = []
    for i, variant in chosen:
        print(f"[{i}] {variant} ...", file=sys.stderr, flush=True)
        results.append(run_variant(corpus, common_flags, variant, args.extra))
        r = results[-1]
        print(
            f"    val {r['final_val']}, {r['steps']} steps, exit {r['exit_code']}",
            file=sys.stderr,
            flush=True,
        )
        if r["exit_code"]:
            print(r["error"], file=sys.stderr)

    common.print_machine()
    print(
        f"{corpus_name}, common flags: `{common_flags}`"
        + (f", then `{args.extra}`" if args.extra else "")
        + "\n"
    )
    print(
        common.markdown_table(
            ["#", "flags", "final val", "best val", "train loss", "steps", "training s"],
            [
                [
                    i,
                    f"`{r['variant']}`",
                    r["final_val"],
                    r["best_val"],
                    r["train_loss"],
                    r["steps"],
                    r["train_s"],
                ]
                for (i, _), r in zip(chosen, results)
            ],
        )
    )
    print()
    common.print_command(__file__, argv)
    common.write_record(
        args.out or common.OUT / f"sweep-{args.sweep}.json",
        "recipe_sweep",
        sweep=args.sweep,
        corpus=corpus_name,
        common=common_flags,
        extra=args.extra,
        results=results,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
