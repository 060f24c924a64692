"""Corpus preparation throughput: smolgpt.tokencache.prepare at char, word and bpe level, in MB/s.

The corpus (default: sherlock.txt repeated to about --mb megabytes) is written to a
temporary file. Each measurement runs in its own subprocess with a fresh, empty
SMOLGPT_CACHE_DIR, so nothing is cached: it is the first-run cost (fingerprint, learning the
vocabulary, encoding, writing the ids). Per measurement it reports:

- MB/s: corpus bytes / seconds spent inside ``prepare`` (imports excluded), and the wall
  time of the whole subprocess;
- peak RSS, from that subprocess's own rusage (os.wait4): the main process's peak, and the
  peak of the largest worker process (RUSAGE_CHILDREN inside it);
- the number of tokenizer worker processes prepare used (1: no process pool).

Levels alternate in rounds and the median round is reported. The peer, "tokenizers", is the
tokenizers library alone doing what bpe level does (learn GPT-2-style byte-level BPE from
the file, then encode all of it, on every core), without smolgpt's hashing, cache and split.

    python benchmarks/prepare.py                 # 20 MB, char and word, 3 rounds
    python benchmarks/prepare.py --mb 100 --levels word --rounds 1
    python benchmarks/prepare.py --mb 100 --levels bpe tokenizers --rounds 1
    python benchmarks/prepare.py --source any.txt --mb 0.1 --rounds 1   # smoke test: seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import common
from common import MB


def peer(path: str, vocab_size: int) -> dict:
    """The tokenizers library alone: learn byte-level BPE from the file, encode it all."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    start = time.perf_counter()
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    learner.train(
        [path],
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokens = 0
    with open(path, encoding="utf-8") as f:
        while lines := f.readlines(1 << 22):
            tokens += sum(len(e.ids) for e in learner.encode_batch_fast(lines))
    return {
        "seconds": time.perf_counter() - start,
        "tokens": tokens,
        "vocab_size": learner.get_vocab_size(),
        "workers": 1,
        "process_pools": 0,
    }


def child(level: str, path: str, min_word_freq: int, vocab_size: int) -> None:
    """Runs in the measured subprocess: prepare once, print one JSON line."""
    import resource
    from concurrent import futures

    from smolgpt import sources, tokencache

    # Count the workers of every process pool prepare opens (0 pools: single process).
    pools: list[int] = []
    original = futures.ProcessPoolExecutor

    class CountingPool(original):  # type: ignore[misc, valid-type]
        def __init__(self, max_workers=None, *args, **kwargs):
            pools.append(max_workers or os.cpu_count() or 1)
            super().__init__(max_workers, *args, **kwargs)

    tokencache.ProcessPoolExecutor = CountingPool
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if level == "tokenizers":
        result = peer(path, vocab_size)
    else:
        corpus = sources.resolve_corpus(path)
        start = time.perf_counter()
        tokens = tokencache.prepare(
            corpus, level, min_word_freq, vocab_size=vocab_size if level == "bpe" else None
        )
        result = {
            "seconds": time.perf_counter() - start,
            "tokens": len(tokens.train) + len(tokens.val),
            "vocab_size": tokens.tokenizer.vocab_size,
            "workers": max(pools, default=1),
            "process_pools": len(pools),
        }
    print(
        json.dumps(
            {
                **result,
                "rss_main_before_kb": rss_before_kb,  # imports (torch, numpy) before prepare
                "rss_main_peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "rss_largest_worker_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
            }
        )
    )


def _children(pid: int) -> list[int]:
    """The pids of pid's descendants (Linux /proc)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids + [d for k in kids for d in _children(k)]


def _pss_kb(pid: int) -> int:
    """pid's proportional set size in KB: its private memory plus its share of what it
    shares (forked workers share the main process's pages; summing RSS would count
    them once per process)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory(threading.Thread):
    """Samples, every 0.1 s, the summed PSS of a process and all its descendants; keeps the
    peak (KB): the memory of all the processes at once."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_kb, self.stopped = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.1):
            total = sum(_pss_kb(p) for p in [self.pid, *_children(self.pid)])
            self.peak_kb = max(self.peak_kb, total)


def measure(level: str, corpus: Path, min_word_freq: int, vocab_size: int, tmp_root: Path) -> dict:
    """prepare() once in a fresh subprocess with an empty cache; its results, its wall time,
    and its peak RSS from os.wait4 (this child's own rusage, so per measurement)."""
    with tempfile.TemporaryDirectory(prefix="smolgpt-measure-", dir=tmp_root) as tmp:
        cache = Path(tmp) / "cache"  # fresh and empty: nothing is cached
        env = {**os.environ, "SMOLGPT_CACHE_DIR": str(cache)}
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--_child",
            level,
            str(corpus),
            "--min-word-freq",
            str(min_word_freq),
            "--vocab-size",
            str(vocab_size),
        ]
        start = time.perf_counter()
        err_path = Path(tmp) / "stderr.txt"
        with open(err_path, "w") as err_file:
            proc = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=err_file, text=True, env=env
            )
        memory = TreeMemory(proc.pid)
        memory.start()
        try:
            out = proc.stdout.read()
            proc.stdout.close()
            memory.stopped.set()
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C: do not leave the child running
            proc.kill()
            proc.wait()
            raise
        memory.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        err = err_path.read_text()
    if proc.returncode:
        raise SystemExit(f"prepare failed at {level} level (exit {proc.returncode}):\n{err}")
    result = json.loads(out.strip().splitlines()[-1])
    result["wall_s"] = wall
    # Linux: the larger of the child's own peak and its descendants' (KB).
    result["rss_tree_max_kb"] = usage.ru_maxrss
    result["pss_all_peak_kb"] = memory.peak_kb
    return result


