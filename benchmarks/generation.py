"""Generation speed (new tokens/s): smolgpt with its KV cache, in float32 and with int8
weights (``--quantize int8``), smolgpt without the cache, and Hugging Face transformers'
``generate`` on the exported copy of the same model.

Models: for each preset shape (nano, micro, tiny; context 128, rotary positions, the
65-character vocabulary of tinyshakespeare) a smolgpt GPT is made with random weights (the
cost of a step does not depend on what the weights learned), saved as a smolgpt checkpoint
(``smolgpt.checkpoint.save``) and loaded back with ``smolgpt.load``, as a user gets a model.
Then, at batch 1 and batch 8, in one process, with the same prompt (8 characters), the same
number of new tokens for every row (default 120: the prompt and its continuation fill the
context of 128) and the same sampling (temperature 0.8, then top-k 40):

- smolgpt: the public call, ``model.generate(prompt, max_new_tokens=..., temperature=...,
  top_k=..., num_samples=batch)``: the prompt goes through the model once, then each new
  token costs one position of work thanks to the KV cache;
- smolgpt int8: the same call on the same checkpoint loaded with
  ``smolgpt.load(..., quantize="int8")``: the blocks' matrices and the output head stored as
  8-bit integers (``smolgpt.quantize``), which a step reads 4x fewer bytes of;
- smolgpt, no cache: a reference loop written below (:func:`generate_without_cache`), which
  feeds the whole context through the same model for every new token, as generation did
  before the cache, with the same sampling in plain PyTorch;
- transformers: the model exported with ``smolgpt.hf.export_hf`` and read back with
  ``AutoModelForCausalLM.from_pretrained``, in float32, then ``generate(ids,
  do_sample=True, top_k=..., temperature=..., max_new_tokens=...)`` with no end-of-text
  token, on the prompt's ids repeated batch times as the input batch (its logits are checked
  to equal smolgpt's float32 ones).

Past the window: a second measurement makes --past-tokens new tokens (default 256, twice the
context) after the same prompt, with smolgpt, smolgpt int8 and transformers. The two do not
do the same work there. Once the context is full, smolgpt slides its window: every new token
recomputes a full window of block_size positions without the cache (smolgpt.sampling says
why), so a token costs a forward pass over 128 positions. transformers keeps its cache and
lets the context grow past the 128 positions the model was made for (it warns once; rotary
positions let it run, though a trained model's text there is not what it learned), so a
token still costs one position. The column says what each costs per token past the context.

Tokens/s is batch x new tokens over the wall time of the whole call, prompt included.
Nothing is warmed up but torch itself (one small product, paid by any torch program): the
first call of each implementation on each model and batch is timed on its own ("first
call"), because a user pays it, in an order rotated from row to row. Then --rounds rounds
call each implementation once, in an order rotated every round (a shared 2-core machine has
slow spells; see common.rotated); the table gives the median over rounds, and a ratio is
the median of the rounds' ratios. PyTorch's default threads are used, as a user gets them.
On a small machine shared with other processes, every op that PyTorch spreads over threads
waits for a free core, so the numbers move with their load: a line above the table gives
the 1-minute load average during the run.

transformers is optional (``pip install "transformers>=4.40"``, smolgpt's ``bench`` extra):
without it the transformers columns are left out, and a line above the table says so.

    python benchmarks/generation.py                        # nano, micro, tiny at batch 1 and 8
    python benchmarks/generation.py --configs micro --batches 1 --rounds 5
    python benchmarks/generation.py --quick                # smoke: nano, batch 1 and 2, 8 tokens
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import common
import torch

import smolgpt
from smolgpt import checkpoint
from smolgpt.config import PRESETS, ModelConfig
from smolgpt.model import GPT
from smolgpt.tokenizer import CharTokenizer

# tinyshakespeare's 65 characters, and a prompt of 8 of them.
CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
PROMPT = "ROMEO:\nI"
BLOCK_SIZE = 128
INSTALL = 'pip install "transformers>=4.40" (smolgpt\'s bench extra)'


@dataclasses.dataclass
class Settings:
    """What every implementation is asked for: the same prompt ids, lengths and sampling."""

    prompt_ids: list[int]
    new_tokens: int
    temperature: float
    top_k: int
    seed: int = 1337


# ------------------------------------------------------------------------------ models


def smolgpt_model(preset: str, folder: Path, quantize: str = "none") -> "smolgpt.Model":
    """A random-initialised smolgpt model of the preset's shape, through a checkpoint file
    (written in folder the first time) and ``smolgpt.load`` (on the CPU, in eval mode, its
    weights stored as quantize says), as a user's trained model would be."""
    path = folder / f"{preset}.pth"
    if not path.exists():
        shape = {k: PRESETS[preset][k] for k in ("n_layer", "n_head", "n_embd")}
        tokenizer = CharTokenizer(CHARS)
        config = ModelConfig(
            vocab_size=tokenizer.vocab_size, block_size=BLOCK_SIZE, dropout=0.0, **shape
        )
        torch.manual_seed(0)
        module = GPT(config)
        checkpoint.save(path, checkpoint.Checkpoint(config, tokenizer, module.state_dict()))
    return smolgpt.load(path, device="cpu", quantize=quantize)


