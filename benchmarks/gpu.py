"""On a GPU, side by side with nanoGPT: what a lent GPU's short time is for, in one script.

Every part prints its table and adds its results to the JSON record as soon as it ends, so a
run cut short keeps what it measured; ``--deadline`` skips the parts that would start after
it (a second call runs them with ``--parts``). Parts (``--parts``; all, in this order):

- ``nanogpt``: time to nanoGPT's 1.4697 on tiny Shakespeare, char level. nanoGPT's own
  configuration for it, from its published config/train_shakespeare_char.py and its
  train.py defaults (6 layers x 6 heads x 384, context 256, batch 64, dropout 0.2, AdamW at
  1e-3, 100 warm-up steps, cosine decay to 1e-4 over 5,000 iterations, beta2 0.99, weight
  decay 0.1, clipping at 1, learned positions, no biases, 200 batches of evaluation every
  250 iterations, bf16 autocast, torch.compile), trained by smolgpt's ``train.py`` with those
  settings; its whole process timed (W). Then each of smolgpt's recipes (``--recipe``;
  ``--preset speedrun`` by default) with a ``--time_budget`` that keeps its whole process
  inside W / 2. Every best checkpoint is scored by ``smolgpt eval`` over the whole
  validation split. The goal: 1.4697 or lower in under half of W.
- ``fp16``: the micro preset at char level for ``--fp16-steps`` steps, on this GPU's own
  policy (two seeds: their difference is the noise) and on a T4's (``SMOLGPT_CUDA_CAPABILITY
  =7.5``: fp16 autocast with a gradient scaler, Muon's iteration in float32); the losses side
  by side, and the steps skipped for overflow after the warm-up, read from the scaler's
  factor in the metrics rows (``loss_scale``, which halves at every skipped step).
- ``torchrun``: ``torchrun --standalone --nproc_per_node=1 train.py ...`` (one process in a
  process group: NCCL on a GPU), then the same run resumed by a plain process on the CPU.
- ``throughput``: GPT-2 small's shape (the small preset: 12 x 768, context 1024, GPT-2's
  50,257-token vocabulary), random ids, bf16 autocast: tokens/s and MFU of smolgpt's training
  step (a real Trainer's ``train_step``) with and without torch.compile, against transformers'
  ``GPT2LMHeadModel`` in the plain AdamW loop a user writes, with and without torch.compile,
  in the same process. MFU is the model's FLOPs (``GPT.estimate_flops_per_token``, the same
  count for both) over the bf16 matmul peak measured on this GPU (``hardware.peak_flops``).
- ``vocab``: ``benchmarks/levels.py``'s bpe sweep at the tiny and small presets (bits per
  character on the held-out end of Sherlock Holmes after the same ``--vocab-budget``), to
  choose those presets' vocab_size.

--data names a folder with the two corpora: tinyshakespeare.txt (char-rnn's tiny
Shakespeare, the input.txt nanoGPT's data/shakespeare_char/prepare.py downloads) and
sherlock.txt (Project Gutenberg's The Adventures of Sherlock Holmes). A part that fails is
recorded with its error and the next one starts; the exit status is then 1.

    python benchmarks/gpu.py --data DIR                       # every part, minutes each on a GPU
    python benchmarks/gpu.py --data DIR --deadline 420        # the parts that start within 7 min
    python benchmarks/gpu.py --data DIR --parts fp16 torchrun
    PYTHONPATH=src python benchmarks/gpu.py --data DIR        # from a checkout, not installed
    python benchmarks/gpu.py --toy --device cpu --data DIR    # every part at toy size: a test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import common
import throughput


class PartFailed(RuntimeError):
    """A command a part runs failed; the message carries the end of its output."""


# The cheap checks of correctness (fp16, torchrun) before the measurements that compile.
PARTS = ("nanogpt", "fp16", "torchrun", "throughput", "vocab")
NANOGPT_RESULT = 1.4697  # nanoGPT's best val loss with this configuration (an A100, 5,000 iters)
# nanoGPT's config/train_shakespeare_char.py (and the train.py defaults it keeps), as
# smolgpt's flags.
NANOGPT_SHAKESPEARE_CHAR = (
    "--n_layer 6 --n_head 6 --n_embd 384 --block_size 256 --batch_size 64 --dropout 0.2 "
    "--optimizer adamw --learning_rate 1e-3 --min_lr 1e-4 --warmup_iters 100 "
    "--lr_schedule cosine --max_iters 5000 --beta2 0.99 --weight_decay 0.1 --grad_clip 1.0 "
    "--position learned --no-bias --eval_interval 250 --eval_iters 200 --compile"
).split()
# The same run at toy size (--toy): 20 steps of a one-layer model, no compilation.
NANOGPT_TOY = (
    "--n_layer 1 --n_head 2 --n_embd 32 --block_size 32 --batch_size 4 --dropout 0.2 "
    "--optimizer adamw --learning_rate 1e-3 --min_lr 1e-4 --warmup_iters 2 "
    "--lr_schedule cosine --max_iters 20 --beta2 0.99 --weight_decay 0.1 --grad_clip 1.0 "
    "--position learned --no-bias --eval_interval 10 --eval_iters 2"
).split()
TOY_MODEL = "--n_layer 1 --n_head 2 --n_embd 32 --block_size 32 --batch_size 4 --eval_iters 2"
GPT2_VOCAB = 50257
T4_ENV = "SMOLGPT_CUDA_CAPABILITY"  # =7.5: a T4's precision policy on any GPU


def train(
    args,
    flags: list[str],
    out_dir: Path,
    env: Optional[dict] = None,
    python_args=(),
    device: Optional[str] = None,
):
    """A whole train.py process on the corpus at char level, on device (None: args.device);
    raises PartFailed with its output if it fails."""
    run = common.run_train(
        [
            "--level",
            "char",
            "--data",
            str(args.data / "tinyshakespeare.txt"),
            "--device",
            device or args.device,
            "--no-plot",
            *flags,
        ],
        out_dir,
        env=env,
        python_args=python_args,
    )
    if run.exit_code:
        raise PartFailed(f"{shlex.join(run.command)} failed:\n{run.output[-3000:]}")
    return run


# ----------------------------------------------------------------------------- nanogpt


def part_nanogpt(args, folder: Path) -> dict:
    nanogpt_flags = NANOGPT_TOY if args.toy else NANOGPT_SHAKESPEARE_CHAR
    print("  nanoGPT's configuration ...", file=sys.stderr, flush=True)
    name = "nanoGPT's configuration"
    try:
        peer = train(args, list(nanogpt_flags), folder / "nanogpt")
    except PartFailed as exc:
        if "--compile" not in nanogpt_flags:
            raise
        # Rather than lose the part: the same run without compilation, marked as such.
        print(f"with --compile it failed, so again without: {exc}", file=sys.stderr)
        nanogpt_flags = [f for f in nanogpt_flags if f != "--compile"]
        name += " without torch.compile (failed with it)"
        peer = train(args, nanogpt_flags, folder / "nanogpt-eager")
    rows = [summary(name, nanogpt_flags, peer, args)]
    # A process's start-up (imports, CUDA, the token cache) and final save lie outside its
    # --time_budget: about 10 s are kept for them.
    budget = max(1.0, 0.45 * peer.wall_s - 8.0)
    for i, recipe in enumerate(args.recipe):
        flags = [*shlex.split(recipe), "--time_budget", f"{budget:.0f}"]
        if args.toy:
            flags += TOY_MODEL.split()
        print(f"  smolgpt {recipe} ...", file=sys.stderr, flush=True)
        try:  # a recipe that fails loses its own row, not the peer's measurement
            ours = train(args, flags, folder / f"ours{i}")
            rows.append(summary(f"smolgpt {recipe}", flags, ours, args))
        except RuntimeError as exc:  # PartFailed, or smolgpt eval's failure
            rows.append({"name": f"smolgpt {recipe}", "flags": flags, "error": str(exc)})
            print(f"smolgpt {recipe} failed: {exc}")
    half = peer.wall_s / 2
    for row in rows[1:]:
        if "error" not in row:
            row["within_half"] = row["wall_s"] < half
            row["reached"] = row["val_loss"] <= NANOGPT_RESULT
    print(
        common.markdown_table(
            ["run", "steps", "wall s", "whole-split val loss", "bits/char"],
            [
                [r["name"], "failed", "-", "-", "-"]
                if "error" in r
                else [r["name"], f"{r['steps']:,}", f"{r['wall_s']:.1f}", f"{r['val_loss']:.4f}"]
                + [f"{r['bits_per_char']:.4f}"]
                for r in rows
            ],
        )
    )
    print(f"\nGoal: val loss <= {NANOGPT_RESULT} within half of nanoGPT's wall time, {half:.1f} s.")
    return {"runs": rows, "half_of_nanogpt_s": half, "budget_s": budget}


def summary(name: str, flags, run: common.TrainRun, args) -> dict:
    """What a finished run did and how its best checkpoint scores over the whole
    validation split."""
    score = common.evaluate_checkpoint(run.out_dir / "best_model.pth", args.device)
    return {
        "name": name,
        "flags": list(flags),
        "wall_s": run.wall_s,
        "steps": run.rows[-1]["iter"],
        "best_val_loss_estimate": min(r["val_loss"] for r in run.rows),
        "val_loss": score["loss"],
        "bits_per_char": score["bits_per_char"],
    }


# -------------------------------------------------------------------------- throughput


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(step: Callable[[], object], device, tokens_per_step: int, warmup: int, steps: int):
    """(tokens/s over steps timed steps, seconds of the first step): the first step
    compiles where compilation is on; warmup steps in all go before the timing."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    first_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * tokens_per_step / (time.perf_counter() - start), first_s


