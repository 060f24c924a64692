"""The reference curves of the evaluation guide (docs/guides/evaluation.md): each preset
trained at character level on each corpus for the same number of steps, with its own
recipe, so that a user can hold their val loss against them ("is my loss normal?").

    python benchmarks/reference_curves.py --out-runs runs/reference      # ~8 min on a GPU
    smolgpt plot runs/reference/sherlock/{nano,micro,tiny,small} --ylim 1.2 2.4 \\
        --out docs/reference_sherlock.png        # and the same for shakespeare
    python benchmarks/reference_curves.py --presets nano --max_iters 4 --eval_interval 2 \\
        --extra "--n_layer 1 --n_embd 32 --n_head 2 --block_size 32 --batch_size 4"  # smoke

Every run is an ordinary run directory (<out-runs>/<corpus>/<preset>) made by smolgpt.train;
the table gives each run's best val loss and val bits per character, its steps and its
wall time. tiny and small are GPU-sized: on a CPU, pass --presets nano micro.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from common import markdown_table, print_command, print_machine, write_record

import smolgpt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out-runs",
        default="runs/reference",
        help="where the run directories go (default: runs/reference)",
    )
    parser.add_argument(
        "--corpora",
        nargs="+",
        default=["shakespeare", "sherlock"],
        help="--data of each run: built-in names or text files (default: "
        "shakespeare sherlock); a file's runs are named after its stem",
    )
    parser.add_argument("--presets", nargs="+", default=["nano", "micro", "tiny", "small"])
    parser.add_argument("--max_iters", type=int, default=2000)
    parser.add_argument("--eval_interval", type=int, default=100)
    parser.add_argument("--extra", default="", help="more train settings, as flags")
    parser.add_argument(
        "--out", default="benchmarks/out/reference_curves.json", help="the JSON record"
    )
    args = parser.parse_args(argv)
    extra = parse_extra(args.extra)

    print_machine()
    results, rows = [], []
    for corpus in args.corpora:
        name = Path(corpus).stem if Path(corpus).suffix else corpus
        for preset in args.presets:
            out_dir = Path(args.out_runs) / name / preset
            start = time.perf_counter()
            result = smolgpt.train(
                data=corpus,
                level="char",
                preset=preset,
                max_iters=args.max_iters,
                eval_interval=args.eval_interval,
                early_stop_patience=0,
                plot=False,
                out_dir=str(out_dir),
                overwrite=(out_dir / "latest_model.pth").exists(),
                **extra,
            )
            seconds = time.perf_counter() - start
            metrics = [
                json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()
            ]
            bpc = min(r["val_bits_per_char"] for r in metrics)
            results.append(
                {
                    "corpus": name,
                    "preset": preset,
                    "steps": result.iterations,
                    "best_val_loss": result.best_val_loss,
                    "best_val_bits_per_char": bpc,
                    "seconds": seconds,
                    "run_dir": str(out_dir),
                    "metrics": metrics,
                }
            )
            rows.append(
                [
                    name,
                    preset,
                    result.iterations,
                    f"{result.best_val_loss:.4f}",
                    f"{bpc:.3f}",
                    f"{seconds:.0f} s",
                ]
            )
    print(
        markdown_table(
            ["corpus", "preset", "steps", "best val loss", "best val bits/char", "wall time"], rows
        )
    )
    print()
    print_command(__file__, argv)
    write_record(Path(args.out), "reference_curves", results=results)
    return 0


def parse_extra(text: str) -> dict:
    """--extra "--n_layer 1 --amp ..." as train settings (numbers as numbers; a lone flag
    is True)."""
    words, settings = shlex.split(text), {}
    while words:
        key = words.pop(0).removeprefix("--")
        if not words or words[0].startswith("--"):
            settings[key] = True
            continue
        value = words.pop(0)
        for kind in (int, float):
            try:
                value = kind(value)
                break
            except ValueError:
                pass
        settings[key] = value
    return settings


if __name__ == "__main__":
    sys.exit(main())
