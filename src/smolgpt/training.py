"""The training loop: optimise a GPT on a tokenized corpus, evaluate, checkpoint, resume.

One :class:`Trainer` owns a run directory for the life of a run. Each iteration it takes one
optimiser step (see ``optim.py``: AdamW or Muon, warm-up then cosine learning rate, gradient
accumulation, clipping, mixed precision); every ``eval_interval`` steps (under a time
budget, at points spread over it) it measures train and val loss on fixed batches, has
:class:`~smolgpt.runlog.RunLog` append a row to ``metrics.jsonl``, and saves
``latest_model.pth`` (and ``best_model.pth`` on a new best val loss). :class:`Budget` says
when to stop: after max_iters steps, or with ``--time_budget`` when the time left holds
just the final evaluation.

A checkpoint holds everything that decides the future of a run (weights, optimiser, scaler,
iteration, best loss, every RNG state), so a resumed run continues exactly where the saved
one stopped: on a CPU, bit for bit. SIGINT, SIGTERM and SIGHUP finish the current step (or
abandon an evaluation) and save before exiting; a NaN or infinite loss stops the run before
it can overwrite a good checkpoint.

The safety checks around a run (the run directory's lock, what may be resumed, the training
text) are :func:`smolgpt.train`'s; a Trainer assumes its run directory exists and is its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import json
import logging
import math
import os
import signal
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from . import __version__, checkpoint, hardware, kernels
from .config import BUDGET_EVALUATIONS, TrainConfig
from .data import BatchSampler, TokenData
from .distributed import Group
from .errors import SmolGPTError
from .evaluate import bits_per_char, score_windows, window_starts
from .model import GPT
from .optim import (
    batch_rows,
    decay_share,
    lr_multiplier,
    make_optimizers,
    set_learning_rates,
    use_settings,
    warming_up,
    warmup_share,
)
from .runlog import EVAL_PROGRESS_S, RunLog, duration

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
    # Fields added later have defaults, so that older checkpoints still load.
    # How far along its learning-rate schedule the run was when saved (Budget.done); None
    # in checkpoints written before it was recorded.
    done: Optional[float] = None
    # Set when --resume changed the run's horizon (max_iters or time_budget) after warm-up:
    # [iteration, elapsed_s, decay share reached there]; see Budget.done.
    extended_at: Optional[list] = None
    # Bits per character of the validation text (see RunLog.evaluation); None before the
    # first evaluation and in checkpoints written before smolgpt 0.7.
    best_val_bits_per_char: Optional[float] = None
    last_val_bits_per_char: Optional[float] = None
    # Training tokens seen, every rank's; None in checkpoints written before smolgpt 0.12
    # (restored as steps x tokens per step: there was no --batch_warmup then).
    tokens: Optional[int] = None
    # Batches of each split that every evaluation of the run scores: planned once by a
    # time-budgeted run (Budget.plan_eval_batches); None: eval_iters.
    eval_batches: Optional[int] = None


class TrainingInterrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived; latest_model.pth was saved. exit_code is
    128 + signal, as a shell reports a process killed by it."""

    def __init__(self, signum: int, out_dir: Path, iteration: int):
        self.signum, self.out_dir, self.iteration = signum, out_dir, iteration
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} at iteration {iteration}")


class TrainingDiverged(SmolGPTError):
    """The loss became NaN or infinite."""


