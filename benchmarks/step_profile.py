"""One training step of smolgpt's model, timed and (optionally) profiled; plus the CPU kernel
timings behind the model's speed choices (GELU variant, attention precision).

Precision follows smolgpt's policy for this CPU (``smolgpt.hardware.precision_policy``): bf16
autocast and a bf16 Muon iteration where the CPU multiplies bf16 natively, float32 elsewhere;
``--no-amp`` is float32 everywhere, and SMOLGPT_CPU_BF16=1/0 forces either path.

    python benchmarks/step_profile.py                          # micro, batch 32 x 128
    python benchmarks/step_profile.py --no-amp --dropout 0.1   # float32, with dropout
    python benchmarks/step_profile.py --profile                # torch.profiler table
    python benchmarks/step_profile.py --kernels                # GELU, attention, linear timings
    python benchmarks/step_profile.py --batch 12 --block 64 --vocab 65 --variants --compile  # baby
    python benchmarks/step_profile.py --position learned --muon --batch 16
    python benchmarks/step_profile.py --vocab 3171 --dropout 0.1 --variants  # vs 0.2.0's step

Prints tokens/s of forward + backward + clipping + fused AdamW on random batches (vocabulary
88 unless --vocab says otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # works without installing

from smolgpt import hardware  # noqa: E402
from smolgpt.config import ModelConfig  # noqa: E402
from smolgpt.model import GPT, Dropout  # noqa: E402
from smolgpt.training import BatchedMuon  # noqa: E402


def _best_ms(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def policy(args) -> hardware.PrecisionPolicy:
    return hardware.precision_policy(torch.device("cpu"), args.amp)


def kernels(args) -> None:
    """Forward + backward times, at the shape of --batch, --block, --n_head, --n_embd,
    --vocab, of: the two GELUs; fused vs unfused attention; a linear layer; torch.nn.Dropout
    vs smolgpt's (p = --dropout, or 0.1); and the head's loss from all logits at once vs
    chunk by chunk. In float32, and also in bf16 where the policy computes in bf16 (there
    the linear layer is also timed in float32 with oneDNN allowed to compute in bf16)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, T, nh, C = args.batch, args.block, args.n_head, args.n_embd
    pol = policy(args)
    dtypes = (torch.float32,) if pol.reduced is None else (torch.float32, pol.reduced)
    print(f"{hardware.cpu_info().describe()}; policy {pol.describe()}\n")
    print("| op | dtype | variant | ms (fwd+bwd) |\n|---|---|---|---|")
    for dtype in dtypes:
        x = torch.randn(B * T, 4 * C).to(dtype).requires_grad_()
        for approx in ("none", "tanh"):
            ms = _best_ms(lambda: F.gelu(x, approximate=approx).sum().backward())
            print(f"| gelu {B * T}x{4 * C} | {dtype} | {approx} | {ms:.2f} |")
        q, k, v = (torch.randn(B, nh, T, C // nh).to(dtype).requires_grad_() for _ in range(3))
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
            def attend():
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
            print(f"| attention {B}x{nh}x{T}x{C // nh} | {dtype} | {backend.name} | "
                  f"{_best_ms(attend):.2f} |")
    x = torch.randn(B * T, C, requires_grad=True)
    linear = torch.nn.Linear(C, 4 * C)
    settings = [(torch.float32, "ieee")]
    if pol.reduced is not None:
        settings += [(torch.float32, "bf16"), (pol.reduced, "ieee")]
    for dtype, precision in settings:
        torch.backends.mkldnn.matmul.fp32_precision = precision
        layer, inputs = linear.to(dtype), x.detach().to(dtype).requires_grad_()
        ms = _best_ms(lambda: layer(inputs).sum().backward())
        print(f"| linear {B * T}x{C}->{4 * C} | {dtype} | oneDNN fp32_precision={precision} | {ms:.2f} |")
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"

    p = args.dropout or 0.1
    for dtype in dtypes:
        h = torch.randn(B * T, C, dtype=dtype, requires_grad=True)
        for name, drop in (("torch.nn.Dropout", torch.nn.Dropout(p)), ("smolgpt Dropout", Dropout(p))):
            ms = _best_ms(lambda: drop(h).sum().backward())
            print(f"| dropout p={p} {B * T}x{C} | {dtype} | {name} | {ms:.2f} |")

    model = GPT(ModelConfig(vocab_size=args.vocab, block_size=T, n_layer=1, n_head=nh, n_embd=C))
    hidden = torch.randn(B * T, C, requires_grad=True)
    targets = torch.randint(0, args.vocab, (B * T,))
    for name, chunk in (("all logits at once", sys.maxsize),
                        ("smolgpt (in chunks if larger than one)", GPT.loss_chunk_elements)):
        model.loss_chunk_elements = chunk

        def head_loss():
            with pol.autocast():
                loss = model.loss(hidden, targets)
            loss.backward()

        print(f"| head + loss {B * T}x{C}->{args.vocab} | {pol.reduced or torch.float32} | {name} | "
              f"{_best_ms(head_loss):.2f} |")


def build_step(args, torch_dropout: bool = False, whole_loss: bool = False,
               pure_bf16: bool = False, foreach_clip: bool = False, compile: bool = False,
               torch_muon: bool = False):
    """A training step (as Trainer.train_step: autocast forward, backward, clipping, fused
    AdamW) of a fresh model on fixed random batches. Variants: torch_dropout swaps the
    model's CPU dropout for torch.nn.Dropout and whole_loss makes the loss from all the
    logits at once (both as smolgpt 0.2.0 did); pure_bf16 trains the whole model in bf16
    without autocast (a bound on what keeping bf16 copies of the weights could save);
    foreach_clip clips with foreach=True; compile runs the model through torch.compile;
    torch_muon (with --muon) uses torch.optim.Muon instead of smolgpt's BatchedMuon."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=args.vocab, block_size=args.block, n_layer=args.n_layer,
                         n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout,
                         position=args.position)
    model = GPT(config)
    if torch_dropout:
        for module in list(model.modules()):
            for name, child in module.named_children():
                if isinstance(child, Dropout):
                    setattr(module, name, torch.nn.Dropout(child.p))
    if whole_loss:
        model.loss_chunk_elements = sys.maxsize
    if pure_bf16:
        model = model.bfloat16()
    forward = torch.compile(model) if compile else model
    hidden = model.hidden_matrices() if args.muon else []
    optimizers = [torch.optim.AdamW(model.optimizer_groups(0.1, exclude=hidden), lr=1e-3, fused=True)]
    pol = policy(args)
    if hidden:
        if torch_muon:
            optimizers.append(torch.optim.Muon(hidden, lr=0.05, adjust_lr_fn="original"))
        else:
            optimizers.append(BatchedMuon(hidden, lr=0.05, adjust_lr_fn="original",
                                          ns_dtype=pol.muon_dtype, ns_steps=args.ns_steps))
    x = torch.randint(0, args.vocab, (args.batch, args.block))
    y = torch.randint(0, args.vocab, (args.batch, args.block))

    def step() -> None:
        with pol.autocast() if not pure_bf16 else contextlib.nullcontext():
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=foreach_clip or None)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def tokens_per_s(step, steps: int, tokens_per_step: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * tokens_per_step / (time.perf_counter() - start)


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
        variants["whole model in bf16, no autocast"] = build_step(args, pure_bf16=True)
        if args.muon:  # its iteration is always in bf16
            variants["torch.optim.Muon (0.2.0)"] = build_step(args, torch_muon=True)
    if args.compile:
        print("compiling (tens of seconds) ...", file=sys.stderr, flush=True)
        variants["torch.compile"] = build_step(args, compile=True)
    tokens = args.batch * args.block
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for step in variants.values():
        tokens_per_s(step, 3, tokens)  # warm-up
    for r in range(args.rounds):
        names = list(variants)[r % len(variants):] + list(variants)[:r % len(variants)]
        for name in names:
            rates[name].append(tokens_per_s(variants[name], args.steps, tokens))
    base = rates["both (as 0.2.0)"]
    print(f"{hardware.cpu_info().describe()}; policy {policy(args).describe()}\n"
          f"batch {args.batch} x {args.block}, vocabulary {args.vocab}, dropout {args.dropout}, "
          f"muon={args.muon}; median of {args.rounds} alternating rounds of {args.steps} steps\n")
    print("| variant | tokens/s | speed-up over \"both (as 0.2.0)\" |\n|---|---|---|")
    for name, values in rates.items():
        speedup = statistics.median(a / b for a, b in zip(values, base))
        print(f"| {name} | {statistics.median(values):,.0f} | {speedup:.2f}x |")


def muon_cost(args) -> None:
    """The step with Muon (at --ns_steps) against the same step with AdamW alone, in
    alternating rounds: how much Muon's orthogonalisation adds to a step."""
    steps = {"AdamW": build_step(argparse.Namespace(**{**vars(args), "muon": False})),
             "Muon + AdamW": build_step(argparse.Namespace(**{**vars(args), "muon": True}))}
    tokens = args.batch * args.block
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        tokens_per_s(step, 3, tokens)  # warm-up
    for r in range(args.rounds):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            rates[name].append(tokens_per_s(steps[name], args.steps, tokens))
    cost = statistics.median(a / m for a, m in zip(rates["AdamW"], rates["Muon + AdamW"]))
    print(f"{hardware.cpu_info().describe()}; policy {policy(args).describe()}\n"
          f"batch {args.batch} x {args.block}, vocabulary {args.vocab}, dropout {args.dropout}, "
          f"Muon ns_steps {args.ns_steps}; median of {args.rounds} alternating rounds of "
          f"{args.steps} steps\n")
    print("| step | tokens/s |\n|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):,.0f} |")
    print(f"\nMuon step / AdamW step: {cost:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=88, help="vocabulary size (default: 88)")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--position", choices=("rope", "learned"), default="rope")
    parser.add_argument("--muon", action="store_true",
                        help="Muon for the blocks' matrices, AdamW for the rest (as --optimizer muon)")
    parser.add_argument("--ns_steps", type=int, default=5,
                        help="Newton-Schulz iterations of Muon (--muon; default 5)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="reduced precision where the CPU has it natively (default on)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table")
    parser.add_argument("--kernels", action="store_true", help="time GELU and attention kernels")
    parser.add_argument("--variants", action="store_true",
                        help="compare the step with 0.2.0's dropout and loss and with things "
                        "tried for speed, in alternating rounds")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of --variants (default: 5)")
    parser.add_argument("--compile", action="store_true", help="--variants: add torch.compile")
    parser.add_argument("--muon-cost", action="store_true",
                        help="time the step with Muon against the step with AdamW alone")
    args = parser.parse_args()
    if args.kernels:
        kernels(args)
        return 0
    if args.variants:
        compare_variants(args)
        return 0
    if args.muon_cost:
        muon_cost(args)
        return 0

    step = build_step(args)
    for _ in range(5):
        step()
    rate = tokens_per_s(step, args.steps, args.batch * args.block)
    print(f"{hardware.cpu_info().describe()}; policy {policy(args).describe()}\n"
          f"batch {args.batch} x {args.block}, dropout={args.dropout}, "
          f"position={args.position}, muon={args.muon} (ns_steps {args.ns_steps}): "
          f"{rate:,.0f} tokens/s")
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            for _ in range(5):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return 0


if __name__ == "__main__":
    sys.exit(main())
