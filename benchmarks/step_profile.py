"""One training step of smolgpt's model, timed and (optionally) profiled; plus the CPU kernel
timings behind the model's speed choices (GELU variant, attention precision).

    python benchmarks/step_profile.py                          # micro, batch 32 x 128, bf16
    python benchmarks/step_profile.py --no-amp --dropout 0.1   # float32, with dropout
    python benchmarks/step_profile.py --profile                # torch.profiler table
    python benchmarks/step_profile.py --kernels                # GELU and attention timings
    python benchmarks/step_profile.py --position learned --muon --batch 16

Prints tokens/s of forward + backward + fused AdamW on random batches (vocabulary 88 unless
--vocab says otherwise).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # works without installing

from smolgpt.config import ModelConfig  # noqa: E402
from smolgpt.model import GPT  # noqa: E402


def _best_ms(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def kernels() -> None:
    """Forward + backward times of the two GELUs and of fused vs unfused attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print("| op | dtype | variant | ms (fwd+bwd) |\n|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4096, 512).to(dtype).requires_grad_()
        for approx in ("none", "tanh"):
            ms = _best_ms(lambda: F.gelu(x, approximate=approx).sum().backward())
            print(f"| gelu 4096x512 | {dtype} | {approx} | {ms:.2f} |")
        q, k, v = (torch.randn(32, 4, 128, 32).to(dtype).requires_grad_() for _ in range(3))
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
            def attend():
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
            print(f"| attention 32x4x128x32 | {dtype} | {backend.name} | {_best_ms(attend):.2f} |")


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
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast (default on)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table")
    parser.add_argument("--kernels", action="store_true", help="time GELU and attention kernels")
    args = parser.parse_args()
    if args.kernels:
        kernels()
        return 0

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=args.vocab, block_size=args.block, n_layer=args.n_layer,
                         n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout,
                         position=args.position)
    model = GPT(config)
    hidden = model.hidden_matrices() if args.muon else []
    optimizers = [torch.optim.AdamW(model.optimizer_groups(0.1, exclude=hidden), lr=1e-3, fused=True)]
    if hidden:
        optimizers.append(torch.optim.Muon(hidden, lr=0.05, adjust_lr_fn="original"))
    x = torch.randint(0, args.vocab, (args.batch, args.block))
    y = torch.randint(0, args.vocab, (args.batch, args.block))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp):
            _, loss = model(x, y)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - start
    print(f"batch {args.batch} x {args.block}, amp={args.amp}, dropout={args.dropout}, "
          f"position={args.position}, muon={args.muon}: "
          f"{args.steps * args.batch * args.block / seconds:,.0f} tokens/s")
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            for _ in range(5):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return 0


if __name__ == "__main__":
    sys.exit(main())
