"""Progress of a long pass over a corpus (hashing it, learning its vocabulary, encoding it):
a bar with megabytes, MB/s and the time left on a terminal, and a line in the log now and
then elsewhere (a job's log file, a notebook). A pass that ends within a second shows
nothing, so small corpora stay quiet."""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional

from tqdm import tqdm

log = logging.getLogger(__name__)

MB = 1_000_000
SHOW_AFTER_S = 1.0  # a pass quicker than this shows no bar
LOG_EVERY_S = 30.0  # away from a terminal: a line this often


class PassMeter:
    """Progress through total bytes of text. Call :meth:`to` with the bytes done so far
    (as often as you like: the terminal bar redraws a few times a second, a log line comes
    every LOG_EVERY_S) and :meth:`close` at the end (or use it as a context manager)."""

    def __init__(self, what: str, total: int):
        self.what, self.total = what, max(total, 1)
        self.start = self.last_line = time.monotonic()
        self.bar: Optional[tqdm] = None
        if sys.stderr.isatty():
            self.bar = tqdm(
                total=self.total,
                desc=what,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                delay=SHOW_AFTER_S,
                leave=False,
                file=sys.stderr,
                dynamic_ncols=True,
                # encoding big.txt:  41%|████      | 412MB/1.00GB [01:40<02:24, 4.10MB/s]
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B "
                "[{elapsed}<{remaining}, {rate_fmt}]",
            )

    def to(self, done: int) -> None:
        """done bytes of total are through."""
        done = min(done, self.total)
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            return
        now = time.monotonic()
        if now - self.last_line >= LOG_EVERY_S and done:
            self.last_line = now
            rate = done / (now - self.start)
            log.info(
                "%s: %.0f of %.0f MB, %.1f MB/s, about %s left",
                self.what,
                done / MB,
                self.total / MB,
                rate / MB,
                _duration((self.total - done) / rate),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "PassMeter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _duration(seconds: float) -> str:
    """45 s, 3 min 20 s, 1 h 05 min."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
