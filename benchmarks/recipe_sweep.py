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
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from time_to_loss import read_metrics  # the sibling script (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]

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


def run_variant(corpus: Path, common: str, variant: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="smolgpt-sweep-") as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "train.py", "--data", str(corpus), *shlex.split(common),
                   *shlex.split(variant), "--out_dir", str(out)]
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - start
        rows = read_metrics(out / "metrics.jsonl")
    last = rows[-1] if rows else {}
    return {
        "variant": variant,
        "exit_code": proc.returncode,
        "final_val": last.get("val_loss"),
        "best_val": last.get("best_val_loss"),
        "train_loss": last.get("train_loss"),
        "steps": last.get("iter"),
        "train_s": last.get("elapsed_s"),
        "wall_s": round(wall, 1),
        "error": proc.stderr[-1500:] if proc.returncode else "",
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", choices=SWEEPS, default="shakespeare-steps")
    parser.add_argument("--only", type=int, nargs="+", metavar="I",
                        help="run only these variants (0-based indices)")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data",
                        help="where the corpus files are (default: ../shared/data)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default: benchmarks/out/sweep-<name>.json)")
    args = parser.parse_args(argv)

    corpus_name, common, variants = SWEEPS[args.sweep]
    corpus = args.data_dir / corpus_name
    if not corpus.is_file():
        parser.error(f"{corpus} does not exist: pass --data-dir")
    chosen = [(i, v) for i, v in enumerate(variants) if args.only is None or i in args.only]
    results = []
    for i, variant in chosen:
        print(f"[{i}] {variant} ...", file=sys.stderr, flush=True)
        results.append(run_variant(corpus, common, variant))
        r = results[-1]
        print(f"    val {r['final_val']}, {r['steps']} steps, exit {r['exit_code']}",
              file=sys.stderr, flush=True)
        if r["exit_code"]:
            print(r["error"], file=sys.stderr)

    from smolgpt import hardware

    machine = hardware.this_cpu()
    print(f"{machine['line']}\n\n{corpus_name}, common flags: `{common}`\n")
    print("| # | flags | final val | best val | train loss | steps | training s |")
    print("|---|---|---|---|---|---|---|")
    for (i, _), r in zip(chosen, results):
        print(f"| {i} | `{r['variant']}` | {r['final_val']} | {r['best_val']} | "
              f"{r['train_loss']} | {r['steps']} | {r['train_s']} |")
    print(f"\nCommand: python benchmarks/recipe_sweep.py {' '.join(argv or sys.argv[1:])}".rstrip())
    out = args.out or REPO / "benchmarks" / "out" / f"sweep-{args.sweep}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"sweep": args.sweep, "hardware": machine, "corpus": corpus_name,
                               "common": common, "results": results}, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
