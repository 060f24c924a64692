"""Optimisers and the schedules of a training run.

:func:`make_optimizers` gives a run AdamW, or with ``--optimizer muon``, AdamW plus Muon
(:class:`BatchedMuon`) for the blocks' weight matrices. :func:`lr_multiplier` is the
learning-rate schedule: a multiple of each optimiser's peak rate, the same for all of them,
as a function of how far training has got; :func:`batch_rows` the batch-size schedule.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional

import torch

from .config import BUDGET_EVALUATIONS, TrainConfig
from .model import GPT

# Under --time_budget the first step learns at this share of the peak rate at least: its
# warm-up position is the elapsed time, which may be near zero.
WARMUP_FLOOR = 0.01


def lr_multiplier(cfg: TrainConfig, step: int, done: float) -> float:
    """The learning rate as a share of its peak: a linear warm-up, then constant, or a cosine
    or linear decay to ``final_lr`` by the end of training.

    step: optimiser steps completed; done: how far along its schedule the run is, in [0, 1]
    (the share of training done: see ``Budget.done``). A run counted in steps warms
    up over ``warmup_iters`` steps; a time-budgeted run over ``warmup_budget_share`` of it.
    """
    if warming_up(cfg, step, done):
        if cfg.time_budget:
            return max(done / cfg.warmup_budget_share, WARMUP_FLOOR)
        return (step + 1) / (cfg.warmup_iters + 1)
    if cfg.lr_schedule == "constant":
        return 1.0
    floor = cfg.final_lr / cfg.learning_rate
    decayed = decay_share(cfg, done)
    if cfg.lr_schedule == "linear":
        # Spends longer near the peak than cosine does and falls faster at the very end. With
        # min_lr 0 it beat cosine by 0.004 in one pair of 600 s runs, less than runs of the
        # same settings differ (about 0.02): not settled (benchmarks/RESULTS.md).
        return floor + (1.0 - decayed) * (1.0 - floor)
    return floor + 0.5 * (1.0 + math.cos(math.pi * decayed)) * (1.0 - floor)


# --batch_warmup's first steps train on this share of batch_size.
BATCH_WARMUP_START = 0.25


def batch_rows(cfg: TrainConfig, done: float) -> int:
    """The sequences of each micro-batch that a step trains on, `done` of the way through
    training: batch_size, or under ``batch_warmup`` a quarter of it at first, growing
    linearly to all of it by batch_warmup of the way (one at least).

    Early in training the gradient points the same way in most sequences, so a small batch
    estimates it nearly as well as a big one, and on a CPU, where a step's time grows with
    its batch, buys more steps per second; later, when the gradients of different sequences
    disagree more, the whole batch pays for itself.
    """
    if done >= cfg.batch_warmup:
        return cfg.batch_size
    share = BATCH_WARMUP_START + (1.0 - BATCH_WARMUP_START) * done / cfg.batch_warmup
    return max(1, min(cfg.batch_size, round(cfg.batch_size * share)))


def warming_up(cfg: TrainConfig, step: int, done: float) -> bool:
    """Whether the schedule is still warming up after `step` steps, `done` of the way."""
    return done < cfg.warmup_budget_share if cfg.time_budget else step < cfg.warmup_iters


def warmup_share(cfg: TrainConfig) -> float:
    """Where warm-up ends, as a share of training: warmup_budget_share of a time budget, or
    warmup_iters of the step limit."""
    return cfg.warmup_budget_share if cfg.time_budget else cfg.warmup_iters / cfg.step_limit


def decay_share(cfg: TrainConfig, done: float) -> float:
    """How far the decay has got at `done`: 0 at the end of warm-up (the peak rate),
    1 at the end of training (final_lr)."""
    warm = warmup_share(cfg)
    return min(max((done - warm) / max(1.0 - warm, 1e-9), 0.0), 1.0)


class BatchedMuon(torch.optim.Muon):
    """PyTorch's Muon, with all the matrices of one shape orthogonalised together.

    torch.optim.Muon runs its Newton-Schulz iterations one matrix at a time, some twenty
    small operations per matrix, whose fixed cost dominates a step at nano and micro sizes.
    Here the matrices of one shape (every block's c_attn, every block's c_fc, ...) are
    stacked and iterated as batched products, and the momentum and weight decay are applied
    to all matrices in single list operations. The hyper-parameters, the update and the
    state (one momentum buffer per matrix) are torch.optim.Muon's, so either can load the
    other's checkpoints.

    ``ns_dtype`` is the dtype of the iteration. torch.optim.Muon always uses bf16: right
    where bf16 products are native, some 100x slower than float32 where they are emulated.
    The trainer passes its precision policy's ``muon_dtype``; in bf16 the result is
    torch.optim.Muon's, bit for bit.
    """

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            buffers = []
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
                buffers.append(self.state[p]["momentum_buffer"])
            # torch._foreach_*: one call for a whole list of tensors (what PyTorch's own
            # optimisers use for speed).
            momentum, lr = group["momentum"], group["lr"]
            torch._foreach_lerp_(buffers, grads, 1 - momentum)
            updates = (
                torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
            )
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            by_shape: dict[torch.Size, list[int]] = {}
            for i, p in enumerate(params):
                by_shape.setdefault(p.shape, []).append(i)
            for shape, members in by_shape.items():
                ortho = orthogonalise(
                    torch.stack([updates[i] for i in members]),
                    group["ns_coefficients"],
                    group["ns_steps"],
                    group["eps"],
                    self.ns_dtype,
                )
                torch._foreach_add_(
                    [params[i] for i in members],
                    list(ortho.to(params[members[0]].dtype).unbind(0)),
                    alpha=-lr * _muon_lr_scale(group["adjust_lr_fn"], *shape),
                )
        return loss


def _muon_lr_scale(adjust_lr_fn: Optional[str], rows: int, cols: int) -> float:
    """torch.optim.Muon's factor on the rate of a rows x cols matrix."""
    if adjust_lr_fn == "match_rms_adamw":  # the update's RMS matches AdamW's
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))  # "original" (the default): Keller Jordan's rule


