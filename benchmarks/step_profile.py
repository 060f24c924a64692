"""One training step of smolgpt, timed and (optionally) profiled; plus the CPU kernel timings
behind the model's speed choices (GELU variant, attention precision, dropout, head loss).

The step is ``train_step`` of a real ``smolgpt.training.Trainer`` (what ``train.py`` runs each
step: autocast forward, backward, clipping, fused AdamW, and Muon with --muon) at the shape
the flags give, over random token ids. Precision follows smolgpt's policy for this CPU
(``smolgpt.hardware.precision_policy``): bf16 autocast and a bf16 Muon iteration where the
CPU multiplies bf16 natively, float32 elsewhere; ``--no-amp`` is float32 everywhere, and
SMOLGPT_CPU_BF16=1/0 forces either path.

    python benchmarks/step_profile.py                          # micro, batch 32 x 128
    python benchmarks/step_profile.py --no-amp --dropout 0.1   # float32, with dropout
    python benchmarks/step_profile.py --profile                # torch.profiler table
    python benchmarks/step_profile.py --kernels                # GELU, attention, linear timings
    python benchmarks/step_profile.py --batch 12 --block 64 --vocab 65 --variants --compile  # baby
    python benchmarks/step_profile.py --position learned --muon --batch 16
    python benchmarks/step_profile.py --vocab 3171 --dropout 0.1 --variants  # vs 0.2.0's step
    python benchmarks/step_profile.py --batch 2 --block 16 --n_layer 1 --n_head 2 --n_embd 32 \\
        --steps 2 --rounds 1 --profile --kernels --variants --muon-cost   # smoke test: seconds

Prints tokens/s of the step on random batches (vocabulary 88 unless --vocab says otherwise).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from typing import Callable, Optional

import common
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from smolgpt import hardware, kernels


def mean_ms(fn: Callable[[], object], reps: int = 10) -> float:
    """Milliseconds per call of fn, the mean of reps calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def policy(args) -> hardware.PrecisionPolicy:
    """smolgpt's precision policy for this CPU, under --amp / --no-amp."""
    return hardware.precision_policy(torch.device("cpu"), args.amp)


def print_setting(args, what: str) -> None:
    """What was measured, at which shape and precision."""
    print(
        f"batch {args.batch} x {args.block}, n_layer {args.n_layer}, n_head {args.n_head}, "
        f"n_embd {args.n_embd}, vocabulary {args.vocab}, dropout {args.dropout}, position "
        f"{args.position}{'' if args.amp else ', --no-amp (float32)'}; {what}"
    )


