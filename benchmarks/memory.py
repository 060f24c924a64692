"""Peak memory and time of a training step, with and without gradient checkpointing.

For each shape (--shapes: a preset's n_layer, n_head and n_embd; default micro and tiny) and
context (--blocks, default 128 512 1024) at --batch sequences (default 8), a real smolgpt
``Trainer`` runs ``train_step`` (what ``train.py`` runs each step: forward in the precision
policy of this CPU, backward, clipping, AdamW) --steps times over random ids of a
88-character vocabulary, once with ``--gradient_checkpointing`` and once without, each in a
fresh subprocess, so that neither inherits the other's memory. Per run it reports:

- peak MB: on a CPU, the process's peak resident memory during the steps (rusage
  ru_maxrss) minus its resident memory just before the first step, when the model and the
  data are built (after two steps of a toy model, which page in torch's code): activations
  kept for the backward pass, gradients, AdamW's two moments (made in the first step) and
  temporaries. The measured processes run with MALLOC_MMAP_THRESHOLD_=65536 (unless the
  environment sets it), so that glibc hands every freed block of 64 KB or more back to the
  system at once: the peak then follows the tensors, to the megabyte from run to run.
  With glibc's default (--default-malloc) the peak also holds freed memory the allocator
  keeps for reuse, which is what a training process really holds, but it moves by 10-20%
  from run to run and from step to step. With --device cuda:
  torch.cuda.max_memory_allocated during the steps minus the memory allocated before the
  first.
- step s: the mean time of the steps after the first (which also makes AdamW's state).
  Handing memory back costs page faults: steps can be slower than train.py's. Times move
  with the machine's load (on a shared 2-core machine, a lot), so take them as rough.

The losses of the two runs are compared step by step: checkpointing must not change them.

    python benchmarks/memory.py                                   # micro, tiny x 128, 512, 1024
    python benchmarks/memory.py --shapes tiny small --blocks 256 --batch 16
    python benchmarks/memory.py --quick          # smoke: a toy model, context 64, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import common
from common import MB

VOCAB = 88  # Sherlock Holmes' characters
TOY = {"n_layer": 1, "n_head": 2, "n_embd": 32}  # --quick's shape


def shape_of(name: str) -> dict[str, int]:
    """n_layer, n_head and n_embd of a preset (or of "toy", --quick's one-layer model)."""
    from smolgpt.config import PRESETS

    if name == "toy":
        return TOY
    return {k: PRESETS[name][k] for k in ("n_layer", "n_head", "n_embd")}


def resident_bytes() -> int:
    """The process's resident memory now (Linux: /proc/self/statm); elsewhere its peak so
    far, the best rusage can tell."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_resident_bytes()


def peak_resident_bytes() -> int:
    """The process's peak resident memory so far (ru_maxrss: KB on Linux, bytes on macOS)."""
    import resource  # Unix only: imported here, so that --help answers anywhere

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def child(settings: dict, device: str, steps: int) -> None:
    """Runs in the measured subprocess: build a Trainer of settings on device, take steps
    training steps, print one JSON line of the memory they added and their time."""
    import gc

    import torch

    from smolgpt.config import TrainConfig
    from smolgpt.training import Trainer

    def trainer(run_dir: str, **changes):  # as common.cpu_trainer, on either device
        cfg = TrainConfig(device=device, **{**settings, **changes})
        return Trainer(cfg, common.random_token_data(VOCAB), Path(run_dir), torch.device(device))

    cuda = device == "cuda"
    with tempfile.TemporaryDirectory(prefix="smolgpt-memory-") as run_dir:
        # Two steps of a toy model first: on a CPU the first use of each op pages in its
        # code (megabytes of resident memory), which is not what is measured here. The toy's
        # own memory is a few hundred KB.
        warm = trainer(run_dir, **TOY, block_size=16, batch_size=2)
        for _ in range(2):
            warm.train_step()
        del warm
        gc.collect()
        measured = trainer(run_dir)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = resident_bytes()
        peak_before = peak_resident_bytes()  # building's own high-water mark
        times, losses = [], []
        for _ in range(steps):
            start = time.perf_counter()
            losses.append(float(measured.train_step()))  # float() waits for a GPU
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() if cuda else peak_resident_bytes()
    later = times[1:] or times
    print(
        json.dumps(
            {
                "peak_bytes": peak - before,
                "before_bytes": before,
                "peak_before_bytes": peak_before,
                "step_s": sum(later) / len(later),
                "step_times_s": times,
                "losses": losses,
            }
        )
    )


def measure(settings: dict, device: str, steps: int, env: dict) -> dict:
    """child() in a fresh Python process with environment env; its JSON line."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_child",
        json.dumps(settings),
        "--device",
        device,
        "--steps",
        str(steps),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"the measured step failed (exit {proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def label(shape: str) -> str:
    """ "micro (4L/4H/128)": a shape's name and size."""
    s = shape_of(shape)
    return f"{shape} ({s['n_layer']}L/{s['n_head']}H/{s['n_embd']})"


def markdown_table(results: list[dict]) -> str:
    head = [
        "shape",
        "context",
        "batch",
        "peak MB",
        "with checkpointing MB",
        "saved",
        "step s",
        "with checkpointing step s",
    ]
    rows = []
    for r in results:
        plain, ckpt = r["without"], r["with"]
        # A few megabytes (a toy) are lost among the process's own ups and downs.
        mb = [max(x["peak_bytes"], 0) / MB for x in (plain, ckpt)]
        saved = f"{1 - mb[1] / mb[0]:.0%}" if mb[0] >= 5 else "-"
        rows.append(
            [
                label(r["shape"]),
                r["block_size"],
                r["batch_size"],
                f"{mb[0]:,.0f}",
                f"{mb[1]:,.0f}",
                saved,
                f"{plain['step_s']:.2f}",
                f"{ckpt['step_s']:.2f}",
            ]
        )
    return common.markdown_table(head, rows)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Peak memory and time of a smolgpt training step with and without "
        "--gradient_checkpointing, each run in a fresh subprocess; prints a markdown table "
        "and writes JSON."
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["micro", "tiny"],
        choices=["nano", "micro", "tiny", "small", "toy"],
        metavar="PRESET",
        help="preset shapes (n_layer, n_head, n_embd) to run (default: micro "
        "tiny; toy: 1 layer, 2 heads, 32 wide)",
    )
    parser.add_argument(
        "--blocks",
        nargs="+",
        type=int,
        default=[128, 512, 1024],
        metavar="T",
        help="contexts (block_size) to run (default: 128 512 1024)",
    )
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (default: 8)")
    parser.add_argument(
        "--dropout",
        type=float,
        default=0.1,
        help="dropout (default: 0.1, smolgpt's default; its masks are activations too)",
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="steps per run; the first is not timed (default: 3)"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu: peak resident memory; cuda: peak allocated GPU memory",
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's MALLOC_MMAP_THRESHOLD_ as it is: the peak then "
        "includes freed memory glibc keeps, and moves from run to run",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: the toy shape, context 64, batch 2, 2 steps",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=common.OUT / "memory.json",
        help="JSON results file (default: benchmarks/out/memory.json)",
    )
    parser.add_argument("--_child", metavar="SETTINGS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        child(json.loads(args._child), args.device, args.steps)
        return 0
    if args.quick:
        args.shapes, args.blocks, args.batch, args.steps = ["toy"], [64], 2, 2

    env = dict(os.environ)
    if not args.default_malloc:  # blocks of 64 KB and more back to the system when freed
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    threshold = env.get("MALLOC_MMAP_THRESHOLD_")
    results = []
    for shape in args.shapes:
        for block in args.blocks:
            result = {"shape": shape, "block_size": block, "batch_size": args.batch}
            for variant in ("without", "with"):
                print(
                    f"measuring {label(shape)}, context {block}, batch {args.batch}, "
                    f"{variant} checkpointing ...",
                    file=sys.stderr,
                    flush=True,
                )
                settings = {
                    **shape_of(shape),
                    "block_size": block,
                    "batch_size": args.batch,
                    "dropout": args.dropout,
                    "gradient_checkpointing": variant == "with",
                }
                result[variant] = measure(settings, args.device, args.steps, env)
            results.append(result)

    common.print_machine()
    where = (
        "peak resident memory (rusage) during the steps minus that before the first, "
        + (f"MALLOC_MMAP_THRESHOLD_={threshold}" if threshold else "glibc's default malloc")
        if args.device == "cpu"
        else "torch.cuda.max_memory_allocated during the steps minus that before the first"
    )
    print(
        f"device {args.device}; vocabulary {VOCAB}, dropout {args.dropout:g}, AdamW; "
        f"{args.steps} steps per run, each run in a fresh process. peak MB (10^6 bytes): "
        f"{where}. step s: the mean of the steps after the first; times follow the machine's "
        "load.\n"
    )
    print(markdown_table(results))
    # The same seed, batches and dropout masks: checkpointing must not change the training.
    differ = max(
        abs(a - b) for r in results for a, b in zip(r["with"]["losses"], r["without"]["losses"])
    )
    print(
        f"\nLosses with and without checkpointing, step by step: largest difference {differ:.2g}.\n"
    )
    common.print_command(__file__, argv)
    common.write_record(
        args.out,
        "memory",
        settings={
            "shapes": args.shapes,
            "blocks": args.blocks,
            "batch": args.batch,
            "dropout": args.dropout,
            "steps": args.steps,
            "device": args.device,
            "vocab_size": VOCAB,
            "malloc_mmap_threshold": threshold,
        },
        results=results,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
