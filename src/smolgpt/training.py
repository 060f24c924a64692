"""The training loop: optimise a GPT on a tokenized corpus, evaluate, checkpoint, resume.

One :class:`Trainer` owns a run directory for the life of a run. Each iteration it takes one
optimiser step (see ``optim.py``: AdamW or Muon, warm-up then cosine learning rate, gradient
accumulation, clipping, mixed precision); every ``eval_interval`` steps it measures train and
val loss on fixed batches, has :class:`~smolgpt.runlog.RunLog` append a row to
``metrics.jsonl``, and saves ``latest_model.pth`` (and ``best_model.pth`` on a new best val
loss). :class:`Budget` says when to stop: after max_iters steps, or with ``--time_budget``
when the time left holds just the final evaluation.

A checkpoint holds everything that decides the future of a run (weights, optimiser, scaler,
iteration, best loss, every RNG state), so a resumed run continues exactly where the saved
one stopped: on a CPU, bit for bit. SIGINT and SIGTERM finish the current step and save
before exiting; a NaN or infinite loss stops the run before it can overwrite a good
checkpoint.

The safety checks around a run (the run directory's lock, what may be resumed, the training
text) are :func:`smolgpt.train`'s; a Trainer assumes its run directory exists and is its own.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import checkpoint, hardware
from .config import TrainConfig
from .data import BatchSampler, TokenData
from .errors import SmolGPTError
from .model import GPT
from .optim import lr_multiplier, make_optimizers, set_learning_rates, use_settings
from .runlog import RunLog

log = logging.getLogger(__name__)

LATEST, BEST = "latest_model.pth", "best_model.pth"


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint."""

    iter: int = 0  # optimiser steps completed
    evaluated: bool = False  # whether the evaluation at `iter` has been made and logged
    best_val_loss: float = math.inf
    evals_since_best: int = 0
    elapsed_s: float = 0.0  # training wall time, summed over all processes of the run
    last_val_loss: float = math.inf


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; latest_model.pth was saved. exit_code is 128 + signal."""

    def __init__(self, signum: int, out_dir: Path, iteration: int):
        self.signum, self.out_dir, self.iteration = signum, out_dir, iteration
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} at iteration {iteration}")


class TrainingDiverged(SmolGPTError):
    """The loss became NaN or infinite."""


class Budget:
    """How long a run trains and how far it has got: max_iters steps, or with --time_budget
    seconds of wall time, summed over every process of a resumed run.

    A time-budgeted run holds back the time of its final evaluation (the last one measured,
    or before there is one an estimate from the step time), so that the evaluation still fits
    and the learning-rate decay ends when training does.
    """

    # An evaluation batch is a forward pass only: about a third of a training step's work,
    # rounded up so that an estimate errs towards finishing early rather than late.
    FORWARD_SHARE = 0.4

    def __init__(self, cfg: TrainConfig, clock_start: float, elapsed_before: float = 0.0):
        self.cfg, self.clock_start, self.elapsed_before = cfg, clock_start, elapsed_before
        self.eval_s: Optional[float] = None  # the last evaluation's duration
        self.steps, self.step_s = 0, 0.0  # steps timed, and their total time (first excluded)

    def elapsed(self) -> float:
        """Seconds of the run so far: earlier processes' and this one's."""
        return self.elapsed_before + time.perf_counter() - self.clock_start

    def add_step(self, seconds: float) -> None:
        self.steps += 1
        if self.steps > 1:  # the first step pays for one-off allocations
            self.step_s += seconds

    def final_eval_s(self) -> float:
        """The measured time of the last evaluation, or before there is one, an estimate from
        the step time: 2 splits x eval_iters micro-batches, each a forward pass."""
        if self.eval_s is not None:
            return self.eval_s
        if self.steps < 2:
            return 0.0
        micro_batch_s = self.step_s / (self.steps - 1) / self.cfg.gradient_accumulation_steps
        return 2 * self.cfg.eval_iters * micro_batch_s * self.FORWARD_SHARE

    def train_seconds(self) -> float:
        """The schedule's horizon under --time_budget: the budget less the final evaluation."""
        return max((self.cfg.time_budget or 0.0) - self.final_eval_s(), 0.0)

    def finished(self, iteration: int) -> bool:
        if self.cfg.time_budget:  # (after one step at least, should start-up eat the budget)
            return iteration > 0 and self.elapsed() >= self.train_seconds()
        return iteration >= self.cfg.max_iters

    def done(self, iteration: int) -> float:
        """The share of training done, in [0, 1]: what the learning-rate schedule follows."""
        if self.cfg.time_budget:
            return min(self.elapsed() / max(self.train_seconds(), 1e-9), 1.0)
        return min(iteration / self.cfg.max_iters, 1.0)


