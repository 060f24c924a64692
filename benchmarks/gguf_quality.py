"""What a model loses on its way into llama.cpp: bits per character of a held-out text, scored
by llama.cpp (through llama-cpp-python) on each GGUF export (f32, f16, q8_0), beside
``smolgpt eval`` of the same model on the same windows; prints a markdown table and writes
JSON.

The windows are smolgpt eval's (block_size tokens of context, every token after the first
predicted once, see smolgpt.evaluate.window_starts), and llama.cpp runs with its defaults,
as a user gets it (its key-value cache in float16). Needs the gguf and llamacpp extras.

    python benchmarks/gguf_quality.py checkpoints/char_micro            # its validation text
    python benchmarks/gguf_quality.py MODEL --data held_out.txt
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path
from typing import Optional

import common


def llama_bits_per_char(path: Path, ids: list[int], chars: int, block_size: int) -> float:
    """Bits per character of the text whose ids these are, by llama.cpp on the GGUF file."""
    import numpy as np
    from llama_cpp import Llama

    from smolgpt.evaluate import window_starts

    llama = Llama(
        model_path=str(path), n_ctx=block_size, n_batch=block_size, logits_all=True, verbose=False
    )
    nats = 0.0
    for start in window_starts(len(ids), block_size):
        window = ids[start : start + block_size + 1]
        llama.reset()
        llama.eval(window[:-1])
        scores = np.array(llama.scores[: len(window) - 1], dtype=np.float64)
        top = scores.max(axis=1, keepdims=True)
        log_z = (top + np.log(np.exp(scores - top).sum(axis=1, keepdims=True)))[:, 0]
        nats += float((log_z - scores[np.arange(len(window) - 1), window[1:]]).sum())
    return nats / (math.log(2) * chars)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a checkpoint, run directory or export (char or bpe level)")
    parser.add_argument("--data", type=Path, help="text to score (default: its validation text)")
    parser.add_argument(
        "--out",
        type=Path,
        default=common.OUT / "gguf_quality.json",
        help="JSON results file (default: benchmarks/out/gguf_quality.json)",
    )
    args = parser.parse_args(argv)
    import smolgpt

    model = smolgpt.load(args.model, device="cpu")
    text = args.data.read_text(encoding="utf-8") if args.data else model.validation_text()[0]
    ours = model.evaluate(text).bits_per_char
    ids = model.tokenizer.encode(text)
    rows = []
    with tempfile.TemporaryDirectory(prefix="smolgpt-gguf-") as tmp:
        for outtype in ("f32", "f16", "q8_0"):
            print(f"exporting and scoring {outtype} ...", file=sys.stderr, flush=True)
            path = model.export(Path(tmp) / f"{outtype}.gguf", "gguf", outtype=outtype)
            bits = llama_bits_per_char(path, ids, len(text), model.config.block_size)
            size = path.stat().st_size / 2**20
            rows.append({"outtype": outtype, "mib": size, "bits_per_char": bits})
    common.print_machine()
    print(f"{args.model}: {len(text):,} characters, {len(ids):,} tokens; smolgpt eval {ours:.4f}")
    print()
    print(
        common.markdown_table(
            ["export", "file MiB", "llama.cpp bits/char", "smolgpt eval bits/char", "difference"],
            [
                [
                    r["outtype"],
                    f"{r['mib']:.2f}",
                    f"{r['bits_per_char']:.4f}",
                    f"{ours:.4f}",
                    f"{r['bits_per_char'] - ours:+.4f}",
                ]
                for r in rows
            ],
        )
    )
    common.print_command(__file__, argv)
    common.write_record(
        args.out, "gguf_quality", model=str(args.model), chars=len(text), smolgpt=ours, exports=rows
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
