"""What ``smolgpt serve`` costs over generating in process: new tokens/s of one request, the
wait for its first streamed token, and requests at once.

For each preset shape a random-initialised model is saved and loaded as in generation.py
(the cost of a step does not depend on what the weights learned). The peer is the same model
in this process, ``smolgpt.load(...).generate``; the server is ``python -m smolgpt serve`` in
a subprocess on 127.0.0.1 (``--parallel`` at its default, 4), spoken to over plain HTTP.
Each round, in an order rotated every round, measures:

- in process: ``generate(prompt, max_new_tokens=N)``, N new tokens over its wall time;
- server: one ``POST /v1/completions`` for N tokens, over the request's wall time (JSON,
  HTTP and the token-by-token hand-over to the server's worker thread included);
- stream: the same with ``"stream": true``: tokens/s, and the time to the first event that
  carries text;
- concurrent: C streaming requests at once (threads), all tokens over the wall time of the
  whole batch, and the slowest request's time.

The table gives medians over rounds; server / in process is the median of the rounds'
ratios. Every request asks for the same seed and settings (temperature 0.8, top-k 40), and
the server's text is checked to equal the in-process text.

    python benchmarks/serving.py                       # nano and micro, 200 tokens, 5 rounds
    python benchmarks/serving.py --quick               # smoke: nano, 8 tokens, 1 round
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from common import (
    OUT,
    markdown_table,
    median_ratio,
    print_command,
    print_machine,
    rotated,
    write_record,
)

PROMPT = "ROMEO:\nI"
SAMPLING = {"temperature": 0.8, "top_k": 40, "seed": 1337}


class Server:
    """``python -m smolgpt serve CHECKPOINT --port 0`` in a subprocess."""

    def __init__(self, checkpoint: Path, logs: Path):
        self._err = open(logs, "w+", encoding="utf-8")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "smolgpt",
                "serve",
                str(checkpoint),
                "--port",
                "0",
                "--max_tokens",
                "100000",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._err,
        )
        deadline = time.monotonic() + 120
        while not (found := re.search(r"at http://127\.0\.0\.1:(\d+)/ ", logs.read_text())):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{logs.read_text()}")
            time.sleep(0.05)
        self.port = int(found.group(1))

    def _post(self, body: dict) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"status {response.status}: {response.read()[:500]!r}")
        return response

    def complete(self, tokens: int) -> str:
        body = {"prompt": PROMPT, "max_tokens": tokens, **SAMPLING}
        return json.loads(self._post(body).read())["choices"][0]["text"]

    def stream(self, tokens: int) -> tuple[str, float]:
        """The text, and the seconds until its first piece arrived."""
        started = time.perf_counter()
        first, text = None, []
        response = self._post({"prompt": PROMPT, "max_tokens": tokens, "stream": True, **SAMPLING})
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            piece = json.loads(line[6:])["choices"][0]["text"]
            if piece and first is None:
                first = time.perf_counter() - started
            text.append(piece)
        return "".join(text), first

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self._err.close()


def measure(preset: str, tokens: int, rounds: int, concurrent: int, folder: Path) -> dict:
    from generation import smolgpt_model

    model = smolgpt_model(preset, folder)
    server = Server(folder / f"{preset}.pth", folder / f"{preset}-server.log")
    try:
        expected = model.generate(PROMPT, max_new_tokens=tokens, **SAMPLING)[len(PROMPT) :]
        times: dict[str, list[float]] = {k: [] for k in ("local", "server", "stream")}
        first_token, batch_wall, slowest = [], [], []

        def local():
            model.generate(PROMPT, max_new_tokens=tokens, **SAMPLING)

        def served():
            if server.complete(tokens) != expected:
                raise RuntimeError("the server's text is not the in-process text")

        def streamed():
            text, first = server.stream(tokens)
            if text != expected:
                raise RuntimeError("the streamed text is not the in-process text")
            first_token.append(first)

        def at_once():
            started = time.perf_counter()
            with ThreadPoolExecutor(concurrent) as pool:
                ends = list(
                    pool.map(
                        lambda _: (server.stream(tokens), time.perf_counter() - started)[1],
                        range(concurrent),
                    )
                )
            batch_wall.append(time.perf_counter() - started)
            slowest.append(max(ends))

        calls = {"local": local, "server": served, "stream": streamed, "concurrent": at_once}
        for r in range(rounds):
            for name in rotated(list(calls), r):
                started = time.perf_counter()
                calls[name]()
                if name in times:
                    times[name].append(time.perf_counter() - started)
    finally:
        server.stop()
    speed = {k: [tokens / t for t in v] for k, v in times.items()}
    return {
        "preset": preset,
        "tokens": tokens,
        "rounds": rounds,
        "concurrent": concurrent,
        "parameters": model.module.num_parameters(),
        "in_process_tok_s": statistics.median(speed["local"]),
        "server_tok_s": statistics.median(speed["server"]),
        "stream_tok_s": statistics.median(speed["stream"]),
        "first_token_ms": 1000 * statistics.median(first_token),
        "concurrent_tok_s": statistics.median(concurrent * tokens / w for w in batch_wall),
        "concurrent_slowest_s": statistics.median(slowest),
        "server_over_in_process": median_ratio(speed["server"], speed["local"]),
        "stream_over_in_process": median_ratio(speed["stream"], speed["local"]),
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["nano", "micro"])
    parser.add_argument("--tokens", type=int, default=200, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrent", type=int, default=8, help="requests at once")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: nano, 8 tokens, 1 round, 2 at once"
    )
    parser.add_argument("--out", type=Path, default=OUT / "serving.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.presets, args.tokens, args.rounds, args.concurrent = ["nano"], 8, 1, 2
    print_machine()
    with tempfile.TemporaryDirectory() as folder:
        results = [
            measure(p, args.tokens, args.rounds, args.concurrent, Path(folder))
            for p in args.presets
        ]
    c = args.concurrent
    print(
        markdown_table(
            [
                "model",
                "in process tok/s",
                "server tok/s",
                "stream tok/s",
                "first token ms",
                f"{c} at once: tok/s",
                f"{c} at once: slowest s",
                "server / in process",
                "stream / in process",
            ],
            [
                [
                    f"{r['preset']} ({r['parameters'] / 1e6:.2f}M)",
                    f"{r['in_process_tok_s']:.0f}",
                    f"{r['server_tok_s']:.0f}",
                    f"{r['stream_tok_s']:.0f}",
                    f"{r['first_token_ms']:.1f}",
                    f"{r['concurrent_tok_s']:.0f}",
                    f"{r['concurrent_slowest_s']:.2f}",
                    f"{r['server_over_in_process']:.2f}",
                    f"{r['stream_over_in_process']:.2f}",
                ]
                for r in results
            ],
        )
    )
    print(f"\n{args.tokens} new tokens per request, median of {args.rounds} rounds.")
    print_command(__file__, argv)
    write_record(args.out, "serving", results=results, argv=sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