def transformers_model(model: "smolgpt.Model", folder: Path):
    """The transformers copy of model, in eval mode: written by smolgpt.hf.export_hf,
    read by AutoModelForCausalLM.from_pretrained."""
    from transformers import AutoModelForCausalLM

    from smolgpt import hf

    out_dir = hf.export_hf(model.module, model.tokenizer, folder / f"hf-{id(model)}")
    return AutoModelForCausalLM.from_pretrained(out_dir).eval()


def check_same_model(model: "smolgpt.Model", hf) -> None:
    """Raise unless the transformers copy is in float32 and gives smolgpt's logits. (After
    the measurements: a forward pass before them would warm both up.)"""
    ids = torch.tensor([model.tokenizer.encode(PROMPT)])
    with torch.no_grad():
        same = torch.allclose(hf(ids).logits, model.module(ids)[0], atol=1e-4)
    if next(hf.parameters()).dtype != torch.float32 or not same:
        raise RuntimeError("the transformers copy is not the same float32 model")


# ------------------------------------------------------------------ the implementations


def smolgpt_generate(model: "smolgpt.Model", s: Settings, batch: int) -> int:
    """The public call; returns the new tokens made (batch x s.new_tokens)."""
    texts = model.generate(
        model.tokenizer.decode(s.prompt_ids),
        max_new_tokens=s.new_tokens,
        temperature=s.temperature,
        top_k=s.top_k,
        num_samples=batch,
        seed=s.seed,
    )
    texts = [texts] if batch == 1 else texts
    return sum(len(model.tokenizer.encode(t)) - len(s.prompt_ids) for t in texts)


@torch.no_grad()
def generate_without_cache(module: GPT, s: Settings, batch: int) -> int:
    """Reference, not smolgpt's way: for every new token the whole context (its last
    block_size tokens) goes through the model again and only the last position's logits are
    used, so a token costs the work of the whole context instead of one position."""
    generator = torch.Generator().manual_seed(s.seed)
    ids = torch.tensor([s.prompt_ids] * batch)
    for _ in range(s.new_tokens):
        logits, _ = module(ids[:, -module.config.block_size :])
        logits = logits[:, -1, :] / s.temperature
        kth = torch.topk(logits, s.top_k).values[:, -1:]  # the k-th largest of each row
        probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return ids[:, len(s.prompt_ids) :].numel()


def transformers_generate(hf, s: Settings, batch: int) -> int:
    """transformers' generate as its documentation shows it; no end-of-text token, so every
    row gets s.new_tokens new tokens."""
    from transformers import GenerationConfig

    ids = torch.tensor([s.prompt_ids] * batch)
    config = GenerationConfig(
        do_sample=True,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=1.0,
        max_new_tokens=s.new_tokens,
        eos_token_id=None,
        pad_token_id=0,
    )
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[:, ids.size(1) :].numel()


# ---------------------------------------------------------------------------- measuring

# Ratios of median tokens/s recorded, each where both of its calls were measured.
RATIOS = {
    "ratio_smolgpt_vs_transformers": ("smolgpt", "transformers"),
    "ratio_int8_vs_transformers": ("smolgpt_int8", "transformers"),
    "ratio_int8_vs_float32": ("smolgpt_int8", "smolgpt"),
    "ratio_cache_vs_no_cache": ("smolgpt", "smolgpt_no_cache"),
}


def timed(call: Callable[[], int], expected: int) -> float:
    """New tokens per second of one call, which must make expected new tokens."""
    start = time.perf_counter()
    made = call()
    seconds = time.perf_counter() - start
    if made != expected:
        raise RuntimeError(f"a generation call made {made} new tokens, expected {expected}")
    return made / seconds


def measure(
    calls: dict[str, Callable[[], int]],
    expected: int,
    rounds: int,
    first_order: Optional[int] = None,
) -> dict:
    """Per-round tokens/s of each call, and the ratios of RATIOS; with first_order, first
    each call's first call, timed alone (see the module docstring)."""
    result: dict = {}
    if first_order is not None:
        first = {n: timed(calls[n], expected) for n in common.rotated(list(calls), first_order)}
        result["first_call_tokens_per_s"] = {k: round(v, 1) for k, v in first.items()}
        if "transformers" in calls:
            ratio = first["smolgpt"] / first["transformers"]
            result["first_call_ratio_smolgpt_vs_transformers"] = round(ratio, 2)
    rates: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds):
        for name in common.rotated(list(calls), r):
            rates[name].append(timed(calls[name], expected))
    result["tokens_per_s_rounds"] = {k: [round(x, 1) for x in v] for k, v in rates.items()}
    result["tokens_per_s_median"] = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    for key, (a, b) in RATIOS.items():
        if a in rates and b in rates:
            result[key] = round(common.median_ratio(rates[a], rates[b]), 2)
    return result