class _SignalFlag:
    """Record SIGINT/SIGTERM instead of dying mid-step; a second signal stops at once.
    Python lets only the main thread handle signals: elsewhere this does nothing."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.signum is not None:  # asked twice: the user means it
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: finishing this step and saving (again to stop at once)",
                    signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """A training run in an existing run directory.

    Building one seeds torch's global RNG with cfg.seed (the model's initialisation and
    dropout draw from it) and, on CUDA, allows TF32 matrix products; its clock starts when it
    is built, so that building the model and the optimisers (whose first use imports part of
    torch, seconds on a small CPU) counts against --time_budget.
    """

    def __init__(self, cfg: TrainConfig, data: TokenData, out_dir: Path, device: torch.device,
                 resume_from: Optional[dict] = None):
        clock_start = time.perf_counter()
        self.cfg, self.data, self.out_dir, self.device = cfg, data, Path(out_dir), device
        hardware.configure_backends(device)
        torch.manual_seed(cfg.seed)
        self.model_config = cfg.model_config(data.tokenizer.vocab_size)
        self.model = GPT(self.model_config).to(device)
        # One decision about reduced precision, followed by autocast, Muon and the loss.
        self.precision = hardware.precision_policy(device, cfg.amp)
        self.optimizers = make_optimizers(self.model, cfg, device, self.precision.muon_dtype)
        self.scaler = torch.amp.GradScaler(device.type) if self.precision.needs_grad_scaler else None
        self.sampler = BatchSampler(data.train, cfg.block_size, cfg.batch_size, cfg.seed, device)
        self.progress = Progress()
        if resume_from is not None:
            self._restore(resume_from)
        self.budget = Budget(cfg, clock_start, self.progress.elapsed_s)
        self.forward = torch.compile(self.model) if cfg.compile else self.model

    # ----------------------------------------------------------------- state

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        states = ckpt["optimizer"]
        if isinstance(states, dict):  # written before runs could have several optimisers
            states = [states]
        if len(states) != len(self.optimizers):
            raise SmolGPTError(
                f"the checkpoint holds {len(states)} optimiser states, this run has "
                f"{len(self.optimizers)}: it was written with another --optimizer"
            )
        for optimizer, state in zip(self.optimizers, states):
            optimizer.load_state_dict(state)
        use_settings(self.optimizers, self.cfg)
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.progress = Progress(**ckpt["progress"])
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.sampler.load_state_dict(rng["sampler"])

    def state(self) -> dict:
        """The checkpoint dictionary for the run as it stands now."""
        cuda = self.device.type == "cuda"
        return {
            "model_config": dataclasses.asdict(self.model_config),
            "tokenizer": self.data.tokenizer.to_dict(),
            "model": self.model.state_dict(),
            "train_config": dataclasses.asdict(self.cfg),
            "optimizer": [opt.state_dict() for opt in self.optimizers],
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "progress": dataclasses.asdict(self.progress),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if cuda else [],
                "sampler": self.sampler.state_dict(),
            },
            "data": {"fingerprint": self.data.fingerprint},
        }

    def save(self, name: str) -> None:
        checkpoint.save(self.out_dir / name, self.state())

    # ----------------------------------------------------------------- steps

    def train_step(self, lr_multiplier: float = 1.0) -> torch.Tensor:
        """One optimiser step over gradient_accumulation_steps micro-batches, every rate at
        lr_multiplier times its peak; the mean loss stays on the device (reading it would
        wait for a GPU)."""
        set_learning_rates(self.optimizers, self.cfg, lr_multiplier)
        steps = self.cfg.gradient_accumulation_steps
        total = torch.zeros((), device=self.device)
        for _ in range(steps):
            x, y = self.sampler.next()
            with self.precision.autocast():
                _, loss = self.forward(x, y)
            loss = loss / steps
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        if self.scaler:
            for optimizer in self.optimizers:
                self.scaler.unscale_(optimizer)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        for optimizer in self.optimizers:
            if self.scaler:  # skipped (not a fault) if fp16 gradients overflowed
                self.scaler.step(optimizer)
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.update()
        return total

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss on eval_iters batches of each split. The batches are the same at every
        evaluation (a fixed seed), so successive numbers differ only because the model did."""
        self.model.eval()
        out = {}
        for offset, (split, ids) in enumerate((("train", self.data.train), ("val", self.data.val))):
            sampler = BatchSampler(ids, self.cfg.block_size, self.cfg.batch_size,
                                   self.cfg.seed + 1 + offset, self.device)
            losses = torch.zeros(self.cfg.eval_iters, device=self.device)
            for i in range(self.cfg.eval_iters):
                with self.precision.autocast():
                    _, losses[i] = self.forward(*sampler.next())
            out[split] = losses.mean().item()
        self.model.train()
        return out

    # ----------------------------------------------------------------- the loop

    def run(self) -> Progress:
        """Train until the budget is spent or early stopping; return the final progress."""
        p = self.progress
        log.info("model: %.2fM parameters, %d layers, %d heads, %d wide, context %d | %s, %s",
                 self.model.num_parameters() / 1e6, self.cfg.n_layer, self.cfg.n_head,
                 self.cfg.n_embd, self.cfg.block_size, self.device.type,
                 self.precision.describe())
        run_log = RunLog(self.cfg, self.out_dir, self.model.estimate_flops_per_token(),
                         hardware.peak_flops(self.device, self.precision))
        run_log.rewind(p.iter, p.evaluated)
        self.model.train()
        with run_log, _SignalFlag() as stop:
            while True:
                finished = self.budget.finished(p.iter)
                if (finished or self._evaluation_due()) and not p.evaluated:
                    finished = self._evaluate_and_save(run_log)
                    if 0 < self.cfg.early_stop_patience <= p.evals_since_best:
                        log.info("early stop: no new best val loss in %d evaluations",
                                 self.cfg.early_stop_patience)
                        break
                if finished:
                    break
                self._step(run_log)
                if stop.signum is not None:
                    p.elapsed_s = self.budget.elapsed()
                    self.save(LATEST)
                    raise TrainingInterrupted(stop.signum, self.out_dir, p.iter)
        return p

    def _evaluation_due(self) -> bool:
        # A time-budgeted run skips the evaluation of the untrained model: it tells nothing
        # (the loss is about ln(vocab)) and would eat the budget.
        it = self.progress.iter
        return it % self.cfg.eval_interval == 0 and not (self.cfg.time_budget and it == 0)

    def _step(self, run_log: RunLog) -> None:
        p = self.progress
        multiplier = lr_multiplier(self.cfg, p.iter, self.budget.done(p.iter))
        start = time.perf_counter()
        loss = self.train_step(multiplier)
        p.iter, p.evaluated = p.iter + 1, False
        # Reading a loss makes the host wait for the device. On a CPU that costs nothing, so
        # every step is checked; elsewhere only at progress lines.
        if self.device.type == "cpu" and not math.isfinite(loss.item()):
            raise self._diverged()
        self.budget.add_step(time.perf_counter() - start)
        reported = run_log.step(p.iter, loss, self.cfg.learning_rate * multiplier,
                                self.budget.elapsed())
        if reported is not None and not math.isfinite(reported):
            raise self._diverged()

    def _evaluate_and_save(self, run_log: RunLog) -> bool:
        """Evaluate, record, checkpoint; return whether training is finished now. Under a
        time budget this evaluation may serve as the final one; and where an estimate of the
        final evaluation's time ended training, the measured time may show that there is
        time left for more steps."""
        p = self.progress
        start = time.perf_counter()
        losses = self.evaluate()
        if not all(map(math.isfinite, losses.values())):
            raise self._diverged()
        self.budget.eval_s = time.perf_counter() - start
        new_best = losses["val"] < p.best_val_loss
        p.best_val_loss = min(p.best_val_loss, losses["val"])
        p.evals_since_best = 0 if new_best else p.evals_since_best + 1
        p.last_val_loss = losses["val"]
        last_step = max(p.iter - 1, 0)
        lr = self.cfg.learning_rate * lr_multiplier(self.cfg, last_step, self.budget.done(last_step))
        run_log.evaluation(p.iter, losses, p.best_val_loss, new_best, lr, self.budget.elapsed(),
                           self.budget.eval_s)
        p.evaluated, p.elapsed_s = True, self.budget.elapsed()
        self.save(LATEST)  # first: a run directory with any checkpoint has a latest one
        if new_best:
            self.save(BEST)
        return self.budget.finished(p.iter)

    def _diverged(self) -> TrainingDiverged:
        return TrainingDiverged(
            f"the loss became NaN or infinite at iteration {self.progress.iter}: training "
            f"stopped. {BEST} and {LATEST} hold the last good state; lower --learning_rate "
            f"(now {self.cfg.learning_rate:g}) or keep --grad_clip on"
        )


def clean_stale_temporaries(out_dir: Path) -> None:
    """Remove half-written checkpoint files left by a process killed mid-save. Call only
    while holding the run directory's lock (no live writer can own them then)."""
    for tmp in Path(out_dir).glob(".*.pth.*.tmp"):
        tmp.unlink(missing_ok=True)