def markdown_table(rows: list[dict]) -> str:
    head = [
        "level",
        "corpus MB",
        "tokens",
        "vocab",
        "prepare s",
        "MB/s",
        "process wall s",
        "workers",
        "peak RSS main MB",
        "peak RSS largest worker MB",
        "peak memory, all processes MB",
    ]
    cells = []
    for r in rows:
        m = r["median"]
        worker_rss = f"{m['rss_largest_worker_kb'] / 1024:,.0f}" if m["process_pools"] else "-"
        cells.append(
            [
                r["level"],
                f"{r['corpus_bytes'] / MB:.1f}",
                f"{m['tokens']:,}",
                f"{m['vocab_size']:,}",
                f"{m['seconds']:.2f}",
                f"{r['corpus_bytes'] / MB / m['seconds']:.2f}",
                f"{m['wall_s']:.2f}",
                str(m["workers"]),
                f"{m['rss_main_peak_kb'] / 1024:,.0f}",
                worker_rss,
                f"{m['pss_all_peak_kb'] / 1024:,.0f}",
            ]
        )
    return common.markdown_table(head, cells)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="First-run corpus preparation throughput (MB/s) of smolgpt.tokencache.prepare "
        "at char, word and bpe level (and the tokenizers library alone, as a peer), each "
        "measurement in a fresh subprocess with an empty cache; "
        "prints a markdown table and writes JSON."
    )
    parser.add_argument(
        "--mb",
        type=float,
        default=20.0,
        help="corpus size in megabytes (10^6 bytes) of --source repeated (default: 20)",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=common.SHARED_DATA / "sherlock.txt",
        help="text to repeat (default: ../shared/data/sherlock.txt from the repository root)",
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="use this text file as it is instead of a repeated --source",
    )
    parser.add_argument(
        "--levels",
        nargs="+",
        choices=("char", "word", "bpe", "tokenizers"),
        default=["char", "word", "bpe", "tokenizers"],
        help="levels to measure; tokenizers: the library alone, learning and "
        "encoding bpe (default: all)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating rounds; the median is reported (default: 3)",
    )
    parser.add_argument(
        "--min-word-freq",
        type=int,
        default=3,
        help="word level min_word_freq (default: 3, smolgpt's default)",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=2048,
        help="bpe (and tokenizers) vocabulary size (default: 2048)",
    )
    parser.add_argument(
        "--tmp-dir",
        type=Path,
        default=None,
        help="where the corpus and the fresh caches go (default: system temp)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=common.OUT / "prepare.json",
        help="JSON results file (default: benchmarks/out/prepare.json)",
    )
    parser.add_argument("--_child", nargs=2, metavar=("LEVEL", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._child:
        child(args._child[0], args._child[1], args.min_word_freq, args.vocab_size)
        return 0

    with tempfile.TemporaryDirectory(prefix="smolgpt-prepare-bench-", dir=args.tmp_dir) as tmp:
        tmp_root = Path(tmp)
        if args.corpus is not None:
            corpus, source = args.corpus, args.corpus
        else:
            if not args.source.is_file():
                parser.error(f"{args.source} not found: pass --source or --corpus")
            corpus, source = tmp_root / f"corpus-{args.mb:g}MB.txt", args.source
            common.make_corpus(args.source, args.mb, corpus)
        size = corpus.stat().st_size
        print(
            f"corpus: {size / MB:.1f} MB ({source}); {os.cpu_count()} CPUs; "
            f"{args.rounds} alternating rounds, fresh SMOLGPT_CACHE_DIR per measurement",
            file=sys.stderr,
            flush=True,
        )
        runs: dict[str, list[dict]] = {level: [] for level in args.levels}
        for r in range(args.rounds):
            for level in common.rotated(args.levels, r):
                res = measure(level, corpus, args.min_word_freq, args.vocab_size, tmp_root)
                runs[level].append(res)
                print(
                    f"  round {r + 1} {level}: {res['seconds']:.2f}s in prepare "
                    f"({size / MB / res['seconds']:.2f} MB/s), {res['workers']} worker(s), "
                    f"peak RSS {res['rss_main_peak_kb'] / 1024:,.0f} MB, "
                    f"all processes {res['pss_all_peak_kb'] / 1024:,.0f} MB",
                    file=sys.stderr,
                    flush=True,
                )

    rows = []
    for level, results in runs.items():
        med_seconds = statistics.median(x["seconds"] for x in results)
        median = min(results, key=lambda x: abs(x["seconds"] - med_seconds))  # the median run
        rows.append(
            {
                "level": level,
                "corpus_bytes": size,
                "median": median,
                "mb_per_s_median": size / MB / median["seconds"],
                "mb_per_s_rounds": [size / MB / x["seconds"] for x in results],
                "runs": results,
            }
        )
    common.print_machine()
    print(markdown_table(rows))
    print()
    print(
        'MB = 10^6 bytes. "prepare s" is the time inside smolgpt.tokencache.prepare (fingerprint, '
        'vocabulary, encoding, writing ids), with an empty cache; "process wall s" adds '
        "interpreter start and imports. Peak RSS: the measuring process (torch is imported) "
        "and its largest tokenizer worker, from rusage. Peak memory, all processes: the "
        "largest sum of the proportional set sizes (PSS) of the process and its workers, "
        "sampled every 0.1 s (shared pages counted once). The rate is MB/s of the text."
    )
    common.print_command(__file__, argv)
    common.write_record(
        args.out,
        "prepare",
        settings={
            "mb": args.mb,
            "source": str(source),
            "corpus_bytes": size,
            "levels": args.levels,
            "rounds": args.rounds,
            "min_word_freq": args.min_word_freq,
            "vocab_size": args.vocab_size,
        },
        results=rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