class Budget:
    """How long a run trains and how far it has got: max_iters steps, or with --time_budget
    seconds of wall time, summed over every process of a resumed run. Under a time budget a
    max_iters given too caps the steps: training ends at whichever limit comes first.

    A time-budgeted run holds back the time of its final evaluation (the last one measured,
    or before there is one an estimate from a timed evaluation batch), so that the
    evaluation still fits and the learning-rate decay ends when training does. Without
    --eval_interval it evaluates at its start and after each BUDGET_EVALUATIONS-th of its
    training time; its evaluations score at most eval_iters batches a split, fewer where
    they would take more than EVAL_SHARE of the budget in all (plan_eval_batches).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        clock_start: float,
        elapsed_before: float = 0.0,
        extended_at: Optional[list] = None,
    ):
        self.cfg, self.clock_start, self.elapsed_before = cfg, clock_start, elapsed_before
        self.extended_at = extended_at  # Progress.extended_at
        self.max_iters = cfg.step_limit  # None: the time budget alone ends training
        self.eval_s: Optional[float] = None  # the last evaluation's duration
        self.eval_batch_s: Optional[float] = None  # one evaluation batch's, when timed
        self.eval_batches = cfg.eval_iters  # a split's batches in each evaluation
        # Under a clock schedule: the share of training done when this process first
        # evaluated (or resumed an evaluated run), and the last point evaluated since.
        self.points_from: Optional[float] = None
        self.points_evaluated = -1
        self.steps, self.step_s = 0, 0.0  # steps timed, and their total time (first excluded)

    def elapsed(self) -> float:
        """Seconds of the run so far: earlier processes' and this one's."""
        return self.elapsed_before + time.perf_counter() - self.clock_start

    def add_step(self, seconds: float) -> None:
        self.steps += 1
        if self.steps > 1:  # the first step pays for one-off allocations and imports
            self.step_s += seconds

    def step_time(self) -> Optional[float]:
        """The mean time of this process's steps, the first excluded (None before two)."""
        return self.step_s / (self.steps - 1) if self.steps > 1 else None

    def final_eval_s(self) -> float:
        """The measured time of the last evaluation, or before there is one, an estimate
        from one timed evaluation batch: 2 splits x eval_iters batches (0 before either).
        Batches, not training steps: a step's backward pass and optimiser (Muon's above
        all) cost an evaluation nothing."""
        if self.eval_s is not None:
            return self.eval_s
        if self.eval_batch_s is None:
            return 0.0
        return 2 * self.eval_batches * self.eval_batch_s

    def expected_evaluations(self, step_s: float) -> int:
        """How many evaluations a time-budgeted run makes, its first and last included, at
        step_s seconds a step."""
        cfg = self.cfg
        if cfg.eval_every is None:
            return BUDGET_EVALUATIONS + 1
        steps = cfg.time_budget / max(step_s, 1e-9)
        if self.max_iters is not None:
            steps = min(steps, self.max_iters)
        return 1 + math.ceil(steps / cfg.eval_every)

    def plan_eval_batches(self, batch_s: float, step_s: float) -> int:
        """The batches of each split that every evaluation of a time-budgeted run scores:
        eval_iters, or fewer (one at least) where its expected evaluations, at batch_s
        seconds a batch, would take more than EVAL_SHARE of the budget. The same batches
        every time, so that successive losses differ only because the model did."""
        budget = EVAL_SHARE * self.cfg.time_budget
        batches = budget / (self.expected_evaluations(step_s) * 2 * max(batch_s, 1e-9))
        fits = math.floor(batches + 1e-9)  # 4.999... from rounding is 5
        return max(1, min(self.cfg.eval_iters, fits))

    def point(self, iteration: int) -> int:
        """Which of the BUDGET_EVALUATIONS points of a time-budgeted run it has passed after
        `iteration` steps, now (0 before the first): they divide the training time left
        after this process's first evaluation (start-up may take a good part of a short
        budget) into equal parts."""
        share = self.share(iteration, self.elapsed())
        start = self.points_from or 0.0
        return math.floor((share - start) / max(1.0 - start, 1e-9) * BUDGET_EVALUATIONS)

    def evaluated(self, iteration: int) -> None:
        """Record an evaluation after `iteration` steps (the first of this process starts
        the points)."""
        if self.points_from is None:
            self.points_from = self.share(iteration, self.elapsed())
        self.points_evaluated = self.point(iteration)

    def train_seconds(self) -> float:
        """The schedule's horizon under --time_budget: the budget less the final evaluation."""
        return max((self.cfg.time_budget or 0.0) - self.final_eval_s(), 0.0)

    def finished(self, iteration: int) -> bool:
        """Whether training is over after `iteration` steps (as far as the budget goes)."""
        if self.max_iters is not None and iteration >= self.max_iters:
            return True
        if not self.cfg.time_budget:
            return False
        # After one step at least, should start-up eat the budget.
        return iteration > 0 and self.elapsed() >= self.train_seconds()

    def share(self, iteration: int, elapsed: float) -> float:
        """The share of training done after `iteration` steps and `elapsed` seconds, in
        [0, 1]: of max_iters, or of the time training may use, whichever is further on."""
        shares = []
        if self.max_iters is not None:
            shares.append(iteration / self.max_iters)
        if self.cfg.time_budget:
            shares.append(elapsed / max(self.train_seconds(), 1e-9))
        return min(max(shares), 1.0)

    def done(self, iteration: int) -> float:
        """How far along its learning-rate schedule the run is, in [0, 1]: what
        lr_multiplier follows. That is the share of training done, except in a run resumed
        with another horizon after warm-up (extended_at): it goes on from the point of the
        new schedule where the decay had got to, and spreads the rest of the decay over
        what is left of training, so that the rate never jumps."""
        share = self.share(iteration, self.elapsed())
        if self.extended_at is None:
            return share
        iteration_then, elapsed_then, decay_then = self.extended_at
        start = self.share(iteration_then, elapsed_then)
        rest = min(max((share - start) / max(1.0 - start, 1e-9), 0.0), 1.0)
        warm = warmup_share(self.cfg)
        return warm + (1.0 - warm) * (decay_then + (1.0 - decay_then) * rest)


