"""The training loop: optimise a GPT on a tokenized corpus, evaluate, checkpoint, resume.

One :class:`Trainer` owns a run directory for the life of a run. Each iteration it takes one
optimiser step (AdamW, warm-up then cosine learning rate, gradient accumulation, clipping,
mixed precision); every ``eval_interval`` steps it measures train and val loss on fixed
batches, appends a row to ``metrics.jsonl``, and saves ``latest_model.pth`` (and
``best_model.pth`` on a new best val loss).

A checkpoint holds everything that decides the future of a run (weights, optimiser, scaler,
iteration, best loss, every RNG state), so a resumed run continues exactly where the saved
one stopped: on a CPU, bit for bit. SIGINT and SIGTERM finish the current step and save
before exiting; a NaN or infinite loss stops the run before it can overwrite a good
checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from . import checkpoint, hardware
from .config import TrainConfig
from .data import BatchSampler, TokenData
from .errors import SmolGPTError
from .files import atomic_write_text
from .model import GPT

log = logging.getLogger(__name__)

LATEST, BEST, METRICS = "latest_model.pth", "best_model.pth", "metrics.jsonl"


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint."""

    iter: int = 0  # optimiser steps completed
    evaluated: bool = False  # whether the evaluation at `iter` has been made and logged
    best_val_loss: float = math.inf
    evals_since_best: int = 0
    elapsed_s: float = 0.0  # training wall time, summed over all processes of the run


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; latest_model.pth was saved. exit_code is 128 + signal."""

    def __init__(self, signum: int, out_dir: Path, iteration: int):
        self.signum, self.out_dir, self.iteration = signum, out_dir, iteration
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} at iteration {iteration}")


class TrainingDiverged(SmolGPTError):
    """The loss became NaN or infinite."""


def learning_rate(cfg: TrainConfig, step: int, elapsed: float,
                  train_seconds: Optional[float] = None) -> float:
    """Linear warm-up, then constant or cosine decay to final_lr.

    With --time_budget the schedule runs on the fraction of the training time spent instead of
    the fraction of max_iters done: ``train_seconds`` is the budget less the time held back for
    the final evaluation (default: the whole budget), so the decay ends just as training does.
    The warm-up keeps its share (warmup_iters / max_iters).
    """
    if cfg.time_budget:
        horizon = train_seconds if train_seconds is not None else cfg.time_budget
        done = min(elapsed / max(horizon, 1e-9), 1.0)
        warm = min(cfg.warmup_iters / cfg.max_iters, 1.0)
        if done < warm:
            return cfg.learning_rate * max(done / warm, 1.0 / max(cfg.warmup_iters, 1))
    else:
        if step < cfg.warmup_iters:
            return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
        warm = cfg.warmup_iters / cfg.max_iters
        done = min(step / cfg.max_iters, 1.0)
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    decay = (done - warm) / max(1.0 - warm, 1e-9)  # 0 -> 1 over the decay phase
    return cfg.final_lr + 0.5 * (1.0 + math.cos(math.pi * decay)) * (cfg.learning_rate - cfg.final_lr)


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
            updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            by_shape: dict[torch.Size, list[int]] = {}
            for i, p in enumerate(params):
                by_shape.setdefault(p.shape, []).append(i)
            for shape, members in by_shape.items():
                ortho = orthogonalise(torch.stack([updates[i] for i in members]),
                                      group["ns_coefficients"], group["ns_steps"], group["eps"],
                                      self.ns_dtype)
                torch._foreach_add_([params[i] for i in members],
                                    list(ortho.to(params[members[0]].dtype).unbind(0)),
                                    alpha=-lr * _muon_lr_scale(group["adjust_lr_fn"], *shape))
        return loss


def _muon_lr_scale(adjust_lr_fn: Optional[str], rows: int, cols: int) -> float:
    """torch.optim.Muon's factor on the rate of a rows x cols matrix."""
    if adjust_lr_fn == "match_rms_adamw":  # the update's RMS matches AdamW's
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))  # "original" (the default): Keller Jordan's rule


def orthogonalise(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float, dtype: torch.dtype) -> torch.Tensor:
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


def make_optimizers(model: GPT, cfg: TrainConfig, device: torch.device,
                    muon_dtype: torch.dtype = torch.float32) -> list[torch.optim.Optimizer]:
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
        optimizers.append(BatchedMuon(muon_params, lr=cfg.muon_lr, ns_steps=cfg.muon_ns_steps,
                                      ns_dtype=muon_dtype, weight_decay=cfg.weight_decay,
                                      adjust_lr_fn="original"))
    return optimizers


