"""Signals that end a training run cleanly: SIGINT (Ctrl-C), SIGTERM (a scheduler's stop)
and SIGHUP (a closed terminal), recorded by :class:`SignalFlag` for the loop to act on
between steps."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Iterator, Optional

import torch

from .distributed import Group

log = logging.getLogger(__name__)


class SignalFlag:
    """Record SIGINT, SIGTERM and SIGHUP (a closed terminal or a dropped SSH session)
    instead of dying mid-step; a second signal stops at once. The training loop reads
    ``signum`` after each step, and an evaluation between its batches (it sets
    ``evaluating`` meanwhile, so that the warning says which will happen). Python lets only
    the main thread handle signals: elsewhere this does nothing.

    A repeat within REPEAT_GRACE_S of the first is not a second request: Ctrl-C reaches
    every process of a torchrun launch from the terminal, and torchrun then forwards it."""

    # SIGHUP does not exist on Windows.
    SIGNALS = tuple(
        getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
    )
    REPEAT_GRACE_S = 2.0

    def __init__(self):
        self.signum: Optional[int] = None  # also set when another rank received one
        self.received_at: Optional[float] = None  # when this process first received one
        self.evaluating = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if signum == getattr(signal, "SIGHUP", None):
            self._silence_closed_terminal()
        now = time.monotonic()
        if self.received_at is not None:
            if now - self.received_at >= self.REPEAT_GRACE_S:  # asked twice: the user means it
                raise KeyboardInterrupt
            return
        self.received_at = now
        if self.signum is None:
            self.signum = signum
        doing = "stopping the evaluation" if self.evaluating else "finishing this step"
        log.warning(
            "%s received: %s and saving (again to stop at once)", signal.Signals(signum).name, doing
        )

    @staticmethod
    def _silence_closed_terminal() -> None:
        """Send stdout and stderr to /dev/null where they went to a terminal that has closed
        (SIGHUP's usual cause). Every write to a closed terminal fails, and a failed progress
        line would end the run before it saves; an empty write tells, and costs nothing."""
        for fd in (1, 2):
            try:
                os.write(fd, b"")
            except OSError:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, fd)
                os.close(devnull)

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """Mark the time inside as an evaluation's (which a signal abandons)."""
        self.evaluating = True
        try:
            yield
        finally:
            self.evaluating = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class RunStops:
    """What may end a training run between its steps, decided alike on every rank: a signal
    any rank received (recorded by a :class:`SignalFlag`, whose handlers are installed while
    inside this context manager) and a non-finite loss any rank met."""

    def __init__(self, group: Group, device: torch.device):
        self.group, self.device = group, device
        self.flag = SignalFlag()
        self.diverged = False  # this rank met a non-finite loss

    def __enter__(self) -> "RunStops":
        self.flag.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.flag.__exit__(*exc)

    def agree(self, decision: int) -> tuple[int, int, bool]:
        """(rank 0's decision, the signal any rank had received (0: none), whether any rank
        met a non-finite loss), the same on every rank: one collective under distributed
        training (a signal that arrives after it waits for the next)."""
        decision, signum, diverged = self.group.agree(
            decision, self.flag.signum or 0, int(self.diverged), device=self.device
        )
        if signum and self.flag.signum is None:
            self.flag.signum = signum
        return decision, signum, bool(diverged)

    def lose_finiteness(self) -> bool:
        """Record a non-finite loss; return whether to stop now (a single process) rather
        than at the next agreement, together with the other ranks."""
        self.diverged = True
        return not self.group.distributed
