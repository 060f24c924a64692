"""The README's reference curves: each preset trained at character level on each corpus, for
the same number of steps, so that a user can hold their own val loss against them.

    python benchmarks/reference_curves.py --out runs/reference
    smolgpt plot runs/reference/shakespeare/* --out reference_shakespeare.png
    smolgpt plot runs/reference/sherlock/* --out reference_sherlock.png

Each run is an ordinary smolgpt run directory (<out>/<corpus>/<preset>); the table printed at
the end gives every run's best val loss and bits per character, its steps and training time,
and the hardware. tiny and small are GPU-sized: on a CPU, pass --presets nano micro.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import smolgpt  # noqa: E402
from smolgpt import hardware  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where the run directories go")
    parser.add_argument("--corpora", nargs="+", default=["shakespeare", "sherlock"],
                        help="--data of each run: built-in names or text files (default: "
                        "shakespeare sherlock)")
    parser.add_argument("--presets", nargs="+", default=["nano", "micro", "tiny", "small"])
    parser.add_argument("--max_iters", type=int, default=2000)
    parser.add_argument("--eval_interval", type=int, default=100)
    args = parser.parse_args()

    device = hardware.resolve_device("auto")
    print(json.dumps(hardware.describe_hardware(device, hardware.precision_policy(device, True))))
    table = ["| corpus | preset | steps | best val loss | best val bits/char | train time |",
             "|---|---|---:|---:|---:|---:|"]
    for corpus in args.corpora:
        name = Path(corpus).stem if Path(corpus).suffix else corpus
        for preset in args.presets:
            out_dir = Path(args.out) / name / preset
            start = time.perf_counter()
            result = smolgpt.train(data=corpus, level="char", preset=preset,
                                   max_iters=args.max_iters, eval_interval=args.eval_interval,
                                   early_stop_patience=0, plot=False, out_dir=str(out_dir),
                                   overwrite=(out_dir / "latest_model.pth").exists())
            rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
            bpc = min(r.get("val_bits_per_char", float("inf")) for r in rows)
            table.append(f"| {name} | {preset} | {result.iterations} | "
                         f"{result.best_val_loss:.4f} | {bpc:.3f} | "
                         f"{time.perf_counter() - start:.0f} s |")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