def part_throughput(args, folder: Path) -> dict:
    import torch

    from smolgpt import hardware
    from smolgpt.config import PRESETS

    device = torch.device(args.device)
    if args.toy:
        config = throughput.BenchConfig("toy", 1, 2, 32, 32, 4, 65, "char", 0.0)
        warmup, steps = 2, 3
    else:
        small = PRESETS["small"]
        config = throughput.BenchConfig(
            "small", small["n_layer"], small["n_head"], small["n_embd"], 1024, args.batch,
            GPT2_VOCAB, "char", 0.0,
        )  # fmt: skip
        warmup, steps = 5, 20
    tokens_per_step = config.block_size * config.batch_size
    data = common.random_token_data(config.vocab_size, n_tokens=50 * tokens_per_step)
    transformers, why = common.import_transformers()
    compiles = (False,) if args.no_compile else (False, True)
    rows, flops = [], None
    for compiled in compiles:
        step, trainer = throughput.smolgpt_step(config, data, args.device, compile=compiled)
        policy, flops = trainer.precision, trainer.model.estimate_flops_per_token()
        tok_s, first = rate(step, device, tokens_per_step, warmup, steps)
        rows.append(("smolgpt", compiled, tok_s, first))
        del step, trainer
        if transformers is not None:
            step, _ = throughput.transformers_step(config, data, True, args.device, compiled)
            tok_s, first = rate(step, device, tokens_per_step, warmup, steps)
            rows.append(("transformers GPT2LMHeadModel", compiled, tok_s, first))
            del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    peak = hardware.peak_flops(device, policy)
    results = [
        {
            "implementation": name,
            "compiled": compiled,
            "tokens_per_s": tok_s,
            "first_step_s": first,
            "mfu": flops * tok_s / peak,
        }
        for name, compiled, tok_s, first in rows
    ]
    if transformers is None:
        print(f"transformers left out: {why}")
    print(
        f"shape: {config}, precision {policy.describe()}, peak {peak / 1e12:.0f} TFLOP/s "
        f"(measured), {flops / 1e9:.3f} GFLOP a token\n"
    )
    print(
        common.markdown_table(
            ["implementation", "torch.compile", "tokens/s", "MFU", "first step s"],
            [
                [r["implementation"], "yes" if r["compiled"] else "no"]
                + [f"{r['tokens_per_s']:,.0f}", f"{r['mfu']:.1%}", f"{r['first_step_s']:.1f}"]
                for r in results
            ],
        )
    )
    return {
        "shape": dataclasses.asdict(config),
        "peak_flops": peak,
        "flops_per_token": flops,
        "rows": results,
    }