# Evaluations of a time-budgeted run take at most this share of the budget in all.
EVAL_SHARE = 0.1
# Other programs keeping this many cores busy make a run time its pass on one thread too.
BUSY_CORES = 0.5
# A run counted in steps says how long it will take before it starts, from a timed forward
# and backward pass, then again from the mean of this many steps of its process (the first,
# with its one-off costs, is not timed); and on a CPU, beyond LONG_RUN_S, how to make it
# shorter.
PROJECT_AFTER_STEPS = 5
LONG_RUN_S = 3600


def projection(
    budget: Budget,
    iteration: int,
    device: torch.device,
    step_s: Optional[float] = None,
    evaluation_pending: bool = False,
) -> list[str]:
    """The log lines that project the rest of a run counted in steps: the steps left at
    step_s seconds each (given: an estimate before the first step; else the mean step time
    so far), plus the evaluations still due (at budget.final_eval_s() each; the one at
    `iteration` too if evaluation_pending); and on a CPU, where that is over LONG_RUN_S,
    one that suggests a shorter run."""
    cfg, every = budget.cfg, budget.cfg.eval_every
    limit = cfg.step_limit  # (a run counted in steps has one)
    steps_left = max(limit - iteration, 0)
    # An evaluation every eval_interval steps, and one at the end.
    evals_left = limit // every - iteration // every + (limit % every != 0)
    evals_left = (evals_left if steps_left else 0) + evaluation_pending
    estimated = step_s is not None
    if step_s is None:
        step_s = budget.step_time() or 0.0
    eval_s = budget.final_eval_s()
    total = steps_left * step_s + evals_left * eval_s
    how = "about, from one timed forward and backward pass: " if estimated else ""
    lines = [
        f"projected training time: {duration(total)} ({how}{steps_left} steps at "
        f"{step_s:.2f} s, {evals_left} evaluations at {eval_s:.1f} s"
        f"{'; early stopping may end it sooner' if cfg.early_stop_patience else ''})"
    ]
    if device.type == "cpu" and total > LONG_RUN_S:
        lines.append(
            "that is long for a CPU: --preset micro or --preset nano train smaller "
            "models many times faster, and --time_budget SECONDS stops training "
            "after that many seconds"
        )
    return lines