def peak_lr(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> float:
    """The learning rate an optimiser peaks at; the schedule scales all of them alike."""
    return cfg.muon_lr if isinstance(optimizer, torch.optim.Muon) else cfg.learning_rate


class _SignalFlag:
    """Record SIGINT/SIGTERM instead of dying mid-step; a second signal stops at once."""

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
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _StepTimer:
    """Under --time_budget: how much of the budget training may use, so that the final
    evaluation still fits and the learning-rate decay ends when training does."""

    # An evaluation batch is a forward pass only: about a third of a training step's work,
    # rounded up so that an estimate errs towards finishing early rather than late.
    FORWARD_SHARE = 0.4

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.eval_s: Optional[float] = None  # the last evaluation's duration
        self.steps, self.step_s = 0, 0.0  # steps timed, and their total time (first excluded)

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
        budget = self.cfg.time_budget or 0.0
        return max(budget - self.final_eval_s(), 0.0)


class Trainer:
    """A training run in a run directory. Its clock starts when it is built: building the
    model and the optimisers (whose first use imports part of torch, seconds on a small
    CPU) counts against --time_budget, so that the whole process stays close to it."""

    def __init__(self, cfg: TrainConfig, data: TokenData, out_dir: Path, device: torch.device,
                 resume_from: Optional[dict] = None):
        self.clock_start = time.perf_counter()
        self.cfg, self.data, self.out_dir, self.device = cfg, data, Path(out_dir), device
        hardware.configure_backends(device)
        torch.manual_seed(cfg.seed)  # dropout and initialisation
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
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
        self.flops_per_token = self.model.estimate_flops_per_token()
        self.peak_flops = hardware.peak_flops(device, self.precision)

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
            if isinstance(optimizer, torch.optim.Muon):  # the run's setting, not the saved one
                for group in optimizer.param_groups:
                    group["ns_steps"] = self.cfg.muon_ns_steps
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

    def train_step(self, lr: float) -> torch.Tensor:
        """One optimiser step over gradient_accumulation_steps micro-batches; the mean loss
        stays on the device (reading it would wait for the GPU)."""
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = peak_lr(self.cfg, optimizer) * lr / self.cfg.learning_rate
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

    def _diverged(self, iteration: int) -> TrainingDiverged:
        return TrainingDiverged(
            f"the loss became NaN or infinite at iteration {iteration}: training stopped. "
            f"{BEST} and {LATEST} hold the last good state; lower --learning_rate "
            f"(now {self.cfg.learning_rate:g}) or keep --grad_clip on"
        )

    def _metrics_rewind(self) -> None:
        """Drop metrics rows written after the checkpoint being resumed (a crash between a
        row and its checkpoint leaves one), so every row is written exactly once."""
        path = self.out_dir / METRICS
        if not path.exists():
            return
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        keep = [r for r in rows if json.loads(r)["iter"] < self.progress.iter
                or (self.progress.evaluated and json.loads(r)["iter"] == self.progress.iter)]
        if len(keep) != len(rows):
            atomic_write_text(path, "".join(r + "\n" for r in keep))

    def run(self) -> Progress:
        """Train to max_iters (or the time budget); return the final progress."""
        cfg, p = self.cfg, self.progress
        log.info(
            "model: %.2fM parameters, %d layers, %d heads, %d wide, context %d | %s, %s",
            self.model.num_parameters() / 1e6, cfg.n_layer, cfg.n_head, cfg.n_embd,
            cfg.block_size, self.device.type, self.precision.describe(),
        )
        self._metrics_rewind()
        metrics = open(self.out_dir / METRICS, "a", encoding="utf-8")
        # Wall time of the whole run: what earlier processes of it spent, plus this one's.
        start, before = self.clock_start, p.elapsed_s
        elapsed = lambda: before + time.perf_counter() - start  # noqa: E731
        timing = _StepTimer(cfg)
        window_start, window_steps = time.perf_counter(), 0  # throughput since last eval
        loss_sum, loss_count = torch.zeros((), device=self.device), 0  # since last report
        bar = self._progress_bar()
        self.model.train()
        try:
            with _SignalFlag() as stop:
                while True:
                    if cfg.time_budget:  # stop early enough for the final evaluation to fit
                        # (after one step at least, should start-up eat a short budget)
                        finished = p.iter > 0 and elapsed() >= timing.train_seconds()
                    else:
                        finished = p.iter >= cfg.max_iters
                    early_stop = False
                    # A time-budgeted run skips the evaluation of the untrained model: it
                    # tells nothing (the loss is about ln(vocab)) and would eat the budget.
                    scheduled = p.iter % cfg.eval_interval == 0 and not (cfg.time_budget and p.iter == 0)
                    if (scheduled or finished) and not p.evaluated:
                        eval_start = time.perf_counter()
                        losses = self.evaluate()
                        if not all(map(math.isfinite, losses.values())):
                            raise self._diverged(p.iter)
                        timing.eval_s = time.perf_counter() - eval_start
                        if cfg.time_budget and not finished:  # this one may serve as the final
                            finished = elapsed() >= timing.train_seconds()
                        row = self._record(losses, elapsed(), window_steps,
                                           eval_start - window_start, timing.train_seconds())
                        metrics.write(json.dumps(row) + "\n")
                        metrics.flush()
                        p.evaluated, p.elapsed_s = True, elapsed()
                        # latest first: a run directory with any checkpoint has a latest one.
                        self.save(LATEST)
                        if p.evals_since_best == 0:
                            self.save(BEST)
                        self._report_eval(row, new_best=p.evals_since_best == 0)
                        early_stop = 0 < cfg.early_stop_patience <= p.evals_since_best
                        window_start, window_steps = time.perf_counter(), 0
                    if early_stop:
                        log.info("early stop: no new best val loss in %d evaluations",
                                 cfg.early_stop_patience)
                        break
                    if finished:
                        break

                    lr = learning_rate(cfg, p.iter, elapsed(), timing.train_seconds())
                    step_start = time.perf_counter()
                    loss = self.train_step(lr)
                    p.iter, p.evaluated = p.iter + 1, False
                    window_steps += 1
                    # Reading a loss makes the host wait for the device. On a CPU that costs
                    # nothing, so every step is checked; elsewhere only at progress lines.
                    if self.device.type == "cpu" and not math.isfinite(loss.item()):
                        raise self._diverged(p.iter)
                    timing.add_step(time.perf_counter() - step_start)
                    loss_sum, loss_count = loss_sum + loss, loss_count + 1
                    if p.iter % cfg.log_interval == 0:
                        mean_loss = loss_sum.item() / loss_count
                        if not math.isfinite(mean_loss):
                            raise self._diverged(p.iter)
                        seconds = time.perf_counter() - window_start
                        self._report_step(mean_loss, lr, elapsed(), window_steps, seconds, bar)
                        loss_sum, loss_count = torch.zeros((), device=self.device), 0
                    if bar is not None:
                        bar.n = int(elapsed()) if cfg.time_budget else p.iter
                        bar.refresh()
                    if stop.signum is not None:
                        p.elapsed_s = elapsed()
                        self.save(LATEST)
                        raise TrainingInterrupted(stop.signum, self.out_dir, p.iter)
        finally:
            metrics.close()
            if bar is not None:
                bar.close()
        return p

    # ----------------------------------------------------------------- reporting

    def _record(self, losses: dict, elapsed: float, steps: int, train_s: float,
                train_seconds: float) -> dict:
        """Update best-loss bookkeeping and return this evaluation's metrics row."""
        p = self.progress
        if losses["val"] < p.best_val_loss:
            p.best_val_loss, p.evals_since_best = losses["val"], 0
        else:
            p.evals_since_best += 1
        tokens_per_s = steps * self.tokens_per_step / train_s if steps else 0.0
        return {
            "iter": p.iter,
            "train_loss": round(losses["train"], 6),
            "val_loss": round(losses["val"], 6),
            "best_val_loss": round(p.best_val_loss, 6),
            "lr": learning_rate(self.cfg, max(p.iter - 1, 0), elapsed, train_seconds),
            "elapsed_s": round(elapsed, 3),
            "tokens_per_s": round(tokens_per_s, 1),
            "mfu": round(self._mfu(tokens_per_s), 4),
        }

    def _mfu(self, tokens_per_s: float) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the measured matmul peak."""
        return self.flops_per_token * tokens_per_s / self.peak_flops

    def _progress_bar(self) -> Optional[tqdm]:
        if not sys.stderr.isatty():
            return None
        total = int(self.cfg.time_budget) if self.cfg.time_budget else self.cfg.max_iters
        return tqdm(total=total, initial=0, unit="s" if self.cfg.time_budget else "it",
                    file=sys.stderr, dynamic_ncols=True, leave=True)

    def _report_step(self, loss: float, lr: float, elapsed: float, steps: int, seconds: float,
                     bar: Optional[tqdm]) -> None:
        tok_s = steps * self.tokens_per_step / max(seconds, 1e-9)
        if self.cfg.time_budget:
            left = max(self.cfg.time_budget - elapsed, 0.0)
        else:
            left = (self.cfg.max_iters - self.progress.iter) * seconds / max(steps, 1)
        fields = dict(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}",
                      mfu=f"{100 * self._mfu(tok_s):.1f}%", left=_duration(left))
        if bar is not None:
            bar.set_postfix(fields, refresh=False)
        else:
            log.info("iter %d | %s", self.progress.iter,
                     " | ".join(f"{k} {v}" for k, v in fields.items()))

    def _report_eval(self, row: dict, new_best: bool) -> None:
        best = " (new best)" if new_best else ""
        log.info("eval @ iter %d: train %.4f, val %.4f%s", row["iter"], row["train_loss"],
                 row["val_loss"], best)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def clean_stale_temporaries(out_dir: Path) -> None:
    """Remove half-written checkpoint files left by a process killed mid-save. Call only
    while holding the run directory's lock (no live writer can own them then)."""
    for tmp in Path(out_dir).glob(".*.pth.*.tmp"):
        tmp.unlink(missing_ok=True)
