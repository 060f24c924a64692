"""What checking bytes on read costs: the token cache's CRC-32, and checkpoint checksums.

- Token cache: Sherlock Holmes repeated to --mb megabytes (as prepare.py makes it), prepared
  once at each level into an empty cache (what the cache saves on every later run), then
  opened again (the cached path: fingerprint of the text, checksum of tokens.bin, memory
  map), and the checksum of tokens.bin alone.
- Checkpoints: a real Trainer of the --preset (default small, 85M parameters) after one
  step, its ``state()`` being what train.py saves (weights, optimiser states, RNG states);
  ``checkpoint.save`` (checksums, and an atomic
  write with fsync) and ``checkpoint.load`` (checksums verified) against plain
  ``torch.save`` / ``torch.load`` of the same dictionary, and the checksums alone. Best of
  --repeats.

    python benchmarks/integrity.py
    python benchmarks/integrity.py --mb 20 --preset micro
    python benchmarks/integrity.py --source any.txt --mb 0.1 --preset nano --repeats 1  # smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import common
from common import MB


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def token_cache_rows(source: Path, mb: float, repeats: int, tmp: Path) -> list[dict]:
    from smolgpt import sources, tokencache

    corpus_path = tmp / "corpus.txt"
    common.make_corpus(source, mb, corpus_path)
    corpus = sources.Corpus("corpus", (corpus_path,))
    rows = []
    for level in ("char", "word"):
        os.environ["SMOLGPT_CACHE_DIR"] = str(tmp / f"cache-{level}")
        start = time.perf_counter()
        tokencache.prepare(corpus, level)
        build = time.perf_counter() - start
        (ids,) = (tmp / f"cache-{level}" / "tokens").glob("*/tokens.bin")
        rows.append(
            {
                "what": f"token cache, {level} level ({ids.stat().st_size / MB:.1f} MB of ids)",
                "without": build,  # a run without the cache tokenizes every time
                "with": best_seconds(lambda: tokencache.prepare(corpus, level), repeats),
                "check": best_seconds(lambda: tokencache.file_crc32(ids), repeats),
                "labels": ("first preparation", "cached open (checked)", "CRC-32 of tokens.bin"),
            }
        )
    return rows


def checkpoint_row(preset: str, repeats: int, tmp: Path) -> dict:
    import torch

    from smolgpt import checkpoint
    from smolgpt.config import preset_values

    # Sherlock's 3,171 words. One step of one short sequence: it gives the optimisers their
    # state, whose size (like the weights') does not depend on the batch.
    data = common.random_token_data(3171, "word", n_tokens=1000)
    trainer = common.cpu_trainer(
        data,
        **{
            **preset_values(preset, "word"),
            "preset": preset,
            "level": "word",
            "batch_size": 1,
            "block_size": 32,
        },
    )
    trainer.train_step()
    ckpt = trainer.state()
    plain, checked = tmp / "plain.pth", tmp / "checked.pth"
    plain_dict = ckpt.to_dict()
    save_plain = best_seconds(lambda: torch.save(plain_dict, plain), repeats)
    save_checked = best_seconds(lambda: checkpoint.save(checked, ckpt), repeats)
    load_plain = best_seconds(lambda: torch.load(plain, weights_only=True), repeats)
    load_checked = best_seconds(lambda: checkpoint.load(checked), repeats)
    loaded = torch.load(checked, weights_only=True)
    return {
        "what": f"{preset} checkpoint ({trainer.model.num_parameters() / 1e6:.1f}M parameters, "
        f"{checked.stat().st_size / MB:.0f} MB)",
        "save_plain": save_plain,
        "save_checked": save_checked,
        "load_plain": load_plain,
        "load_checked": load_checked,
        "checksums": best_seconds(lambda: checkpoint.checksums(loaded), repeats),
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=100.0, help="corpus size (default: 100)")
    parser.add_argument(
        "--source",
        type=Path,
        default=common.SHARED_DATA / "sherlock.txt",
        help="text to repeat (default: ../shared/data/sherlock.txt)",
    )
    parser.add_argument("--preset", default="small", help="checkpoint shape (default: small)")
    parser.add_argument("--repeats", type=int, default=3, help="best of (default: 3)")
    parser.add_argument(
        "--out",
        type=Path,
        default=common.OUT / "integrity.json",
        help="JSON results file (default: benchmarks/out/integrity.json)",
    )
    args = parser.parse_args(argv)
    if not args.source.is_file():
        parser.error(f"{args.source} not found: pass --source")

    with tempfile.TemporaryDirectory(prefix="smolgpt-integrity-") as tmp:
        print(f"preparing a {args.mb:g} MB corpus at two levels ...", file=sys.stderr, flush=True)
        cache = token_cache_rows(args.source, args.mb, args.repeats, Path(tmp))
        print(f"saving and loading a {args.preset} checkpoint ...", file=sys.stderr, flush=True)
        ckpt = checkpoint_row(args.preset, args.repeats, Path(tmp))

    common.print_machine()
    print(
        common.markdown_table(
            [
                "token cache",
                "first preparation s",
                "cached open s (checked)",
                "CRC-32 of tokens.bin s",
            ],
            [
                [r["what"], f"{r['without']:.2f}", f"{r['with']:.3f}", f"{r['check']:.3f}"]
                for r in cache
            ],
        )
    )
    print()
    print(
        common.markdown_table(
            [
                "checkpoint",
                "torch.save s",
                "checkpoint.save s (checksums, atomic write with fsync)",
                "torch.load s",
                "checkpoint.load s (checksums verified)",
                "checksums alone s",
            ],
            [
                [
                    ckpt["what"],
                    *(
                        f"{ckpt[k]:.2f}"
                        for k in (
                            "save_plain",
                            "save_checked",
                            "load_plain",
                            "load_checked",
                            "checksums",
                        )
                    ),
                ]
            ],
        )
    )
    print(f"\nBest of {args.repeats}; MB = 10^6 bytes.")
    common.print_command(__file__, argv)
    common.write_record(
        args.out,
        "integrity",
        settings={"mb": args.mb, "preset": args.preset, "repeats": args.repeats},
        token_cache=cache,
        checkpoint=ckpt,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
