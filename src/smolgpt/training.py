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
import logging
import math
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from . import checkpoint, hardware, kernels
from .batches import BatchSampler
from .checkpoint import Checkpoint, Progress
from .config import TrainConfig
from .distributed import Group, training_losses
from .errors import SmolGPTError
from .evaluate import score_run
from .model import GPT
from .optim import (
    Budget,
    batch_rows,
    continued_schedule,
    lr_multiplier,
    make_optimizers,
    optimizer_step,
    set_learning_rates,
    tokens_per_step,
    use_settings,
)
from .rundir import BEST, LATEST
from .runlog import (
    EVAL_PROGRESS_S,
    PROJECT_AFTER_STEPS,
    RunLog,
    log_start,
    open_log,
    plan,
    projection,
)
from .signals import RunStops, SignalFlag
from .tokendata import TokenData
from .version import __version__

log = logging.getLogger(__name__)


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
        resume_from: Optional[Checkpoint] = None,
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
        self.scaler = self.precision.grad_scaler()
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
        self.stops = RunStops(group, device)  # signals and non-finite losses
        if resume_from is not None:
            self._restore(resume_from)
        self.budget = Budget(cfg, clock_start, self.progress.elapsed_s, self.progress.extended_at)
        self.losses = training_losses(self.training_loss, group, device, cfg.compile)

    def _restore(self, ckpt: Checkpoint) -> None:
        cfg = self.cfg
        checkpoint.restore_training(
            ckpt, self.model, self.optimizers, self.scaler, self.sampler, self.group, self.device
        )
        use_settings(self.optimizers, cfg)
        self.progress = p = dataclasses.replace(ckpt.progress)
        if p.tokens is None:
            p.tokens = p.iter * tokens_per_step(cfg, cfg.batch_size, self.group.world_size)
        p.extended_at = (
            continued_schedule(cfg, ckpt.train_config, p.iter, p.elapsed_s, p.done) or p.extended_at
        )

    def state(self) -> Checkpoint:
        """The checkpoint of the run as it stands now (every rank's RNG states gathered: a
        collective, which every rank calls)."""
        return Checkpoint(
            model_config=self.model_config,
            tokenizer=self.data.tokenizer,
            model=self.model.state_dict(),
            train_config=dataclasses.asdict(self.cfg),
            progress=dataclasses.replace(self.progress, done=self.budget.done(self.progress.iter)),
            optimizer=[opt.state_dict() for opt in self.optimizers],
            scaler=self.scaler.state_dict() if self.scaler else None,
            rng={
                **checkpoint.rng_states(self.group, self.device),
                "sampler": self.sampler.state_dict(),  # the same on every rank
            },
            data=self.data.describe(),
            run_info=checkpoint.run_info(
                __version__, self.device, self.precision.describe(), self.group.world_size
            ),
        )

    def save(self, name: str) -> None:
        """Write the checkpoint name (rank 0; every rank calls it, see state)."""
        state = self.state()
        if self.group.is_main:
            checkpoint.save(self.out_dir / name, state)

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
            with self.losses.accumulating(last=micro == steps - 1):
                with self.precision.autocast():
                    loss = self.losses.train(x, y)
                loss = loss / steps
                with self.group.talking_inside_torch():
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        optimizer_step(
            self.optimizers, list(self.model.parameters()), self.cfg.grad_clip, self.scaler
        )
        return total

    @torch.no_grad()
    def evaluate(
        self, stop: Optional[SignalFlag] = None, report: Optional[Callable[[int, int], None]] = None
    ) -> Optional[dict[str, float]]:
        """Mean loss of each split over the same windows at every evaluation (so successive
        numbers differ only because the model did; see evaluate.score_run), at most
        eval_iters x batch_size windows (under a time budget, its planned batches), and
        "val_bits_per_char". report(batches scored, batches in all) is called after each.

        With a stop flag, returns None as soon as a signal has been recorded (checked after
        every batch): a long evaluation is abandoned rather than awaited. Evaluating changes
        nothing a checkpoint holds (it draws no random number, and dropout is off), so the
        run's state is then still the state from before it."""
        # A distributed evaluation is never abandoned: the other ranks would wait for it.
        can_stop = stop is not None and not self.group.distributed
        cfg = self.cfg
        self.model.eval()
        try:
            with stop.evaluation() if stop is not None else contextlib.nullcontext():
                return score_run(
                    self.losses.eval,
                    self.data,
                    cfg.block_size,
                    self.budget.eval_batches * cfg.batch_size,
                    cfg.batch_size,
                    self.precision.autocast,
                    self.group,
                    self.device,
                    lambda: can_stop and stop.signum is not None,
                    report,
                )
        finally:
            self.model.train()

    def run(self) -> Progress:
        """Train until the budget is spent or early stopping; return the final progress."""
        p, group, device, cfg = self.progress, self.group, self.device, self.cfg
        log_start(cfg, self.model.num_parameters(), device, self.precision.describe(), group)
        times = self._time_passes()  # and on a CPU, choose the threads
        run_log = open_log(cfg, self.out_dir, self.model, self.precision, times, p, group, device)
        step_s = times.pass_s * cfg.gradient_accumulation_steps
        plan(self.budget, p, times.batch_s, step_s, group, device)
        self.model.train()
        with run_log, self.stops:
            while True:
                # Rank 0's clock decides for every rank: 2 finished, 1 evaluate now, 0 step.
                now = 2 if self.budget.finished(p.iter) else int(self.budget.evaluation_due(p.iter))
                now, signum = self._agree(now)
                if signum:  # after a step, or at the start
                    raise self._save_interrupted(signum)
                finished = now == 2
                if now and not p.evaluated:
                    finished, _ = self._agree(self._evaluate_and_save(run_log, self.stops.flag))
                    if 0 < cfg.early_stop_patience <= p.evals_since_best:
                        log.info(
                            "early stop: no new best val loss in %d evaluations",
                            cfg.early_stop_patience,
                        )
                        break
                if finished:
                    run_log.finish()
                    break
                self._step(run_log)
        if group.world_size > 1:
            log.info("the %d ranks held identical weights at every evaluation", group.world_size)
        return p

    def _agree(self, decision: int) -> tuple[int, int]:
        """(rank 0's decision, the signal any rank had received, 0 if none): see RunStops.
        A non-finite loss any rank met ends them all."""
        decision, signum, diverged = self.stops.agree(decision)
        if diverged:
            raise self._diverged()
        return decision, signum

    def _save_interrupted(self, signum: int) -> TrainingInterrupted:
        """Save the run as it stands, for --resume to carry on from, and return the
        exception that ends it."""
        self.progress.elapsed_s = self.budget.elapsed()
        self.save(LATEST)
        # No rank exits before rank 0 has saved: torchrun ends the others when one exits.
        self.group.barrier()
        return TrainingInterrupted(signum, self.out_dir, self.progress.iter)

    def _step(self, run_log: RunLog) -> None:
        p = self.progress
        done = self.budget.done(p.iter)
        if self.cfg.time_budget:  # a schedule by time follows rank 0's clock on every rank
            done = self.group.from_main(done, self.device)
        multiplier, rows = lr_multiplier(self.cfg, p.iter, done), batch_rows(self.cfg, done)
        start = time.perf_counter()
        loss = self.train_step(multiplier, rows)
        p.iter, p.evaluated = p.iter + 1, False
        step_tokens = tokens_per_step(self.cfg, rows, self.group.world_size)
        p.tokens += step_tokens
        # Reading a loss makes the host wait for the device. On a CPU that costs nothing, so
        # every step is checked; elsewhere only at progress lines.
        if self.device.type == "cpu" and not math.isfinite(loss.item()):
            self._lose_finiteness()
        self.budget.add_step(time.perf_counter() - start)
        if self.budget.steps == PROJECT_AFTER_STEPS and not self.cfg.time_budget:
            log.info(projection(self.budget, p.iter, self.device)[0])  # measured now
        reported = run_log.step(
            p.iter, loss, self.cfg.learning_rate * multiplier, self.budget.elapsed(), step_tokens
        )
        if reported is not None and not math.isfinite(reported):
            self._lose_finiteness()

    def _time_passes(self) -> hardware.PassTimes:
        """Time an evaluation batch and a training pass on a batch of the validation split
        (see hardware.time_passes); on a busy CPU the thread count may change to the faster."""
        cfg = self.cfg
        sampler = BatchSampler(self.data.val, cfg.block_size, cfg.batch_size, cfg.seed, self.device)
        x, y = sampler.next()
        return hardware.time_passes(
            self.model, self.losses.eval, self.training_loss, x, y, self.precision, self.device
        )

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
        lr = self.budget.learning_rate(max(p.iter - 1, 0))
        elapsed = self.budget.elapsed()
        scale = self.scaler.get_scale() if self.scaler else None
        run_log.evaluation(
            p.iter, losses, p.best_val_loss, new_best, lr, elapsed, scoring_s, p.tokens, scale
        )
        if self.on_evaluation is not None:
            self.on_evaluation(self.model, p.iter, losses)
        # The metrics row, loss.png and on_evaluation count as the evaluation's time too.
        self.budget.eval_s = time.perf_counter() - start
        self.budget.evaluated(p.iter)
        p.evaluated, p.elapsed_s = True, self.budget.elapsed()
        checkpoint.check_replicas(self.model, self.group, p.iter)
        self.save(LATEST)  # first: a run directory with any checkpoint has a latest one
        if new_best:
            self.save(BEST)
        return self.budget.finished(p.iter)

    def _lose_finiteness(self) -> None:
        if self.stops.lose_finiteness():
            raise self._diverged()

    def _diverged(self) -> TrainingDiverged:
        return TrainingDiverged(
            f"the loss became NaN or infinite at iteration {self.progress.iter}: training "
            f"stopped. {BEST} and {LATEST} hold the last good state; lower --learning_rate "
            f"(now {self.cfg.learning_rate:g}) or keep --grad_clip on"
        )