# ------------------------------------------------------------------------------- fp16


def skipped_after(rows: list[dict], warmup: int) -> int:
    """Steps skipped for overflow after iteration warmup: the gradient scaler halves its
    factor at each (and grows it only after 2,000 clean steps, longer than these runs)."""
    skipped, previous = 0, None
    for row in rows:
        scale = row.get("loss_scale")
        if scale is None:
            continue
        if previous is not None and row["iter"] > warmup and scale < previous:
            skipped += round(math.log2(previous / scale))
        previous = scale
    return skipped


def part_fp16(args, folder: Path) -> dict:
    steps = 20 if args.toy else args.fp16_steps
    flags = ["--preset", "micro", "--max_iters", str(steps), "--eval_interval", str(steps // 8)]
    flags += (TOY_MODEL.split() + ["--warmup_iters", "2"]) if args.toy else ["--eval_iters", "20"]
    from smolgpt.config import TrainConfig

    warmup = 2 if args.toy else TrainConfig.warmup_iters  # the preset's: micro keeps it
    own = {k: v for k, v in os.environ.items() if k != T4_ENV}
    runs = {
        "own policy, seed 1337": (own, []),
        "own policy, seed 2": (own, ["--seed", "2"]),
        f"a T4's policy ({T4_ENV}=7.5)": ({**own, T4_ENV: "7.5"}, []),
    }
    results = []
    for i, (name, (env, extra)) in enumerate(runs.items()):
        print(f"  micro, {name} ...", file=sys.stderr, flush=True)
        run = train(args, flags + extra, folder / f"fp16-{i}", env=env)
        policy = next((line for line in run.output.splitlines() if "model:" in line), "")
        results.append(
            {
                "name": name,
                "policy": policy.split("|")[-1].strip(),
                "final_val_loss": run.rows[-1]["val_loss"],
                "best_val_loss": min(r["val_loss"] for r in run.rows),
                "final_train_loss": run.rows[-1]["train_loss"],
                "loss_scales": [r.get("loss_scale") for r in run.rows],
                "skipped_after_warmup": skipped_after(run.rows, warmup),
                "wall_s": run.wall_s,
            }
        )
    noise = abs(results[0]["final_val_loss"] - results[1]["final_val_loss"])
    gap = abs(results[2]["final_val_loss"] - results[0]["final_val_loss"])
    print(
        common.markdown_table(
            ["run", "precision", "final val", "best val", "skipped after warm-up", "wall s"],
            [
                [r["name"], r["policy"], f"{r['final_val_loss']:.4f}", f"{r['best_val_loss']:.4f}"]
                + [str(r["skipped_after_warmup"]), f"{r['wall_s']:.1f}"]
                for r in results
            ],
        )
    )
    print(f"\nfp16 against bf16: {gap:.4f}; two bf16 seeds: {noise:.4f}")
    return {"steps": steps, "warmup": warmup, "runs": results, "gap": gap, "seed_noise": noise}


# ---------------------------------------------------------------------------- torchrun


def part_torchrun(args, folder: Path) -> dict:
    import smolgpt.checkpoint as checkpoint

    steps = 20 if args.toy else 200
    flags = ["--preset", "micro", "--max_iters", str(steps), "--eval_interval", str(steps // 2)]
    flags += TOY_MODEL.split() if args.toy else ["--eval_iters", "20"]
    out_dir = folder / "torchrun"
    print("  torchrun --nproc_per_node=1 ...", file=sys.stderr, flush=True)
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    launched = train(args, flags, out_dir, python_args=launch)
    line = next((s for s in launched.output.splitlines() if "distributed:" in s), "")
    print("  resumed on the CPU ...", file=sys.stderr, flush=True)
    more = ["--preset", "micro", "--max_iters", str(steps + steps // 2), "--resume"]
    more += ["--eval_interval", str(steps // 2), *(TOY_MODEL.split() if args.toy else [])]
    resumed = train(args, more, out_dir, device="cpu")
    ckpt = checkpoint.load(out_dir / "latest_model.pth")
    result = {
        "distributed_line": line.split("distributed:", 1)[-1].strip(),
        "launched_wall_s": launched.wall_s,
        "launched_last_iter": launched.rows[-1]["iter"],
        "resumed_iters": [r["iter"] for r in resumed.rows],
        "resumed_on": ckpt.run_info["device"],
        "final_iter": ckpt.progress.iter,
    }
    print(
        f"torchrun, one process: {result['distributed_line']}; {steps} steps in "
        f"{launched.wall_s:.1f} s; resumed on {result['resumed_on']} to iteration "
        f"{result['final_iter']} (evaluations at {result['resumed_iters']})"
    )
    return result


# ------------------------------------------------------------------------------- vocab


def part_vocab(args, folder: Path) -> dict:
    presets = (
        {"nano": ["bpe:300", "bpe:400"]}
        if args.toy
        else {
            "tiny": [f"bpe:{n}" for n in args.vocab_sizes],
            "small": [f"bpe:{n}" for n in args.vocab_sizes],
        }
    )
    extra = f"--device {args.device}" + (f" {TOY_MODEL} --max_iters 5" if args.toy else "")
    found = {}
    for preset, levels in presets.items():
        record = folder / f"levels-{preset}.json"
        print(f"  bpe vocabularies at {preset} ...", file=sys.stderr, flush=True)
        command = [
            sys.executable,
            str(common.REPO / "benchmarks" / "levels.py"),
            "--preset",
            preset,
            "--time-budget",
            str(1 if args.toy else args.vocab_budget),
            "--levels",
            *levels,
            "--corpora",
            str(args.data / "sherlock.txt"),
            "--samples",
            "0",
            "--extra",
            extra,
            "--out",
            str(record),
        ]
        result = subprocess.run(command, capture_output=True, text=True, cwd=common.REPO)
        if result.returncode:
            raise PartFailed(f"{shlex.join(command)} failed:\n{result.stderr[-3000:]}")
        found[preset] = [
            {
                "vocab_size": r["vocab_size"],
                "steps": r["iterations"],
                "held_out_bits_per_char": r["held_out"]["bits_per_char"],
            }
            for r in json.loads(record.read_text())["results"]
        ]
    print(
        common.markdown_table(
            ["preset", "vocab_size", "steps", "held-out bits/char"],
            [
                [preset, f"{r['vocab_size']:,}", f"{r['steps']:,}"]
                + [f"{r['held_out_bits_per_char']:.4f}"]
                for preset, rows in found.items()
                for r in rows
            ],
        )
    )
    return {"budget_s": 1 if args.toy else args.vocab_budget, "presets": found}


# -------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="On a GPU: time to nanoGPT's 1.4697 against nanoGPT's configuration, "
        "throughput at GPT-2 small's shape against transformers, a T4's fp16 path, torchrun "
        "with NCCL, and the bpe vocabularies of tiny and small; prints a table a part, and "
        "writes JSON after each."
    )
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument(
        "--data",
        type=Path,
        default=common.SHARED_DATA,
        help="folder with tinyshakespeare.txt and sherlock.txt (default: ../shared/data)",
    )
    parser.add_argument("--device", default=None, help="default: cuda where there is one, else cpu")
    parser.add_argument(
        "--recipe",
        action="append",
        help="smolgpt's train flags to race nanoGPT's configuration with (repeatable; "
        "default: --preset speedrun)",
    )
    parser.add_argument("--batch", type=int, default=16, help="throughput: sequences a step")
    parser.add_argument("--no-compile", action="store_true", help="throughput: eager only")
    parser.add_argument("--fp16-steps", type=int, default=400, help="fp16: steps of each run")
    parser.add_argument(
        "--vocab-sizes", type=int, nargs="+", default=[1024, 2048, 4096], help="vocab sweep"
    )
    parser.add_argument(
        "--vocab-budget", type=float, default=30.0, help="vocab: --time_budget of each run"
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds from the start after which no part begins (the rest are recorded skipped)",
    )
    parser.add_argument("--toy", action="store_true", help="every part at toy size: a test")
    parser.add_argument("--out", type=Path, default=common.OUT / "gpu.json")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    start = time.perf_counter()
    args = build_parser().parse_args(argv)
    import torch

    from smolgpt import hardware

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.recipe = args.recipe or ["--preset speedrun"]
    args.no_compile = args.no_compile or args.toy  # compiling a toy takes longer than it runs
    for name in ("tinyshakespeare.txt", "sherlock.txt"):
        if not (args.data / name).is_file():
            raise SystemExit(f"--data {args.data}: no {name} there (copy the corpora in)")
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(f"device: {gpu or 'CPU'}, torch {torch.__version__}")
    common.print_machine()
    record = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "gpu": gpu,
        "torch": torch.__version__,
        "precision": hardware.precision_policy(device).describe(),
        "parts": {},
        "skipped": [],
    }
    functions = {
        "nanogpt": part_nanogpt,
        "throughput": part_throughput,
        "fp16": part_fp16,
        "torchrun": part_torchrun,
        "vocab": part_vocab,
    }
    with tempfile.TemporaryDirectory(prefix="smolgpt-gpu-") as tmp:
        for name in args.parts:
            elapsed = time.perf_counter() - start
            if args.deadline is not None and elapsed > args.deadline:
                record["skipped"].append(name)
                print(f"\n## {name}: skipped (past --deadline at {elapsed:.0f} s)")
                continue
            print(f"\n## {name}\n", flush=True)
            folder = Path(tmp) / name
            folder.mkdir()
            part_start = time.perf_counter()
            try:
                result = functions[name](args, folder)
            except Exception as exc:  # noqa: BLE001 - recorded; GPU time goes on to the next part
                result = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"{name} failed: {result['error']}")
            result["part_s"] = time.perf_counter() - part_start
            record["parts"][name] = result
            common.write_record(args.out, "gpu", **record)
    print()
    common.print_command(__file__, argv)
    return 1 if any("error" in r for r in record["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