def measure_row(preset: str, batch: int, args, settings: Settings, folder: Path, row: int) -> dict:
    """One row of the table: preset's model at batch, inside the context and past it."""
    # Freshly loaded models for every batch: each first call is a user's first.
    model, int8 = smolgpt_model(preset, folder), smolgpt_model(preset, folder, "int8")
    hf = transformers_model(model, folder) if args.peer else None

    def calls(s: Settings, no_cache: bool) -> dict[str, Callable[[], int]]:
        made = {
            "smolgpt": lambda: smolgpt_generate(model, s, batch),
            "smolgpt_int8": lambda: smolgpt_generate(int8, s, batch),
        }
        if no_cache:
            made["smolgpt_no_cache"] = lambda: generate_without_cache(model.module, s, batch)
        if hf is not None:
            made["transformers"] = lambda: transformers_generate(hf, s, batch)
        return made

    load_before = os.getloadavg()[0]
    result = measure(calls(settings, True), batch * settings.new_tokens, args.rounds, row)
    if args.past_tokens:
        past = dataclasses.replace(settings, new_tokens=args.past_tokens)
        result["past_window"] = measure(calls(past, False), batch * past.new_tokens, args.rounds)
    if hf is not None:
        check_same_model(model, hf)
    result.update(
        batch=batch,
        load_average=[load_before, os.getloadavg()[0]],
        config={"preset": preset, "vocab_size": len(CHARS), **model.config.shape()},
    )
    return result


def _rate(name: str, part: Optional[str] = None) -> Callable[[dict], str]:
    """A table cell: the median tokens/s of name (of a row's part, e.g. "past_window")."""
    return lambda r: f"{(r[part] if part else r)['tokens_per_s_median'][name]:,.0f}"


def _ratio(key: str, part: Optional[str] = None, form: str = "{:.2f}x") -> Callable[[dict], str]:
    return lambda r: form.format((r[part] if part else r)[key])


def columns(peer: bool, past: bool) -> list[tuple[str, Callable[[dict], str]]]:
    """The table's columns after model and batch: (heading, cell of a row's result)."""
    cols = [
        ("smolgpt tok/s", _rate("smolgpt")),
        ("smolgpt, no cache tok/s", _rate("smolgpt_no_cache")),
        ("cache speed-up", _ratio("ratio_cache_vs_no_cache", form="{:.1f}x")),
        ("smolgpt int8 tok/s", _rate("smolgpt_int8")),
    ]
    if peer:
        cols += [
            ("transformers tok/s", _rate("transformers")),
            ("smolgpt / transformers", _ratio("ratio_smolgpt_vs_transformers", form="**{:.2f}x**")),
            (
                "smolgpt int8 / transformers",
                _ratio("ratio_int8_vs_transformers", form="**{:.2f}x**"),
            ),
        ]
    if past:
        cols += [
            ("past the window: smolgpt tok/s", _rate("smolgpt", "past_window")),
            ("past the window: smolgpt int8 tok/s", _rate("smolgpt_int8", "past_window")),
        ]
    if past and peer:
        cols += [
            ("past the window: transformers tok/s", _rate("transformers", "past_window")),
            (
                "past the window: smolgpt / transformers",
                _ratio("ratio_smolgpt_vs_transformers", "past_window"),
            ),
        ]
    cols.append(
        ("first call: smolgpt tok/s", lambda r: f"{r['first_call_tokens_per_s']['smolgpt']:,.0f}")
    )
    if peer:
        cols += [
            (
                "first call: transformers tok/s",
                lambda r: f"{r['first_call_tokens_per_s']['transformers']:,.0f}",
            ),
            (
                "first call: smolgpt / transformers",
                _ratio("first_call_ratio_smolgpt_vs_transformers"),
            ),
        ]
    return cols


