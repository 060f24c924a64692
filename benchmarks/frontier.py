"""Best validation loss against wall-clock budget on tiny Shakespeare (char level): smolgpt's
recipes against nanoGPT's CPU configuration trained by smolgpt with nanoGPT's settings.

For each configuration and each budget, one whole ``python train.py --time_budget B`` run
(a fresh process: its schedule is fitted to its own budget, so a shorter budget is not the
start of a longer run), then ``smolgpt eval`` of its best checkpoint over the whole
validation split (every character after the first scored once, in windows of the model's
own context: nanoGPT's block_size for its configuration). The table gives that loss (nats per
character) and the whole process's wall time, with the CPU it ran on; the plot draws loss
against budget for each configuration.

Configurations (``--configs``; the default is the first two):

- ``speedrun``: ``--preset speedrun``, smolgpt's recipe for this benchmark;
- ``nanogpt-cpu``: nanoGPT's documented CPU run ("baby GPT": 4 layers, 4 heads, 128 wide,
  context 64, batch 12, AdamW at 1e-3 with 100 warm-up steps and cosine decay, dropout 0,
  weight decay 0.1, beta2 0.99, learned positions, no biases, grad clip 1), run for a time
  budget instead of 2000 iterations;
- ``micro``: smolgpt's char micro preset as it is.

    python benchmarks/frontier.py                          # 30 ... 600 s, both: ~40 min
    python benchmarks/frontier.py --budgets 2 --configs speedrun --extra "--n_layer 1"  # smoke

``--replot RECORD ...`` trains nothing: it prints the table and draws the plot again from
JSON records earlier runs wrote (several at once: a run of one configuration, given its own
``--out``, joins the plot of a run of the others).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Optional

from common import (
    OUT,
    SHARED_DATA,
    evaluate_checkpoint,
    markdown_table,
    print_command,
    print_machine,
    run_train,
    write_record,
)

CONFIGS = {
    "speedrun": ["--preset", "speedrun"],
    "nanogpt-cpu": [
        "--n_layer",
        "4",
        "--n_head",
        "4",
        "--n_embd",
        "128",
        "--block_size",
        "64",
        "--batch_size",
        "12",
        "--optimizer",
        "adamw",
        "--learning_rate",
        "1e-3",
        "--warmup_iters",
        "100",
        "--lr_schedule",
        "cosine",
        "--dropout",
        "0",
        "--weight_decay",
        "0.1",
        "--beta2",
        "0.99",
        "--position",
        "learned",
        "--no-bias",
        "--grad_clip",
        "1.0",
    ],
    "micro": ["--preset", "micro"],
}
DEFAULT_CONFIGS = ("speedrun", "nanogpt-cpu")
BUDGETS = (30, 60, 150, 300, 600)
NANOGPT_GPU = 1.4697  # nanoGPT's shakespeare_char result on an A100 (6x384, 5000 iterations)


def plot(results: list[dict], path: Path, cpu: str) -> Optional[Path]:
    """Draw results (val loss against budget, a line a configuration) to path."""
    fig = figure(results, cpu)
    if fig is None:
        print("plot skipped: pip install matplotlib")
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def figure(results: list[dict], cpu: str):
    """The plot as a matplotlib Figure; None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for config in dict.fromkeys(r["config"] for r in results):
        rows = sorted((r for r in results if r["config"] == config), key=lambda r: r["budget_s"])
        ax.plot([r["budget_s"] for r in rows], [r["val_loss"] for r in rows], "o-", label=config)
    ax.axhline(
        NANOGPT_GPU,
        color="grey",
        linestyle="--",
        linewidth=1,
        label=f"nanoGPT on an A100, 5000 iterations ({NANOGPT_GPU})",
    )
    ax.set_xscale("log")
    budgets = sorted({r["budget_s"] for r in results})
    ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("--time_budget (s)")
    ax.set_ylabel("val loss (nats/char), whole split")
    ax.set_title(f"tiny Shakespeare, char level, on {cpu}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def recorded(records: list[Path]) -> tuple[list[dict], str]:
    """The results of frontier JSON records, in order (a configuration and budget a later
    record holds again replaces the earlier), and the CPU they ran on. Records of different
    CPUs are refused: their losses are not comparable in one plot."""
    results: dict[tuple, dict] = {}
    cpus = {}
    for path in records:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("benchmark") != "frontier":
            raise SystemExit(f"{path} is not a frontier.py record")
        cpus[path] = record["hardware"]["cpu"]
        for result in record["results"]:
            results[result["config"], result["budget_s"]] = result
    if len(set(cpus.values())) > 1:
        raise SystemExit(
            "the records come from different CPUs: "
            + "; ".join(f"{path}: {cpu}" for path, cpu in cpus.items())
        )
    return list(results.values()), next(iter(cpus.values()))


# The other columns of a result, and how each is printed; a record transcribed from a table
# may lack them ("-").
KEPT = (("logged_best_val", "{:.4f}"), ("iterations", "{}"), ("wall_s", "{:.1f}"))


def shown(result: dict, key: str, form: str) -> str:
    return form.format(result[key]) if key in result else "-"


def report(results: list[dict], cpu: str, plot_path: Path) -> None:
    """Print the table and the target, and draw the plot."""
    print(
        markdown_table(
            [
                "config",
                "--time_budget s",
                "val loss (whole split)",
                "best logged val",
                "iterations",
                "whole process s",
            ],
            [
                [
                    r["config"],
                    f"{r['budget_s']:g}",
                    f"{r['val_loss']:.4f}",
                    *(shown(r, key, form) for key, form in KEPT),
                ]
                for r in results
            ],
        )
    )
    print(f"\nTarget: nanoGPT's {NANOGPT_GPU} (6x384, 5000 iterations on an A100).")
    drawn = plot(results, plot_path, cpu)
    if drawn:
        print(f"Plot: {drawn}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=list(CONFIGS)
    )
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument(
        "--data",
        type=Path,
        default=SHARED_DATA / "tinyshakespeare.txt",
        help="the text (default: tiny Shakespeare beside the repository)",
    )
    parser.add_argument("--extra", default="", help="flags added to every run (smoke tests)")
    parser.add_argument("--out", type=Path, default=OUT / "frontier.json")
    parser.add_argument("--plot", type=Path, default=OUT / "frontier.png")
    parser.add_argument(
        "--replot",
        type=Path,
        nargs="+",
        metavar="RECORD",
        help="train nothing: print the table and draw --plot from these JSON records",
    )
    args = parser.parse_args(argv)
    if args.replot:
        missing = [str(path) for path in args.replot if not path.is_file()]
        if missing:
            parser.error(f"no such record: {', '.join(missing)}")
        report(*recorded(args.replot), args.plot)
        return 0
    if not args.data.is_file():
        parser.error(
            f"{args.data} not found: give --data (tiny Shakespeare: "
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
            "tinyshakespeare/input.txt)"
        )
    print_machine()
    from smolgpt import hardware

    results = []
    with tempfile.TemporaryDirectory() as folder:
        for config in args.configs:
            for budget in args.budgets:
                out_dir = Path(folder) / f"{config}-{budget:g}"
                flags = [
                    "--level",
                    "char",
                    "--data",
                    str(args.data),
                    *CONFIGS[config],
                    "--time_budget",
                    f"{budget:g}",
                    "--no-plot",
                    *shlex.split(args.extra),
                ]
                run = run_train(flags, out_dir)
                if run.exit_code != 0:
                    raise RuntimeError(f"{run.command} failed:\n{run.output[-3000:]}")
                scored = evaluate_checkpoint(out_dir / "best_model.pth")
                best_logged = min(r["val_loss"] for r in run.rows)
                results.append(
                    {
                        "config": config,
                        "budget_s": budget,
                        "wall_s": run.wall_s,
                        "val_loss": scored["loss"],
                        "logged_best_val": best_logged,
                        "iterations": run.rows[-1]["iter"],
                        "flags": flags,
                    }
                )
                print(
                    f"{config} {budget:g} s: val {scored['loss']:.4f} (whole split), "
                    f"{run.wall_s:.1f} s in all",
                    file=sys.stderr,
                    flush=True,
                )
    report(results, hardware.this_cpu()["cpu"], args.plot)
    print_command(__file__, argv)
    write_record(args.out, "frontier", results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