def orthogonalise(
    g: torch.Tensor,
    coefficients: tuple[float, float, float],
    steps: int,
    eps: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Approximately the nearest orthogonal matrix to each matrix of g (n, rows, cols),
    computed in dtype: Muon's quintic Newton-Schulz iteration, as torch.optim.Muon computes
    it (in bf16). Each step maps every singular value s to about a*s + b*s^3 + c*s^5, which
    pushes them towards 1."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # singular values <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def make_optimizers(
    model: GPT, cfg: TrainConfig, device: torch.device, muon_dtype: torch.dtype = torch.float32
) -> list[torch.optim.Optimizer]:
    """The optimisers of a run: [AdamW] or, with --optimizer muon, [AdamW, Muon].

    Muon (Jordan et al. 2024) keeps a momentum of each weight matrix's gradient and replaces
    it by the nearest orthogonal matrix (a few Newton-Schulz iterations) before the update,
    so every direction of the matrix learns at the same rate instead of a few dominant ones.
    It suits the 2-D weights inside the blocks; embeddings, the tied output head, biases and
    LayerNorm gains stay with AdamW. AdamW decays matrices only, and uses the fused kernel
    where the device has one. Muon's iteration runs in muon_dtype (the precision policy's).
    """
    muon_params = model.hidden_matrices() if cfg.optimizer == "muon" else []
    groups = model.optimizer_groups(cfg.weight_decay, exclude=muon_params)
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
    if device.type in ("cuda", "cpu"):
        optimizers: list[torch.optim.Optimizer] = [torch.optim.AdamW(groups, fused=True, **kwargs)]
    else:
        optimizers = [torch.optim.AdamW(groups, foreach=True, **kwargs)]
    if muon_params:
        optimizers.append(
            BatchedMuon(
                muon_params,
                lr=cfg.muon_lr,
                ns_steps=cfg.muon_ns_steps,
                ns_dtype=muon_dtype,
                weight_decay=cfg.weight_decay,
                adjust_lr_fn="original",
            )
        )
    return optimizers