def markdown_table(results: list[dict], peer: bool, past: bool) -> str:
    """One row per model and batch; the transformers columns only with peer, the columns
    past the window only with past."""
    cols = columns(peer, past)
    rows = []
    for r in results:
        c = r["config"]
        model = (
            f"{c['preset']} ({c['n_layer']}L/{c['n_head']}H/{c['n_embd']}, "
            f"T{c['block_size']}, V{c['vocab_size']})"
        )
        rows.append([model, r["batch"], *(cell(r) for _, cell in cols)])
    return common.markdown_table(["model", "batch", *(head for head, _ in cols)], rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="New tokens/s of generation: smolgpt (KV cache) in float32 and with int8 "
        "weights, smolgpt without the cache, and transformers' generate on the exported "
        "model, in one process, inside the context and past it; prints a markdown table and "
        "writes JSON."
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["nano", "micro", "tiny"],
        choices=["nano", "micro", "tiny", "small"],
        metavar="PRESET",
        help="preset shapes to run (default: nano micro tiny)",
    )
    parser.add_argument(
        "--batches",
        nargs="+",
        type=int,
        default=[1, 8],
        metavar="B",
        help="batch sizes: sequences generated at once (default: 1 8)",
    )
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=BLOCK_SIZE - len(PROMPT),
        help=f"new tokens per sequence (default: {BLOCK_SIZE - len(PROMPT)}, "
        "which fills the context)",
    )
    parser.add_argument(
        "--past-tokens",
        type=int,
        default=2 * BLOCK_SIZE,
        help=f"new tokens per sequence of the measurement past the window (default: "
        f"{2 * BLOCK_SIZE}, twice the context; 0 leaves it out)",
    )
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating rounds after the first calls; medians are reported (default: 3)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: nano, batches 1 and 2, 8 new tokens (past the window: 136), 1 round",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=common.OUT / "generation.json",
        help="JSON results file (default: benchmarks/out/generation.json)",
    )
    return parser


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    """The arguments, --quick's settings filled in, the token counts checked."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.configs, args.batches, args.new_tokens, args.rounds = ["nano"], [1, 2], 8, 1
        args.past_tokens = BLOCK_SIZE + len(PROMPT)  # 8 tokens past the window
    if not 0 < args.new_tokens <= BLOCK_SIZE - len(PROMPT):
        parser.error(
            f"--new-tokens must be in 1..{BLOCK_SIZE - len(PROMPT)}: the context "
            f"holds {BLOCK_SIZE} tokens, the prompt {len(PROMPT)}"
        )
    if args.past_tokens and args.past_tokens <= BLOCK_SIZE - len(PROMPT):
        parser.error(f"--past-tokens must be 0 or more than {BLOCK_SIZE - len(PROMPT)}")
    return args


def report(args: argparse.Namespace, results: list[dict], transformers, skipped) -> None:
    """Print the table under the machine, the settings and the load; write the record."""
    common.print_machine()
    if skipped:
        print(skipped + "\n")
    past = f" (past the window: {args.past_tokens})" if args.past_tokens else ""
    print(
        f"smolgpt {smolgpt.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), float32 (int8: smolgpt --quantize int8); "
        f"prompt {len(PROMPT)} tokens, {args.new_tokens} new tokens per sequence{past}, "
        f"temperature {args.temperature:g}, top-k {args.top_k}; new tokens/s, median of "
        f"{args.rounds} rounds; first call: the first generate call on a freshly loaded model"
    )
    # Other processes' load decides much on a small machine: every multi-threaded op
    # waits for a free core.
    loads = [x for r in results for x in r["load_average"]]
    print(
        f"1-minute load average during the run: {min(loads):.2f} to {max(loads):.2f} "
        f"({os.cpu_count()} CPUs)\n"
    )
    print(markdown_table(results, args.peer, bool(args.past_tokens)))
    print()
    common.print_command(__file__, args.argv)
    common.write_record(
        args.out,
        "generation",
        threads=torch.get_num_threads(),
        smolgpt=smolgpt.__version__,
        transformers=transformers.__version__ if args.peer else None,
        settings={
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "argv"
        },
        results=results,
    )


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    args.argv = argv
    transformers, missing = common.import_transformers()
    args.peer = transformers is not None
    skipped = None if args.peer else f"transformers columns skipped ({missing}): {INSTALL}"
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__ if args.peer else 'not available'}; median of "
        f"{args.rounds} alternating rounds",
        file=sys.stderr,
    )
    torch.ones(8, 8) @ torch.ones(8, 8)  # torch's own start-up, which no library is to pay
    settings = Settings(
        CharTokenizer(CHARS).encode(PROMPT), args.new_tokens, args.temperature, args.top_k
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="smolgpt-generation-") as scratch:
        for preset in args.configs:
            for batch in args.batches:
                print(f"measuring {preset}, batch {batch} ...", file=sys.stderr, flush=True)
                result = measure_row(preset, batch, args, settings, Path(scratch), len(results))
                results.append(result)
                rates = result["tokens_per_s_median"]
                print(
                    "  " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in rates.items()),
                    file=sys.stderr,
                    flush=True,
                )
    report(args, results, transformers, skipped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