class _SignalFlag:
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

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
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

    resume_from: a checkpoint to continue. init_weights: a state_dict of the same shape to
    start from instead of the random initialisation (fine-tuning, --init_from).
    on_evaluation(model, iteration, losses): called after every evaluation is recorded (its
    time counts as the evaluation's); --sample_every's samples come from there.

    group: this process's place in a distributed run (see ``distributed.py``): the model is
    then wrapped in DistributedDataParallel, each rank trains on its own micro-batches and
    evaluates its share of the windows, rank 0 alone writes and decides when to stop.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        data: TokenData,
        out_dir: Path,
        device: torch.device,
        resume_from: Optional[dict] = None,
        init_weights: Optional[dict] = None,
        on_evaluation: Optional[Callable[[GPT, int, dict], None]] = None,
        group: Group = Group(),
    ):
        clock_start = time.perf_counter()
        self.on_evaluation, self.group = on_evaluation, group
        self.cfg, self.data, self.out_dir, self.device = cfg, data, Path(out_dir), device
        hardware.configure_backends(device)
        # Each rank its own dropout masks; rank 0 (and a single process) those of the seed.
        torch.manual_seed(cfg.seed + group.rank)
        self.model_config = cfg.model_config(data.tokenizer.vocab_size)
        # The plain model with kernels.py's faster versions of its parts swapped in: the
        # same numbers, sooner (kernels.py says why each exists).
        self.model = kernels.use_fast_kernels(GPT(self.model_config).to(device))
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        # model(x, y)[1], the mean loss, without holding a word-level batch's logits.
        self.training_loss = kernels.TrainingLoss(self.model)
        if init_weights is not None:
            # After the random initialisation all the same, so that the RNG streams (dropout)
            # are those of any run with this seed.
            self.model.load_state_dict(init_weights)
        # One decision about reduced precision, followed by autocast, Muon and the loss.
        self.precision = hardware.precision_policy(device, cfg.amp)
        self.optimizers = make_optimizers(self.model, cfg, device, self.precision.muon_dtype)
        self.scaler = (
            torch.amp.GradScaler(device.type) if self.precision.needs_grad_scaler else None
        )
        self.sampler = BatchSampler(
            data.train,
            cfg.block_size,
            cfg.batch_size,
            cfg.seed,
            device,
            group.rank,
            group.world_size,
        )
        self.progress = Progress(tokens=0)
        self.diverged = False  # a non-finite loss met (see _lose_finiteness)
        self.busy_cores: Optional[float] = None  # other programs' at start-up
        self.threads_timed_against = 0  # the other thread count timed, if any
        if resume_from is not None:
            self._restore(resume_from)
        self.budget = Budget(cfg, clock_start, self.progress.elapsed_s, self.progress.extended_at)
        # DDP averages the ranks' gradients in the backward pass (and copies rank 0's weights
        # to the others here). The rotary tables are constants: no need to send them along
        # before every forward pass (newer torch names that setting differently).
        self.replicated = self.training_loss
        if group.distributed:
            no_buffer_sync = (
                {"forward_sync_buffers": False}
                if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else {"broadcast_buffers": False}
            )
            self.replicated = DistributedDataParallel(
                self.training_loss,
                device_ids=[device.index] if device.type == "cuda" else None,
                **no_buffer_sync,
            )
        # loss(x, y): the mean loss of a batch, what a training step differentiates.
        self.loss = torch.compile(self.replicated) if cfg.compile else self.replicated
        # Evaluations need no gradients, so no DDP: each rank scores its own windows.
        self.eval_loss = self.loss if not group.distributed else self.training_loss

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
        if self.progress.tokens is None:
            self.progress.tokens = self.progress.iter * self.tokens_per_step(self.cfg.batch_size)
        rng = ckpt["rng"]
        # Rank 0's states are "torch" and "cuda"; other ranks' under "other_ranks". A rank
        # without a saved state (the run was saved with fewer ranks) keeps its seed's.
        others = rng.get("other_ranks") or {"torch": [], "cuda": []}
        states = [(rng["torch"], rng.get("cuda"))] + list(zip(others["torch"], others["cuda"]))
        if self.group.rank < len(states):
            cpu_state, cuda_states = states[self.group.rank]
            torch.set_rng_state(cpu_state)
            if self.device.type == "cuda" and cuda_states:
                torch.cuda.set_rng_state(cuda_states[0], self.device)
        self.sampler.load_state_dict(rng["sampler"])
        self._continue_schedule(ckpt.get("train_config") or {})

    def _continue_schedule(self, saved: dict) -> None:
        """Where --resume changed the run's horizon (max_iters or time_budget) after warm-up,
        record where the old schedule's decay had got to: the new one goes on from there
        (Budget.done), so the learning rate does not jump back up. During warm-up nothing is
        recorded: warm-up goes on as configured."""
        p = self.progress
        old = dataclasses.replace(
            self.cfg,
            max_iters=saved.get("max_iters", self.cfg.max_iters),
            time_budget=saved.get("time_budget", self.cfg.time_budget),
        )
        if (old.step_limit, old.time_budget) == (self.cfg.step_limit, self.cfg.time_budget):
            return
        done = p.done
        if done is None:  # an older checkpoint: the share of its steps or budget
            done = Budget(old, time.perf_counter()).share(p.iter, p.elapsed_s)
        if not warming_up(old, p.iter, done):
            p.extended_at = [p.iter, p.elapsed_s, decay_share(old, done)]

    def state(self) -> dict:
        """The checkpoint dictionary for the run as it stands now (every rank's RNG states
        gathered: a collective, which every rank calls)."""
        cuda = self.device.type == "cuda"
        cpu_states = self.group.gather(torch.get_rng_state())
        cuda_states = self.group.gather([torch.cuda.get_rng_state(self.device)] if cuda else [])
        return {
            "model_config": dataclasses.asdict(self.model_config),
            "tokenizer": self.data.tokenizer.to_dict(),
            "model": self.model.state_dict(),
            "train_config": dataclasses.asdict(self.cfg),
            "optimizer": [opt.state_dict() for opt in self.optimizers],
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "progress": dataclasses.asdict(
                dataclasses.replace(self.progress, done=self.budget.done(self.progress.iter))
            ),
            "rng": {
                "torch": cpu_states[0],
                "cuda": cuda_states[0],
                "sampler": self.sampler.state_dict(),  # the same on every rank
                # Under distributed training, the other ranks' own (dropout masks differ).
                "other_ranks": {"torch": cpu_states[1:], "cuda": cuda_states[1:]},
            },
            # The text: its hash, its name as read, and where it is (older checkpoints: no path).
            "data": {
                "fingerprint": self.data.fingerprint,
                "source": self.data.source,
                "path": self.data.corpus.location if self.data.corpus else None,
            },
            # What wrote the file, for `smolgpt info` (absent before smolgpt 0.7).
            "run_info": {
                "smolgpt": __version__,
                "torch": str(torch.__version__),  # a TorchVersion, which pickles as a class
                "saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "device": self.device.type,
                "precision": self.precision.describe(),
                "world_size": self.group.world_size,
            },
        }

    def save(self, name: str) -> None:
        """Write the checkpoint name (rank 0; every rank calls it, see state)."""
        state = self.state()
        if self.group.is_main:
            checkpoint.save(self.out_dir / name, state)

    # ----------------------------------------------------------------- steps

    def train_step(self, lr_multiplier: float = 1.0, rows: Optional[int] = None) -> torch.Tensor:
        """One optimiser step over gradient_accumulation_steps micro-batches, every rate at
        lr_multiplier times its peak, each micro-batch cut to its first `rows` sequences
        (None: all batch_size); the mean loss stays on the device (reading it would wait for
        a GPU)."""
        set_learning_rates(self.optimizers, self.cfg, lr_multiplier)
        steps = self.cfg.gradient_accumulation_steps
        total = torch.zeros((), device=self.device)
        for micro in range(steps):
            # Whole batches are drawn whatever is kept, so that the stream of batches (and a
            # resumed run's) does not depend on the batch-size schedule.
            x, y = self.sampler.next()
            x, y = x[:rows], y[:rows]
            # Under DDP the ranks' gradients are averaged once, in the last micro-batch's
            # backward pass: the earlier ones only accumulate locally.
            last = micro == steps - 1
            with (
                contextlib.nullcontext()
                if last or not self.group.distributed
                else self.replicated.no_sync()
            ):
                with self.precision.autocast():
                    loss = self.loss(x, y)
                loss = loss / steps
                with self.group.talking_inside_torch():
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
    def evaluate(
        self,
        stop: Optional[_SignalFlag] = None,
        report: Optional[Callable[[int, int], None]] = None,
    ) -> Optional[dict[str, float]]:
        """Mean loss of each split over the same windows at every evaluation (so successive
        numbers differ only because the model did): the split's evaluation windows
        (:func:`~smolgpt.evaluate.window_starts`), or where it has more than eval_iters x
        batch_size of them (under a time budget, its planned batches), that many spread
        evenly over it. A validation split that small is scored whole, as ``smolgpt eval``
        scores it. With the validation text's size known, "val_bits_per_char" too.
        report(batches scored, batches in all) is called after each batch.

        With a stop flag, returns None as soon as a signal has been recorded (checked after
        every batch): a long evaluation is abandoned rather than awaited. Evaluating changes
        nothing a checkpoint holds (it draws no random number, and dropout is off), so the
        run's state is then still the state from before it."""
        self.model.eval()
        if stop is not None:
            stop.evaluating = True
        block, most = self.cfg.block_size, self.budget.eval_batches * self.cfg.batch_size
        group, batch = self.group, self.cfg.batch_size
        splits = {"train": self.data.train, "val": self.data.val}
        # Each rank scores its share of the windows; the sums are added up.
        starts = {
            split: window_starts(len(ids), block, most)[group.rank :: group.world_size]
            for split, ids in splits.items()
        }
        total = sum(math.ceil(len(s) / batch) for s in starts.values())
        scored_batches = 0

        def after_batch() -> bool:
            """Report; and whether to abandon the evaluation (a distributed one never is:
            the other ranks would wait for it)."""
            nonlocal scored_batches
            scored_batches += 1
            if report is not None:
                report(min(scored_batches, total), total)
            return stop is not None and not group.distributed and stop.signum is not None

        try:
            out = {}
            for split, ids in splits.items():
                scored = score_windows(
                    self.eval_loss,
                    ids,
                    block,
                    starts[split],
                    batch,
                    self.device,
                    self.precision.autocast,
                    after_batch,
                )
                if scored is None:
                    return None
                nats, count = group.sum(list(scored), self.device)
                out[split] = nats / count
            if self.data.val_chars:
                out["val_bits_per_char"] = bits_per_char(
                    out["val"], len(self.data.val) - 1, self.data.val_unk_bytes, self.data.val_chars
                )
            return out
        finally:
            self.model.train()
            if stop is not None:
                stop.evaluating = False

    # ----------------------------------------------------------------- the loop

    def run(self) -> Progress:
        """Train until the budget is spent or early stopping; return the final progress."""
        p = self.progress
        log.info(
            "model: %.2fM parameters, %d layers, %d heads, %d wide, context %d | %s, %s",
            self.model.num_parameters() / 1e6,
            self.cfg.n_layer,
            self.cfg.n_head,
            self.cfg.n_embd,
            self.cfg.block_size,
            self.device.type,
            self.precision.describe(),
        )
        group = self.group
        if group.distributed:
            cfg = self.cfg
            sequences = cfg.batch_size * cfg.gradient_accumulation_steps * group.world_size
            log.info(
                "distributed: %d ranks (%s); global batch %d sequences = %d per "
                "micro-batch x %d accumulation x %d ranks, %d tokens a step",
                group.world_size,
                "NCCL" if self.device.type == "cuda" else "Gloo",
                sequences,
                cfg.batch_size,
                cfg.gradient_accumulation_steps,
                group.world_size,
                sequences * cfg.block_size,
            )
        batch_s, pass_s = self._time_passes()  # and on a CPU, choose the threads
        peak = hardware.peak_flops(self.device, self.precision)
        run_log = RunLog(
            self.cfg,
            self.out_dir,
            self.model.estimate_flops_per_token(),
            peak,
            iteration=p.iter,
            elapsed=p.elapsed_s,
            group=group,
        )
        log.info(
            "MFU below is training FLOP/s over a matmul peak of %.1f GFLOP/s a process (%s, "
            "the best measured on this machine)",
            peak / 1e9,
            hardware.peak_key(self.device, self.precision.reduced or torch.float32),
        )
        if self.device.type == "cpu":
            log.info(
                "cpu: %s", hardware.describe_threads(self.busy_cores, self.threads_timed_against)
            )
        run_log.rewind(p.iter, p.evaluated)
        self._plan(batch_s, pass_s)
        self.model.train()
        with run_log, _SignalFlag() as stop:
            while True:
                # Rank 0's clock decides for every rank: 2 finished, 1 evaluate now, 0 step.
                finished = self.budget.finished(p.iter)
                state, signum = self._agree(2 if finished else int(self._evaluation_due()), stop)
                finished = state == 2
                if signum:  # after a step, or at the start
                    raise self._save_interrupted(signum)
                if state and not p.evaluated:
                    finished, _ = self._agree(self._evaluate_and_save(run_log, stop), stop)
                    if 0 < self.cfg.early_stop_patience <= p.evals_since_best:
                        log.info(
                            "early stop: no new best val loss in %d evaluations",
                            self.cfg.early_stop_patience,
                        )
                        break
                if finished:
                    run_log.finish()
                    break
                self._step(run_log)
        if group.distributed:
            log.info("the %d ranks held identical weights at every evaluation", group.world_size)
        return p

    def _agree(self, decision: int, stop: _SignalFlag) -> tuple[int, int]:
        """(rank 0's decision, the signal any rank had received, 0 if none), the same on
        every rank: one collective under distributed training (a signal that arrives after
        it waits for the next). A non-finite loss any rank met ends them all."""
        decision, signum, diverged = self.group.agree(
            decision, stop.signum or 0, int(self.diverged), device=self.device
        )
        if diverged:
            raise self._diverged()
        if signum and stop.signum is None:
            stop.signum = signum
        return decision, signum

    def _save_interrupted(self, signum: int) -> TrainingInterrupted:
        """Save the run as it stands, for --resume to carry on from, and return the
        exception that ends it."""
        self.progress.elapsed_s = self.budget.elapsed()
        self.save(LATEST)
        # No rank exits before rank 0 has saved: torchrun ends the others when one exits.
        self.group.barrier()
        return TrainingInterrupted(signum, self.out_dir, self.progress.iter)

    def _evaluation_due(self) -> bool:
        """Every eval_interval steps, the start included; under a time budget without one,
        at the start and whenever training has passed the next of its points in time."""
        it, every = self.progress.iter, self.cfg.eval_every
        if every is not None:
            return it % every == 0
        return it == 0 or self.budget.point(it) > self.budget.points_evaluated

    def _plan(self, batch_s: float, pass_s: float) -> None:
        """From one evaluation batch's time and one training pass's, timed before training
        starts: a time-budgeted run plans its evaluations' batches (once per run: every
        evaluation scores the same windows) and says so, a run counted in steps how long it
        will take."""
        p, budget, cfg = self.progress, self.budget, self.cfg
        step_s = pass_s * cfg.gradient_accumulation_steps
        budget.eval_batch_s = batch_s
        if cfg.time_budget:
            if p.eval_batches is None:
                planned = budget.plan_eval_batches(batch_s, step_s)
                p.eval_batches = round(self.group.from_main(planned, self.device))
            budget.eval_batches = p.eval_batches
            if p.evaluated:  # a resumed run: its evaluation at p.iter was made
                budget.evaluated(p.iter)
            count = budget.expected_evaluations(step_s)
            log.info(
                "time budget %s: about %d evaluations of %d batch%s a split (~%.1f s each), "
                "the rest for training steps",
                duration(cfg.time_budget),
                count,
                p.eval_batches,
                "" if p.eval_batches == 1 else "es",
                budget.final_eval_s(),
            )
        else:
            pending = not p.evaluated and p.iter % cfg.eval_every == 0
            for line in projection(budget, p.iter, self.device, step_s, pending):
                log.info(line)

    def tokens_per_step(self, rows: int) -> int:
        """Training tokens in one step of `rows` sequences per micro-batch, every rank's."""
        return (
            rows
            * self.cfg.block_size
            * self.cfg.gradient_accumulation_steps
            * self.group.world_size
        )

    def _step(self, run_log: RunLog) -> None:
        p = self.progress
        done = self.budget.done(p.iter)
        if self.cfg.time_budget:  # a schedule by time follows rank 0's clock on every rank
            done = self.group.from_main(done, self.device)
        multiplier, rows = lr_multiplier(self.cfg, p.iter, done), batch_rows(self.cfg, done)
        start = time.perf_counter()
        loss = self.train_step(multiplier, rows)
        p.iter, p.evaluated = p.iter + 1, False
        p.tokens += self.tokens_per_step(rows)
        # Reading a loss makes the host wait for the device. On a CPU that costs nothing, so
        # every step is checked; elsewhere only at progress lines.
        if self.device.type == "cpu" and not math.isfinite(loss.item()):
            self._lose_finiteness()
        self.budget.add_step(time.perf_counter() - start)
        if self.budget.steps == PROJECT_AFTER_STEPS and not self.cfg.time_budget:
            log.info(projection(self.budget, p.iter, self.device)[0])  # measured now
        reported = run_log.step(
            p.iter,
            loss,
            self.cfg.learning_rate * multiplier,
            self.budget.elapsed(),
            self.tokens_per_step(rows),
        )
        if reported is not None and not math.isfinite(reported):
            self._lose_finiteness()

    def _time_passes(self) -> tuple[float, float]:
        """Seconds of one evaluation batch (a forward pass in eval mode) and of one training
        pass (forward and backward, no optimiser step): each the faster of two, as the first
        may pay one-off costs (a compilation with --compile). On a CPU whose threads are
        smolgpt's to choose (hardware.may_choose_threads) and that other programs keep
        busy (BUSY_CORES), the training pass is timed on one thread too, and the run keeps
        the faster count: there, short operations can spend more time waiting for a second
        thread to be scheduled than they save. (Not on a quiet CPU: changing the count and
        back leaves OpenMP's threads some 15% slower.) The training pass runs on the
        model itself (no DistributedDataParallel, so no communication), with torch's RNG
        forked for its dropout, and leaves no gradient behind: nothing a checkpoint holds
        changes, so exact resume is unaffected."""
        x, y = BatchSampler(
            self.data.val, self.cfg.block_size, self.cfg.batch_size, self.cfg.seed, self.device
        ).next()

        def timed(run: Callable[[], torch.Tensor]) -> float:
            times = []
            for _ in range(2):
                start = time.perf_counter()
                run().item()  # waits for the device
                times.append(time.perf_counter() - start)
            return min(times)

        def forward() -> torch.Tensor:
            with torch.no_grad(), self.precision.autocast():
                return self.eval_loss(x, y)

        def forward_backward() -> torch.Tensor:
            with self.precision.autocast():
                loss = self.training_loss(x, y)
            loss.backward()
            return loss.detach()

        self.model.eval()
        try:
            batch_s = timed(forward)
        finally:
            self.model.train()
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            with hardware.OtherLoad() as load:
                pass_s = timed(forward_backward)
            self.busy_cores = load.cores
            busy = load.cores is not None and load.cores >= BUSY_CORES
            if busy and hardware.may_choose_threads(self.device):
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                one_s = timed(forward_backward)
                if one_s < pass_s:
                    batch_s *= one_s / pass_s  # (an estimate: not timed again)
                    pass_s, self.threads_timed_against = one_s, threads
                else:
                    torch.set_num_threads(threads)
        self.model.zero_grad(set_to_none=True)
        return batch_s, pass_s

    def _evaluate_and_save(self, run_log: RunLog, stop: _SignalFlag) -> bool:
        """Evaluate, record, checkpoint; return whether training is finished now. Under a
        time budget this evaluation may serve as the final one; and where an estimate of the
        final evaluation's time ended training, the measured time may show that there is
        time left for more steps.

        A signal during the evaluation abandons it: latest_model.pth gets the state from
        before it, still marked not evaluated, so a resumed run makes this evaluation (and
        writes its metrics row) once; then TrainingInterrupted is raised."""
        p = self.progress
        start = time.perf_counter()
        expected_s = self.budget.final_eval_s()
        report = run_log.evaluation_progress(p.iter) if expected_s > EVAL_PROGRESS_S else None
        losses = self.evaluate(stop, report)
        if losses is None:
            raise self._save_interrupted(stop.signum)
        if not all(map(math.isfinite, losses.values())):
            raise self._diverged()
        scoring_s = time.perf_counter() - start
        new_best = losses["val"] < p.best_val_loss
        p.best_val_loss = min(p.best_val_loss, losses["val"])
        p.evals_since_best = 0 if new_best else p.evals_since_best + 1
        p.last_val_loss = losses["val"]
        p.last_val_bits_per_char = losses.get("val_bits_per_char")
        if new_best:
            p.best_val_bits_per_char = p.last_val_bits_per_char
        last_step = max(p.iter - 1, 0)
        lr = self.cfg.learning_rate * lr_multiplier(
            self.cfg, last_step, self.budget.done(last_step)
        )
        run_log.evaluation(
            p.iter,
            losses,
            p.best_val_loss,
            new_best,
            lr,
            self.budget.elapsed(),
            scoring_s,
            p.tokens,
        )
        if self.on_evaluation is not None:
            self.on_evaluation(self.model, p.iter, losses)
        # The metrics row, loss.png and on_evaluation count as the evaluation's time too.
        self.budget.eval_s = time.perf_counter() - start
        self.budget.evaluated(p.iter)
        p.evaluated, p.elapsed_s = True, self.budget.elapsed()
        self._check_replicas()
        self.save(LATEST)  # first: a run directory with any checkpoint has a latest one
        if new_best:
            self.save(BEST)
        return self.budget.finished(p.iter)

    def _lose_finiteness(self) -> None:
        """A non-finite loss: stop now, or under distributed training at the next
        agreement, together with the other ranks."""
        self.diverged = True
        if not self.group.distributed:
            raise self._diverged()

    def _check_replicas(self) -> None:
        """Under distributed training, check that every rank holds the same weights (DDP
        and a deterministic optimiser keep them so; a difference is a bug, not noise)."""
        if not self.group.distributed:
            return
        crcs = checkpoint.checksums({"model": self.model.state_dict()})
        digest = zlib.crc32(json.dumps(crcs, sort_keys=True).encode())
        digests = self.group.gather(digest)
        if len(set(digests)) > 1:
            raise SmolGPTError(
                f"the ranks' weights differ at iteration {self.progress.iter} "
                f"(checksums {digests}): please report this as a bug"
            )

    def _diverged(self) -> TrainingDiverged:
        return TrainingDiverged(
            f"the loss became NaN or infinite at iteration {self.progress.iter}: training "
            f"stopped. {BEST} and {LATEST} hold the last good state; lower --learning_rate "
            f"(now {self.cfg.learning_rate:g}) or keep --grad_clip on"
        )


def run_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint that stands for a run directory: its best_model.pth, else its
    latest_model.pth; None if it holds neither."""
    return next((run_dir / name for name in (BEST, LATEST) if (run_dir / name).is_file()), None)


def clean_stale_temporaries(out_dir: Path) -> None:
    """Remove half-written checkpoint files left by a process killed mid-save. Call only
    while holding the run directory's lock (no live writer can own them then)."""
    for tmp in Path(out_dir).glob(".*.pth.*.tmp"):
        tmp.unlink(missing_ok=True)
