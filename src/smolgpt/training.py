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
import json
import logging
import math
import signal
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from . import checkpoint, hardware, kernels
from .batches import BatchSampler
from .config import TrainConfig
from .distributed import Group, replicate
from .errors import SmolGPTError
from .evaluate import bits_per_char, score_splits
from .model import GPT
from .optim import (
    Budget,
    batch_rows,
    continued_schedule,
    lr_multiplier,
    make_optimizers,
    set_learning_rates,
    use_settings,
)
from .rundir import BEST, LATEST
from .runlog import (
    EVAL_PROGRESS_S,
    PROJECT_AFTER_STEPS,
    RunLog,
    duration,
    log_measured,
    log_start,
    projection,
)
from .signals import SignalFlag
from .tokendata import TokenData
from .version import __version__

log = logging.getLogger(__name__)


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

    def record(self, losses: dict[str, float]) -> bool:
        """Take in an evaluation's losses ("val", optionally "val_bits_per_char"); return
        whether its val loss is a new best."""
        new_best = losses["val"] < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, losses["val"])
        self.evals_since_best = 0 if new_best else self.evals_since_best + 1
        self.last_val_loss = losses["val"]
        self.last_val_bits_per_char = losses.get("val_bits_per_char")
        if new_best:
            self.best_val_bits_per_char = self.last_val_bits_per_char
        return new_best


class TrainingInterrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived; latest_model.pth was saved. exit_code is
    128 + signal, as a shell reports a process killed by it."""

    def __init__(self, signum: int, out_dir: Path, iteration: int):
        self.signum, self.out_dir, self.iteration = signum, out_dir, iteration
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} at iteration {iteration}")


class TrainingDiverged(SmolGPTError):
    """The loss became NaN or infinite."""


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
        self.replicated = replicate(self.training_loss, group, device)  # DDP under torchrun
        # loss(x, y): the mean loss of a batch, what a training step differentiates.
        self.loss = torch.compile(self.replicated) if cfg.compile else self.replicated
        # Evaluations need no gradients, so no DDP: each rank scores its own windows.
        self.eval_loss = self.loss if not group.distributed else self.training_loss

    # ----------------------------------------------------------------- state

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        checkpoint.restore_optimizers(self.optimizers, ckpt["optimizer"])
        use_settings(self.optimizers, self.cfg)
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.progress = p = Progress(**ckpt["progress"])
        if p.tokens is None:
            p.tokens = p.iter * self.tokens_per_step(self.cfg.batch_size)
        checkpoint.restore_rng(ckpt["rng"], self.group.rank, self.device)
        self.sampler.load_state_dict(ckpt["rng"]["sampler"])
        saved = ckpt.get("train_config") or {}
        p.extended_at = continued_schedule(self.cfg, saved, p.iter, p.elapsed_s, p.done) or (
            p.extended_at
        )

    def state(self) -> dict:
        """The checkpoint dictionary for the run as it stands now (every rank's RNG states
        gathered: a collective, which every rank calls)."""
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
                **checkpoint.rng_states(self.group, self.device),
                "sampler": self.sampler.state_dict(),  # the same on every rank
            },
            # The text: its hash, its name as read, and where it is (older checkpoints: no path).
            "data": {
                "fingerprint": self.data.fingerprint,
                "source": self.data.source,
                "path": self.data.corpus.location if self.data.corpus else None,
            },
            "run_info": checkpoint.run_info(
                __version__, self.device, self.precision.describe(), self.group.world_size
            ),
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
        stop: Optional[SignalFlag] = None,
        report: Optional[Callable[[int, int], None]] = None,
    ) -> Optional[dict[str, float]]:
        """Mean loss of each split over the same windows at every evaluation (so successive
        numbers differ only because the model did; see evaluate.score_splits), at most
        eval_iters x batch_size windows (under a time budget, its planned batches), and with
        the validation text's size known, "val_bits_per_char" too. report(batches scored,
        batches in all) is called after each batch.

        With a stop flag, returns None as soon as a signal has been recorded (checked after
        every batch): a long evaluation is abandoned rather than awaited. Evaluating changes
        nothing a checkpoint holds (it draws no random number, and dropout is off), so the
        run's state is then still the state from before it."""
        group, data = self.group, self.data

        def should_stop() -> bool:  # (a distributed evaluation is never abandoned: the
            # other ranks would wait for it)
            return stop is not None and not group.distributed and stop.signum is not None

        self.model.eval()
        if stop is not None:
            stop.evaluating = True
        try:
            out = score_splits(
                self.eval_loss,
                {"train": data.train, "val": data.val},
                self.cfg.block_size,
                self.budget.eval_batches * self.cfg.batch_size,
                self.cfg.batch_size,
                self.precision.autocast,
                group,
                self.device,
                should_stop,
                report,
            )
            if out is not None and data.val_chars:
                out["val_bits_per_char"] = bits_per_char(
                    out["val"], len(data.val) - 1, data.val_unk_bytes, data.val_chars
                )
            return out
        finally:
            self.model.train()
            if stop is not None:
                stop.evaluating = False

    # ----------------------------------------------------------------- the loop

    def run(self) -> Progress:
        """Train until the budget is spent or early stopping; return the final progress."""
        p, group, device = self.progress, self.group, self.device
        log_start(self.cfg, self.model.num_parameters(), device, self.precision.describe(), group)
        batch_s, pass_s = self._time_passes()  # and on a CPU, choose the threads
        peak = hardware.peak_flops(device, self.precision)
        run_log = RunLog(
            self.cfg,
            self.out_dir,
            self.model.estimate_flops_per_token(),
            peak,
            iteration=p.iter,
            elapsed=p.elapsed_s,
            group=group,
        )
        dtype = self.precision.reduced or torch.float32
        log_measured(
            f"{peak / 1e9:.1f} GFLOP/s a process ({hardware.peak_key(device, dtype)}",
            hardware.describe_threads(self.busy_cores, self.threads_timed_against)
            if device.type == "cpu"
            else None,
        )
        run_log.rewind(p.iter, p.evaluated)
        self._plan(batch_s, pass_s)
        self.model.train()
        with run_log, SignalFlag() as stop:
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

    def _agree(self, decision: int, stop: SignalFlag) -> tuple[int, int]:
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
        """(one evaluation batch's seconds, one training pass's), timed on a batch of the
        validation split (see hardware.PassTimes); on a busy CPU the thread count may change
        to the faster."""
        x, y = BatchSampler(
            self.data.val, self.cfg.block_size, self.cfg.batch_size, self.cfg.seed, self.device
        ).next()
        times = hardware.time_passes(
            self.model, self.eval_loss, self.training_loss, x, y, self.precision, self.device
        )
        self.busy_cores, self.threads_timed_against = times.busy_cores, times.timed_against
        return times.batch_s, times.pass_s

    def _evaluate_and_save(self, run_log: RunLog, stop: SignalFlag) -> bool:
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
        new_best = p.record(losses)
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