def time_kernels(args) -> None:
    """Forward + backward times, at the shape of --batch, --block, --n_head, --n_embd,
    --vocab, of: the two GELUs; fused vs unfused attention; a linear layer; torch.nn.Dropout
    vs smolgpt's (p = --dropout, or 0.1); and the head's loss from all logits at once vs
    chunk by chunk. In float32, and also in bf16 where the policy computes in bf16 (there
    the linear layer is also timed in float32 with oneDNN allowed to compute in bf16)."""
    B, T, nh, C = args.batch, args.block, args.n_head, args.n_embd
    pol = policy(args)
    dtypes = (torch.float32,) if pol.reduced is None else (torch.float32, pol.reduced)
    rows = []
    for dtype in dtypes:
        x = torch.randn(B * T, 4 * C).to(dtype).requires_grad_()
        for approx in ("none", "tanh"):
            ms = mean_ms(lambda: F.gelu(x, approximate=approx).sum().backward())
            rows.append([f"gelu {B * T}x{4 * C}", dtype, approx, f"{ms:.2f}"])
        q, k, v = (torch.randn(B, nh, T, C // nh).to(dtype).requires_grad_() for _ in range(3))
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):

            def attend():
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

            rows.append(
                [f"attention {B}x{nh}x{T}x{C // nh}", dtype, backend.name, f"{mean_ms(attend):.2f}"]
            )
        if dtype != torch.float32:  # smolgpt's two ways under autocast, whatever the size
            for name, small_elements in (
                ("smolgpt: written out", sys.maxsize),
                ("smolgpt: fused in float32", 0),
            ):
                attention = kernels.FusedAttention()
                attention.small_elements = attention.small_keys = small_elements

                def attend():
                    with pol.autocast():
                        attention(q, k, v).sum().backward()

                rows.append(
                    [f"attention {B}x{nh}x{T}x{C // nh}", dtype, name, f"{mean_ms(attend):.2f}"]
                )
    x = torch.randn(B * T, C, requires_grad=True)
    linear = torch.nn.Linear(C, 4 * C)
    settings = [(torch.float32, "ieee")]
    if pol.reduced is not None:
        settings += [(torch.float32, "bf16"), (pol.reduced, "ieee")]
    for dtype, precision in settings:
        torch.backends.mkldnn.matmul.fp32_precision = precision
        layer, inputs = linear.to(dtype), x.detach().to(dtype).requires_grad_()
        ms = mean_ms(lambda: layer(inputs).sum().backward())
        rows.append(
            [
                f"linear {B * T}x{C}->{4 * C}",
                dtype,
                f"oneDNN fp32_precision={precision}",
                f"{ms:.2f}",
            ]
        )
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"

    p = args.dropout or 0.1
    for dtype in dtypes:
        h = torch.randn(B * T, C, dtype=dtype, requires_grad=True)
        for name, drop in (
            ("torch.nn.Dropout", torch.nn.Dropout(p)),
            ("smolgpt Dropout", kernels.Dropout(p)),
        ):
            ms = mean_ms(lambda: drop(h).sum().backward())
            rows.append([f"dropout p={p} {B * T}x{C}", dtype, name, f"{ms:.2f}"])

    hidden = torch.randn(B * T, C, requires_grad=True)
    weight = (0.02 * torch.randn(args.vocab, C)).requires_grad_()  # the tied embedding
    targets = torch.randint(0, args.vocab, (B * T,))
    for name, chunk in (
        ("all logits at once", sys.maxsize),
        ("smolgpt (in chunks if larger than one)", kernels.LOSS_CHUNK_ELEMENTS),
    ):

        def head_loss():
            with pol.autocast():
                loss = kernels.head_loss(hidden, weight, targets, chunk)
            loss.backward()

        rows.append(
            [
                f"head + loss {B * T}x{C}->{args.vocab}",
                pol.reduced or torch.float32,
                name,
                f"{mean_ms(head_loss):.2f}",
            ]
        )
    print(common.markdown_table(["op", "dtype", "variant", "ms (fwd+bwd)"], rows))


def build_step(
    args,
    torch_dropout: bool = False,
    whole_loss: bool = False,
    pure_bf16: bool = False,
    foreach_clip: bool = False,
    compile: bool = False,  # noqa: A002 - the --compile variant, as TrainConfig names it
    torch_muon: bool = False,
    fused_attention: bool = False,
) -> Callable[[], object]:
    """train_step of a fresh Trainer at the shape of args, over random ids. Variants change
    the Trainer before its first step: torch_dropout swaps the model's CPU dropout for
    torch.nn.Dropout and whole_loss makes the loss from all the logits at once (both as
    smolgpt 0.2.0 did); pure_bf16 trains the whole model in bf16 without autocast (a bound
    on what keeping bf16 copies of the weights could save); foreach_clip clips with
    foreach=True; compile runs the model through torch.compile; torch_muon (with --muon)
    uses torch.optim.Muon instead of smolgpt's BatchedMuon; fused_attention runs attention
    by the fused kernel in float32 at every size under autocast (as 0.12.0 did)."""
    trainer = common.cpu_trainer(
        common.random_token_data(args.vocab),
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        block_size=args.block,
        batch_size=args.batch,
        dropout=args.dropout,
        position=args.position,
        amp=args.amp,
        compile=compile,
        optimizer="muon" if args.muon else "adamw",
        muon_ns_steps=args.ns_steps,
    )
    model, cfg = trainer.model, trainer.cfg
    if torch_dropout:
        for module in list(model.modules()):
            for name, child in module.named_children():
                if isinstance(child, kernels.Dropout):
                    setattr(module, name, torch.nn.Dropout(child.p))
    if whole_loss:
        trainer.training_loss.chunk_elements = sys.maxsize
    if fused_attention:
        for module in model.modules():
            if isinstance(module, kernels.FusedAttention):
                module.small_elements = 0
    if pure_bf16:
        model.bfloat16()
        trainer.precision = hardware.cpu_policy(hardware.cpu_info(), amp=False)  # no autocast
    if torch_muon and args.muon:
        trainer.optimizers[-1] = torch.optim.Muon(
            model.hidden_matrices(),
            lr=cfg.muon_lr,
            ns_steps=cfg.muon_ns_steps,
            weight_decay=cfg.weight_decay,
            adjust_lr_fn="original",
        )
    if foreach_clip:
        return lambda: with_foreach_clipping(trainer.train_step)
    return trainer.train_step


def with_foreach_clipping(step: Callable[[], object]) -> object:
    """step(), with torch.nn.utils.clip_grad_norm_ (which Trainer.train_step calls) clipping
    with foreach=True: on a CPU torch's default is one tensor at a time."""
    original = torch.nn.utils.clip_grad_norm_
    torch.nn.utils.clip_grad_norm_ = functools.partial(original, foreach=True)
    try:
        return step()
    finally:
        torch.nn.utils.clip_grad_norm_ = original


def compare_variants(args) -> None:
    """The default step against 0.2.0's dropout and whole-logits loss and against things
    tried for speed, in alternating rounds."""
    variants = {
        "default": build_step(args),
        "torch.nn.Dropout": build_step(args, torch_dropout=True),
        "loss from all logits at once": build_step(args, whole_loss=True),
        "both (as 0.2.0)": build_step(args, torch_dropout=True, whole_loss=True),
        "clip_grad_norm_(foreach=True)": build_step(args, foreach_clip=True),
    }
    if policy(args).reduced == torch.bfloat16:  # emulated bf16 would only measure emulation
        variants["attention fused in float32 (0.12.0)"] = build_step(args, fused_attention=True)
        variants["whole model in bf16, no autocast"] = build_step(args, pure_bf16=True)
        if args.muon:  # its iteration is always in bf16
            variants["torch.optim.Muon (0.2.0)"] = build_step(args, torch_muon=True)
    if args.compile:
        print("compiling (tens of seconds) ...", file=sys.stderr, flush=True)
        variants["torch.compile"] = build_step(args, compile=True)
    rates = timed_rounds(args, variants)
    base = rates["both (as 0.2.0)"]
    print_setting(
        args, f"muon={args.muon}; median of {args.rounds} alternating rounds of {args.steps} steps"
    )
    print()
    print(
        common.markdown_table(
            ["variant", "tokens/s", 'speed-up over "both (as 0.2.0)"'],
            [
                [
                    name,
                    f"{statistics.median(values):,.0f}",
                    f"{common.median_ratio(values, base):.2f}x",
                ]
                for name, values in rates.items()
            ],
        )
    )


def muon_cost(args) -> None:
    """The step with Muon (at --ns_steps) against the same step with AdamW alone, in
    alternating rounds: how much Muon's orthogonalisation adds to a step."""
    steps = {
        "AdamW": build_step(argparse.Namespace(**{**vars(args), "muon": False})),
        "Muon + AdamW": build_step(argparse.Namespace(**{**vars(args), "muon": True})),
    }
    rates = timed_rounds(args, steps)
    print_setting(
        args,
        f"Muon ns_steps {args.ns_steps}; median of {args.rounds} alternating "
        f"rounds of {args.steps} steps",
    )
    print()
    print(
        common.markdown_table(
            ["step", "tokens/s"],
            [[name, f"{statistics.median(values):,.0f}"] for name, values in rates.items()],
        )
    )
    cost = common.median_ratio(rates["AdamW"], rates["Muon + AdamW"])
    print(f"\nMuon step / AdamW step: {cost:.2f}x")


def timed_rounds(args, steps: dict[str, Callable[[], object]]) -> dict[str, list[float]]:
    """Tokens/s of each step over --rounds alternating rounds of --steps steps, after a
    warm-up of 3 steps each."""
    for step in steps.values():
        common.time_steps(step, 3)
    return common.tokens_per_s_rounds(
        steps, dict.fromkeys(steps, args.steps), args.batch * args.block, args.rounds
    )


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()) + " --profile, --kernels, "
        "--variants and --muon-cost may be combined; without any of them, the step is timed."
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=88, help="vocabulary size (default: 88)")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--position", choices=("rope", "learned"), default="rope")
    parser.add_argument(
        "--muon",
        action="store_true",
        help="Muon for the blocks' matrices, AdamW for the rest (as --optimizer muon)",
    )
    parser.add_argument(
        "--ns_steps",
        type=int,
        default=5,
        help="Newton-Schulz iterations of Muon (--muon; default 5)",
    )
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reduced precision where the CPU has it natively (default on)",
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="time the step and print a torch.profiler table of it",
    )
    parser.add_argument("--kernels", action="store_true", help="time GELU and attention kernels")
    parser.add_argument(
        "--variants",
        action="store_true",
        help="compare the step with 0.2.0's dropout and loss and with things "
        "tried for speed, in alternating rounds",
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds of --variants and --muon-cost (default: 5)"
    )
    parser.add_argument("--compile", action="store_true", help="--variants: add torch.compile")
    parser.add_argument(
        "--muon-cost",
        action="store_true",
        help="time the step with Muon against the step with AdamW alone",
    )
    args = parser.parse_args(argv)
    modes = [
        mode
        for flag, mode in (
            (args.profile, time_step),
            (args.kernels, time_kernels),
            (args.variants, compare_variants),
            (args.muon_cost, muon_cost),
        )
        if flag
    ]
    common.print_machine()
    for mode in modes or [time_step]:
        mode(args)
        print()
    common.print_command(__file__, argv)
    return 0


def time_step(args) -> None:
    """Tokens/s of the step, and with --profile torch.profiler's table of five steps."""
    step = build_step(args)
    common.time_steps(step, 5)  # warm-up
    rate = args.steps * args.batch * args.block / common.time_steps(step, args.steps)
    print_setting(args, f"muon={args.muon} (ns_steps {args.ns_steps}): {rate:,.0f} tokens/s")
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            common.time_steps(step, 5)
        print()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    sys.exit(main())
