"""Char, word and bpe level side by side: bits per character on the same held-out text after
the same time budget, training throughput, and a sample of each.

For each corpus, every level trains the same preset with the same --time_budget on the whole
text, each with its own 90/10 split for evaluations and the best checkpoint (char and word
level split the tokens, bpe level the text, so the three validation splits start at slightly
different places). The score is then ``smolgpt eval --data HELD_OUT`` of each best
checkpoint (the same function, called in this process), where HELD_OUT is the end of the
text that lies in every level's validation split: from the first line break after the
latest of their starts. No model trained on it, and the bpe tokenizer never saw it. Char and
word vocabularies are learned from the whole text, as those levels always do, so they have
seen its characters and words; bpe's has not.

Bits per character divides each model's total cost by the same characters, so the levels
compare, unlike loss per token. Throughput: tokens trained per second of the run (evaluations
included) and the characters those tokens stand for.

    python benchmarks/levels.py --preset micro --time-budget 120    # docs/performance.md's table
    python benchmarks/levels.py --preset nano --time-budget 60 --levels bpe:512 bpe:1024 \\
        bpe:2048 bpe:4096 --samples 0                                       # a vocabulary sweep
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import common


def corpora(names: list[str]) -> dict[str, str]:
    """name -> --data: sherlock is ../shared/data/sherlock.txt (the same text as the built-in
    'sherlock', without a download), shakespeare the built-in corpus; anything else a path."""
    found = {}
    for name in names:
        if name == "sherlock":
            found[name] = str(common.SHARED_DATA / "sherlock.txt")
        elif name == "shakespeare":
            found[name] = "shakespeare"
        else:
            found[Path(name).stem] = name
    return found


def run_smolgpt(*args: object, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SMOLGPT_CACHE_DIR": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "smolgpt", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def checked(result: subprocess.CompletedProcess) -> str:
    if result.returncode:
        raise SystemExit(f"{' '.join(result.args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def held_out(spec: str, levels: set[str], cache: Path, folder: Path) -> Path:
    """The end of the text that lies in the validation split of every level of levels,
    written to folder: from the first line break after the latest of their starts."""
    os.environ["SMOLGPT_CACHE_DIR"] = str(cache)  # (a built-in corpus is built there)
    from smolgpt import sources, tokencache

    corpus = sources.resolve_corpus(spec)
    text = "".join(sources.iter_text(corpus))
    starts = [sources.text_cut(corpus)]  # bpe level's
    for level in levels - {"bpe"}:
        tokens = tokencache.prepare(corpus, level)  # (cached: its training run reads it again)
        # (Normalising keeps the length, but for a byte-order mark: close enough here.)
        starts.append(len(text) - len(tokens.val_text()))
    start = text.find("\n", max(starts)) + 1
    if not 0 < start < len(text):
        raise SystemExit(f"{spec}: no line break in the validation splits to start from")
    path = folder / "held_out.txt"
    path.write_text(text[start:], encoding="utf-8")
    print(
        f"  {spec}: held-out text from character {start:,} of {len(text):,} (validation "
        f"splits start at {', '.join(f'{s:,}' for s in starts)})",
        file=sys.stderr,
    )
    return path


def run_level(
    name: str, spec: str, entry: str, args, folder: Path, cache: Path, held: Path
) -> dict:
    level, _, vocab = entry.partition(":")
    out_dir = folder / entry.replace(":", "_")
    flags = [
        "--level",
        level,
        "--preset",
        args.preset,
        "--data",
        spec,
        "--time_budget",
        args.time_budget,
        "--out_dir",
        out_dir,
        "--no-plot",
        *args.extra.split(),
    ]
    if vocab:
        flags += ["--vocab_size", vocab]
    print(f"  {name} {entry}: training {args.time_budget:g} s ...", file=sys.stderr, flush=True)
    checked(run_smolgpt("train", *flags, cache=cache))
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]
    # Scored here, as `smolgpt eval` scores (the same function), without a process each.
    import smolgpt

    model = smolgpt.load(out_dir / "best_model.pth")
    score = model.evaluate(held.read_text(encoding="utf-8")).to_dict()
    own = model.evaluate().to_dict()  # its own validation split
    sample = ""
    if args.samples:  # generate.py's defaults: temperature 0.8, top_k 50
        sample = model.generate(args.prompt, max_new_tokens=args.samples, seed=1337)
    chars_per_token = score["chars"] / score["tokens"]
    row = {
        "corpus": name,
        "level": level,
        "entry": entry,
        "vocab_size": model.config.vocab_size,
        "iterations": last["iter"],
        "elapsed_s": last["elapsed_s"],
        "tokens_per_s": last["tokens"] / last["elapsed_s"],
        "chars_per_token": chars_per_token,
        "held_out": score,
        "own_split": own,
        "best_val_loss": min(m["val_loss"] for m in metrics),
        "sample": sample,
    }
    print(
        f"    {row['iterations']} steps, {row['tokens_per_s']:,.0f} tokens/s, held-out "
        f"{score['bits_per_char']:.4f} bits/char",
        file=sys.stderr,
        flush=True,
    )
    return row


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Char, word and bpe level at the same preset and --time_budget: bits per "
        "character on the same held-out text, throughput, samples; prints a markdown table."
    )
    parser.add_argument("--preset", default="micro", help="preset for every run (default: micro)")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=120.0,
        help="--time_budget of every run, seconds (default: 120)",
    )
    parser.add_argument(
        "--levels",
        nargs="+",
        default=["char", "word", "bpe"],
        help="char, word, bpe (the preset's vocab_size) or bpe:N (default: char word bpe)",
    )
    parser.add_argument(
        "--corpora",
        nargs="+",
        default=["sherlock", "shakespeare"],
        help="sherlock (../shared/data/sherlock.txt), shakespeare (built in), "
        "or text files (default: sherlock shakespeare)",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=60,
        help="tokens of the sample printed for each run (0: none; default: 60)",
    )
    parser.add_argument("--prompt", default="The ", help="the samples' prompt (default: 'The ')")
    parser.add_argument("--extra", default="", help="more train flags for every run (tests)")
    parser.add_argument(
        "--out",
        type=Path,
        default=common.OUT / "levels.json",
        help="JSON results file (default: benchmarks/out/levels.json)",
    )
    args = parser.parse_args(argv)
    for entry in args.levels:
        level, _, vocab = entry.partition(":")
        if level not in ("char", "word", "bpe") or (
            vocab and (level != "bpe" or not vocab.isdigit())
        ):
            parser.error(f"--levels: {entry!r} is not char, word, bpe or bpe:N")

    rows: list[dict] = []
    settings = vars(args) | {"out": str(args.out)}
    with tempfile.TemporaryDirectory(prefix="smolgpt-levels-") as tmp:
        cache = Path(tmp) / "cache"
        for name, spec in corpora(args.corpora).items():
            folder = Path(tmp) / name
            folder.mkdir()
            held = held_out(spec, {e.partition(":")[0] for e in args.levels}, cache, folder)
            for entry in args.levels:
                rows.append(run_level(name, spec, entry, args, folder, cache, held))
                # Kept as it goes: a long sweep that fails later loses nothing measured.
                common.write_record(args.out, "levels", settings=settings, results=rows)

    common.print_machine()
    head = [
        "corpus",
        "level",
        "vocab",
        "steps",
        "tokens/s",
        "chars/token",
        "chars/s",
        "held-out bits/char",
        "own val bits/char",
    ]
    cells = [
        [
            r["corpus"],
            r["level"],
            f"{r['vocab_size']:,}",
            f"{r['iterations']:,}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['chars_per_token']:.2f}",
            f"{r['tokens_per_s'] * r['chars_per_token']:,.0f}",
            f"{r['held_out']['bits_per_char']:.4f}",
            f"{r['own_split']['bits_per_char']:.4f}",
        ]
        for r in rows
    ]
    print(common.markdown_table(head, cells))
    print()
    print(
        f"Preset {args.preset}, --time_budget {args.time_budget:g} s each. Held-out: the "
        "end of the text in every level's validation split, scored by `smolgpt eval "
        "--data` on each best checkpoint; own val: the run's own validation split. "
        "Tokens/s over the whole run, evaluations included."
    )
    for r in rows:
        if r["sample"]:
            print(f"\n{r['corpus']}, {r['entry']}:\n```\n{r['sample'].strip()}\n```")
    common.print_command(__file__, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