def set_learning_rates(
    optimizers: list[torch.optim.Optimizer], cfg: TrainConfig, multiplier: float
) -> None:
    """Set every optimiser to ``multiplier`` times its peak rate (Muon's is cfg.muon_lr,
    AdamW's cfg.learning_rate)."""
    for optimizer in optimizers:
        peak = cfg.muon_lr if isinstance(optimizer, torch.optim.Muon) else cfg.learning_rate
        for group in optimizer.param_groups:
            group["lr"] = peak * multiplier


def use_settings(optimizers: list[torch.optim.Optimizer], cfg: TrainConfig) -> None:
    """After loading optimiser states from a checkpoint: the run's own Muon setting
    (--muon_ns_steps may change on resume), not the saved one."""
    for optimizer in optimizers:
        if isinstance(optimizer, torch.optim.Muon):
            for group in optimizer.param_groups:
                group["ns_steps"] = cfg.muon_ns_steps


def optimizer_step(
    optimizers: list[torch.optim.Optimizer],
    parameters: list[torch.nn.Parameter],
    grad_clip: float,
    scaler: Optional[torch.amp.GradScaler] = None,
) -> None:
    """Apply the accumulated gradients: clip their norm to grad_clip (0: no clipping), step
    every optimiser and clear the gradients. With an fp16 gradient scaler, the gradients are
    unscaled first and a step whose gradients overflowed is skipped (not a fault: the scale
    is lowered for the next)."""
    if scaler:
        for optimizer in optimizers:
            scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    for optimizer in optimizers:
        if scaler:
            scaler.step(optimizer)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if scaler:
        scaler.update()


def tokens_per_step(cfg: TrainConfig, rows: int, world_size: int = 1) -> int:
    """Training tokens in one step of `rows` sequences per micro-batch, every rank's."""
    return rows * cfg.block_size * cfg.gradient_accumulation_steps * world_size


# Evaluations of a time-budgeted run take at most this share of the budget in all.
EVAL_SHARE = 0.1


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

    def learning_rate(self, step: int) -> float:
        """AdamW's learning rate at `step`: its peak times lr_multiplier."""
        return self.cfg.learning_rate * lr_multiplier(self.cfg, step, self.done(step))

    def evaluation_due(self, iteration: int) -> bool:
        """Every eval_interval steps, the start included; under a time budget without one,
        at the start and whenever training has passed the next of its points in time."""
        if self.cfg.eval_every is not None:
            return iteration % self.cfg.eval_every == 0
        return iteration == 0 or self.point(iteration) > self.points_evaluated

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


def continued_schedule(
    cfg: TrainConfig, saved: dict, iteration: int, elapsed: float, done: Optional[float]
) -> Optional[list]:
    """Where --resume changed the run's horizon (max_iters or time_budget) after warm-up:
    where the old schedule's decay had got to, [iteration, elapsed, decay share], for the new
    one to go on from there (Budget.done), so that the learning rate does not jump back up.
    None where the horizon is unchanged, or during warm-up (warm-up goes on as configured).
    saved: the checkpoint's train_config; done: how far along its schedule it was saved
    (None in older checkpoints: then the share of its steps or budget)."""
    old = dataclasses.replace(
        cfg,
        max_iters=saved.get("max_iters", cfg.max_iters),
        time_budget=saved.get("time_budget", cfg.time_budget),
    )
    if (old.step_limit, old.time_budget) == (cfg.step_limit, cfg.time_budget):
        return None
    if done is None:
        done = Budget(old, time.perf_counter()).share(iteration, elapsed)
    if warming_up(old, iteration, done):
        return None
    return [iteration, elapsed, decay_share(old, done)]
