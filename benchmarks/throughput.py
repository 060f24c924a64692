"""Training throughput (tokens/s): smolgpt against Hugging Face transformers' GPT2LMHeadModel.

Both models get the same shape (layers, heads, width, context, vocabulary, dropout) and the
same batches (random token ids through smolgpt's BatchSampler), in the same process:

- smolgpt: ``train_step`` of a real ``smolgpt.training.Trainer`` built over an in-memory
  corpus of random ids, i.e. exactly what ``train.py`` runs each step (rotary
  positions, autocast dtype, gradient clipping), with AdamW like the peer's loop; and again
  with ``--optimizer muon`` (what the nano and micro presets train with), whose extra
  per-step cost shows in its own column; and with ``--position learned``, GPT-2's own
  architecture and so exactly the peer's model.
- transformers fp32: ``GPT2LMHeadModel(GPT2Config(...))`` and the loop a user would write:
  ``torch.optim.AdamW``, ``model(input_ids=x, labels=x).loss.backward()``, clip to 1.0 (as
  smolgpt and the HF Trainer do), step, zero_grad.
- transformers bf16: the same loop with the forward under ``torch.autocast("cpu", bfloat16)``,
  measured only where smolgpt's precision policy computes in bf16 (a CPU with native bf16):
  elsewhere bf16 is emulated, some 100x slower, and nobody would train that way.

Precision follows smolgpt's policy for this CPU (``smolgpt.hardware.precision_policy``; the
JSON and the table name the CPU, its flags and the policy). SMOLGPT_CPU_BF16=1/0 forces it.

transformers is optional (``pip install "transformers>=4.40"``, smolgpt's ``bench`` extra):
without it the transformers columns are left out, and a line above the table says so.

Each implementation is warmed up, then timed for about --seconds per measurement; the
implementations alternate in rounds (rotating who goes first), because a shared 2-core
machine is noisy: tokens/s is the median over rounds, and a ratio is the median of the
rounds' ratios, each from two measurements a few seconds apart, so that a slow spell of the
machine slows both sides of it. MFU is smolgpt's model FLOPs (GPT.estimate_flops_per_token()
x tokens/s) over smolgpt.hardware.peak_flops for the dtype smolgpt trains in. "Muon step
cost" is the median over rounds of the AdamW step's tokens/s over the Muon step's.

    python benchmarks/throughput.py                 # baby, nano/micro at char and word level
    python benchmarks/throughput.py --tiny          # also the tiny preset
    python benchmarks/throughput.py --configs baby --seconds 2 --rounds 3
    python benchmarks/throughput.py --quick         # smoke: a one-layer toy config, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional

import common
import torch

from smolgpt import hardware
from smolgpt.batches import BatchSampler
from smolgpt.config import PRESETS, TrainConfig, preset_values
from smolgpt.tokendata import TokenData
from smolgpt.training import Trainer

# Vocabulary sizes of the Sherlock Holmes corpus (../shared/data/sherlock.txt) at each level
# with smolgpt's tokenizers (min_word_freq 3).
CHAR_VOCAB, WORD_VOCAB = 88, 3171
INSTALL = 'pip install "transformers>=4.40" (smolgpt\'s bench extra)'


@dataclasses.dataclass
class BenchConfig:
    name: str
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int
    vocab_size: int
    level: str
    dropout: float
    muon_ns_steps: int = TrainConfig.muon_ns_steps  # the preset's, on this kind of CPU


# --quick's config: each step a few milliseconds, so that warming up and sizing cost nothing.
TOY = BenchConfig("toy", 1, 2, 32, 32, 4, 65, "char", 0.0)


def bench_configs(dropout: float) -> list[BenchConfig]:
    """nanoGPT's CPU 'baby GPT', then smolgpt's nano, micro and tiny presets at char and word
    level (with the presets' Muon settings for this CPU's precision policy)."""
    configs = [BenchConfig("baby", 4, 4, 128, 64, 12, 65, "char", 0.0)]
    cpu_float32 = hardware.precision_policy(torch.device("cpu")).float32_cpu
    for preset in ("nano", "micro", "tiny"):
        shape = {k: PRESETS[preset][k] for k in ("n_layer", "n_head", "n_embd")}
        for level, vocab in (("char", CHAR_VOCAB), ("word", WORD_VOCAB)):
            recipe = preset_values(preset, level, cpu_float32)
            configs.append(
                BenchConfig(
                    f"{preset}-{level}",
                    **shape,
                    block_size=128,
                    batch_size=32,
                    vocab_size=vocab,
                    level=level,
                    dropout=dropout,
                    muon_ns_steps=recipe.get("muon_ns_steps", 5),
                )
            )
    return configs


def smolgpt_step(
    c: BenchConfig, data: TokenData, device: str = "cpu", **settings
) -> tuple[Callable[[], float], Trainer]:
    """(step function, trainer): train_step of a real Trainer of config c on device;
    settings such as optimizer="muon" or amp=False go to its TrainConfig."""
    trainer = common.trainer(
        data,
        device,
        level=c.level,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_embd=c.n_embd,
        block_size=c.block_size,
        batch_size=c.batch_size,
        dropout=c.dropout,
        muon_ns_steps=c.muon_ns_steps,
        **settings,
    )
    # Trainer.run reads every step's loss on a CPU (a NaN check); so does this.
    return (lambda: trainer.train_step().item()), trainer


def transformers_step(
    c: BenchConfig,
    data: TokenData,
    bf16: bool,
    device: str = "cpu",
    compile: bool = False,  # noqa: A002 - torch.compile of the model, as TrainConfig names it
):
    """GPT2LMHeadModel at the same shape on device (torch.compile'd if compile) and a plain
    AdamW loop; returns (step, model)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1337)
    config = GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        bos_token_id=0,
        eos_token_id=0,
    )  # activation_function stays transformers' default ("gelu_new")
    model = GPT2LMHeadModel(config).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    forward = torch.compile(model) if compile else model
    sampler = BatchSampler(data.train, c.block_size, c.batch_size, 1337, torch.device(device))
    kind = torch.device(device).type
    autocast = (
        (lambda: torch.autocast(kind, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    )

    def step() -> float:
        x, _ = sampler.next()  # HF shifts the labels itself
        with autocast():
            loss = forward(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, model


def measure_config(c: BenchConfig, args, peer: bool) -> dict:
    """Tokens/s of each implementation at config c in alternating rounds, with the ratios
    and MFUs derived from them; peer: whether transformers is there to compare with."""
    tokens_per_step = c.batch_size * c.block_size
    data = common.random_token_data(c.vocab_size, c.level, max(200_000, 20 * tokens_per_step))
    impls: dict[str, Callable[[], float]] = {}
    impls["smolgpt"], trainer = smolgpt_step(c, data)
    impls["smolgpt_muon"], _ = smolgpt_step(c, data, optimizer="muon")
    impls["smolgpt_learned"], _ = smolgpt_step(c, data, position="learned")
    if args.smolgpt_fp32:
        impls["smolgpt_fp32"], _ = smolgpt_step(c, data, amp=False)
    hf_model = None
    if peer:
        impls["transformers_fp32"], hf_model = transformers_step(c, data, bf16=False)
        if trainer.precision.reduced == torch.bfloat16:
            impls["transformers_bf16"], _ = transformers_step(c, data, bf16=True)

    # Warm up each, and size a measurement at about args.seconds.
    n_steps = {}
    for name, fn in impls.items():
        common.time_steps(fn, args.warmup)
        per_step = common.time_steps(fn, 2) / 2
        n_steps[name] = max(2, round(args.seconds / per_step))
    rates = common.tokens_per_s_rounds(impls, n_steps, tokens_per_step, args.rounds)

    peak = hardware.peak_flops(torch.device("cpu"), trainer.precision)
    peak_fp32 = hardware.matmul_flops("cpu", torch.float32)
    med = {name: statistics.median(v) for name, v in rates.items()}

    def ratio(name: str, other: str) -> Optional[float]:
        return common.median_ratio(rates[name], rates[other]) if other in rates else None

    flops = trainer.model.estimate_flops_per_token()
    result = {
        "config": dataclasses.asdict(c),
        "tokens_per_step": tokens_per_step,
        "steps_per_measurement": n_steps,
        "tokens_per_s_rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "tokens_per_s_median": {k: round(v, 1) for k, v in med.items()},
        "ratio_smolgpt_vs_transformers_fp32": ratio("smolgpt", "transformers_fp32"),
        "ratio_smolgpt_muon_vs_transformers_fp32": ratio("smolgpt_muon", "transformers_fp32"),
        "muon_step_cost": ratio("smolgpt", "smolgpt_muon"),
        "ratio_smolgpt_vs_transformers_bf16": ratio("smolgpt", "transformers_bf16"),
        "ratio_smolgpt_learned_vs_transformers_fp32": ratio("smolgpt_learned", "transformers_fp32"),
        "smolgpt_params": trainer.model.num_parameters(),
        "transformers_params": sum(p.numel() for p in hf_model.parameters()) if peer else None,
        "smolgpt_flops_per_token": flops,
        "smolgpt_train_dtype": str(trainer.precision.reduced or torch.float32).replace(
            "torch.", ""
        ),
        "peak_flops_used_for_mfu": peak,
        "peak_flops_fp32": peak_fp32,
        "smolgpt_mfu": flops * med["smolgpt"] / peak,
        "smolgpt_muon_mfu": flops * med["smolgpt_muon"] / peak,
    }
    # Same model FLOPs per token (equal shapes), each against its own dtype's peak.
    if "transformers_fp32" in med:
        result["transformers_fp32_mfu"] = flops * med["transformers_fp32"] / peak_fp32
    if "transformers_bf16" in med:
        result["transformers_bf16_mfu"] = flops * med["transformers_bf16"] / peak
    if "smolgpt_fp32" in med:
        result["smolgpt_fp32_mfu"] = flops * med["smolgpt_fp32"] / peak_fp32
    return result


def markdown_table(results: list[dict], smolgpt_fp32: bool, peer: bool) -> str:
    """One row per config; the transformers columns only with peer."""
    head = ["config", "smolgpt tok/s", "smolgpt + Muon tok/s", "smolgpt, learned positions tok/s"]
    if smolgpt_fp32:
        head.append("smolgpt fp32 tok/s")
    if peer:
        head += [
            "transformers fp32 tok/s",
            "transformers bf16 tok/s",
            "smolgpt / tf fp32",
            "smolgpt + Muon / tf fp32",
            "smolgpt / tf bf16",
            "learned positions / tf fp32",
        ]
    head += ["Muon step cost", "smolgpt MFU", "smolgpt + Muon MFU"]
    rows = []
    for r in results:
        m, c = r["tokens_per_s_median"], r["config"]
        shape = (
            f"{c['name']} ({c['n_layer']}L/{c['n_head']}H/{c['n_embd']}, "
            f"T{c['block_size']}, B{c['batch_size']}, V{c['vocab_size']})"
        )
        row = [
            shape,
            f"{m['smolgpt']:,.0f}",
            f"{m['smolgpt_muon']:,.0f}",
            f"{m['smolgpt_learned']:,.0f}",
        ]
        if smolgpt_fp32:
            row.append(f"{m['smolgpt_fp32']:,.0f}")
        times = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
        if peer:
            bf16 = m.get("transformers_bf16")
            row += [
                f"{m['transformers_fp32']:,.0f}",
                "- (no native bf16)" if bf16 is None else f"{bf16:,.0f}",
                times(r["ratio_smolgpt_vs_transformers_fp32"]),
                times(r["ratio_smolgpt_muon_vs_transformers_fp32"]),
                times(r["ratio_smolgpt_vs_transformers_bf16"]),
                times(r["ratio_smolgpt_learned_vs_transformers_fp32"]),
            ]
        row += [
            times(r["muon_step_cost"]),
            f"{100 * r['smolgpt_mfu']:.1f}% ({r['smolgpt_train_dtype']})",
            f"{100 * r['smolgpt_muon_mfu']:.1f}%",
        ]
        rows.append(row)
    return common.markdown_table(head, rows)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Training tokens/s of smolgpt vs transformers GPT2LMHeadModel at equal "
        "shapes, in one process; prints a markdown table and writes JSON."
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        metavar="NAME",
        help="run only these configs (baby, nano-char, nano-word, micro-char, "
        "micro-word, tiny-char, tiny-word); default: all but tiny",
    )
    parser.add_argument("--tiny", action="store_true", help="also benchmark the tiny preset")
    parser.add_argument(
        "--seconds",
        type=float,
        default=5.0,
        help="target seconds per timed measurement (default: 5)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="alternating rounds per config; medians are reported (default: 5)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default: 3)")
    parser.add_argument(
        "--dropout",
        type=float,
        default=TrainConfig.dropout,
        help=f"dropout of the preset configs, both models (default: smolgpt's "
        f"{TrainConfig.dropout}); baby always uses 0",
    )
    parser.add_argument(
        "--smolgpt-fp32",
        action="store_true",
        help="add a column for smolgpt with --no-amp (float32)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: a one-layer toy config, 1 round of ~0.02 s measurements, 1 warm-up step",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=common.OUT / "throughput.json",
        help="JSON results file (default: benchmarks/out/throughput.json)",
    )
    args = parser.parse_args(argv)

    configs = bench_configs(args.dropout)
    if args.quick:
        configs, args.seconds, args.rounds, args.warmup = [TOY], 0.02, 1, 1
    elif args.configs:
        known = [c.name for c in configs]
        unknown = set(args.configs) - set(known)
        if unknown:
            parser.error(
                f"unknown config(s) {', '.join(sorted(unknown))}; choose from {', '.join(known)}"
            )
        configs = [c for c in configs if c.name in args.configs]
    elif not args.tiny:
        configs = [c for c in configs if not c.name.startswith("tiny")]

    transformers, missing = common.import_transformers()
    peer = transformers is not None
    skipped = None if peer else f"transformers columns skipped ({missing}): {INSTALL}"
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__ if peer else 'not available'}; ~{args.seconds:g}s per "
        f"measurement, median of {args.rounds} alternating rounds",
        file=sys.stderr,
    )
    results = []
    for c in configs:
        print(f"measuring {c.name} ...", file=sys.stderr, flush=True)
        results.append(measure_config(c, args, peer))
        m = results[-1]["tokens_per_s_median"]
        print(
            "  " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in m.items()),
            file=sys.stderr,
            flush=True,
        )

    common.print_machine()
    if skipped:
        print(skipped + "\n")
    print(markdown_table(results, args.smolgpt_fp32, peer))
    print()
    common.print_command(__file__, argv)
    common.write_record(
        args.out,
        "throughput",
        threads=torch.get_num_threads(),
        transformers=transformers.__version__ if peer else None,
        settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        results=results,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
