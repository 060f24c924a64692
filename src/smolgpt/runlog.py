"""What a training run reports: ``metrics.jsonl``, progress (a bar on a terminal, plain lines
elsewhere) and MFU.

:class:`RunLog` is told about every step and every evaluation and keeps the counts that
reports need (loss since the last line, steps and seconds since the last evaluation); it
decides nothing about training.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from .checkpoint import Progress
from .config import TrainConfig
from .distributed import Group
from .extras import install_command
from .files import atomic_write_text
from .hardware import PassTimes, PrecisionPolicy, describe_threads, peak_flops, peak_key
from .optim import Budget
from .rundir import METRICS, TENSORBOARD

log = logging.getLogger(__name__)

# An evaluation expected to take longer than this reports how far it has got this often.
EVAL_PROGRESS_S = 10.0
# The TensorBoard name of each metrics key: loss curves together, the rest apart.
BOARD_TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "val_bits_per_char": "val_bits_per_char",
    "lr": "lr",
    "tokens_per_s": "throughput/tokens_per_s",
    "mfu": "throughput/mfu",
}


class RunLog:
    """The reports of one run into ``out_dir``; use as a context manager (it opens
    metrics.jsonl and the progress bar, and closes them).

    flops_per_token and peak_flops: the model's training FLOPs per token and the device's
    matmul peak, for MFU (model FLOPs utilisation). iteration and elapsed: where the run
    starts (a resumed run's bar starts there, so that its rate and ETA count only the steps
    of this process).

    On a terminal the bar counts steps of max_iters (with this process's rate and ETA), or
    under --time_budget seconds of the budget (no rate or ETA: the budget is the time left);
    it ends at 100% when the budget ends training.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: Path,
        flops_per_token: float,
        peak_flops: float,
        iteration: int = 0,
        elapsed: float = 0.0,
        group: Group = Group(),
    ):
        self.cfg, self.path, self.group = cfg, Path(out_dir) / METRICS, group
        self.start_iteration, self.start_elapsed = iteration, elapsed
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops * group.world_size
        self.file = None
        self.bar: Optional[tqdm] = None
        self._restart_window()
        self.loss_sum: Optional[torch.Tensor] = None  # training loss since the last line
        self.loss_count = 0
        self.plot_failed = False  # said once; no more tries
        self.board = None  # a TensorBoard SummaryWriter (--tensorboard)
        self.purge_from: Optional[int] = None  # the first step a resumed run logs again

    def __enter__(self) -> "RunLog":
        if not self.group.is_main:  # rank 0 alone reports and writes
            return self
        if self.cfg.plot:
            self._prepare_plots()
        if self.cfg.tensorboard:
            self.board = tensorboard_writer(self.path.parent / TENSORBOARD, self.purge_from)
        self.file = open(self.path, "a", encoding="utf-8")
        if sys.stderr.isatty():
            if self.cfg.time_budget:
                self.bar = tqdm(
                    total=self.cfg.time_budget,
                    initial=self.start_elapsed,
                    file=sys.stderr,
                    dynamic_ncols=True,
                    bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s{postfix}",
                )
            else:
                self.bar = tqdm(
                    total=self.cfg.step_limit,
                    initial=self.start_iteration,
                    unit="it",
                    file=sys.stderr,
                    dynamic_ncols=True,
                )
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()
        if self.bar is not None:
            self.bar.close()

    def rewind(self, iteration: int, evaluated: bool) -> None:
        """Drop rows written after the checkpoint being resumed (a crash between a row and
        its checkpoint leaves one), so that every row is written exactly once (and TensorBoard
        forgets those steps too). Call before entering."""
        self.purge_from = iteration + 1 if evaluated else iteration
        if not self.group.is_main or not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        keep = [
            r
            for r in rows
            if json.loads(r)["iter"] < iteration
            or (evaluated and json.loads(r)["iter"] == iteration)
        ]
        if len(keep) != len(rows):
            atomic_write_text(self.path, "".join(r + "\n" for r in keep))

    def mfu(self, tokens_per_s: float) -> float:
        """Achieved training FLOP/s over the measured matmul peak, at most 1: the peak is a
        measurement, and a model's products cannot outrun the fastest product measured."""
        return min(1.0, self.flops_per_token * tokens_per_s / self.peak_flops)

    def _restart_window(self) -> None:
        """Throughput counts the steps and tokens since the last evaluation."""
        self.window_start, self.window_steps, self.window_tokens = time.perf_counter(), 0, 0

    def step(
        self, iteration: int, loss: torch.Tensor, lr: float, elapsed: float, tokens: int
    ) -> Optional[float]:
        """A step of `tokens` training tokens (every rank's) finished with this
        (on-device) loss. Every log_interval steps a progress line; returns the mean loss it
        reports then (reading it waits for the device), else None."""
        self.window_steps += 1
        self.window_tokens += tokens
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.loss_count += 1
        mean_loss = None
        if iteration % self.cfg.log_interval == 0:
            # Under distributed training, the mean over every rank's batches.
            (loss_sum,) = self.group.sum([self.loss_sum.item()])
            mean_loss = loss_sum / self.group.world_size / self.loss_count
            self.loss_sum, self.loss_count = None, 0
            self._progress_line(iteration, mean_loss, lr, elapsed)
        self._move_bar(elapsed if self.cfg.time_budget else iteration)
        return mean_loss

    def finish(self) -> None:
        """The budget has ended training: the bar shows it all spent."""
        if self.bar is not None:
            self._move_bar(self.bar.total)

    def _move_bar(self, position: float) -> None:
        if self.bar is not None:
            self.bar.n = min(position, self.bar.total)
            self.bar.refresh()

    def _progress_line(self, iteration: int, loss: float, lr: float, elapsed: float) -> None:
        seconds = time.perf_counter() - self.window_start
        tok_s = self.window_tokens / max(seconds, 1e-9)
        if self.cfg.time_budget:
            left = max(self.cfg.time_budget - elapsed, 0.0)
        else:
            left = (self.cfg.step_limit - iteration) * seconds / max(self.window_steps, 1)
        fields = dict(
            loss=f"{loss:.4f}",
            lr=f"{lr:.2e}",
            tok_s=f"{tok_s:,.0f}",
            mfu=f"{100 * self.mfu(tok_s):.1f}%",
        )
        if self.bar is not None:  # which shows the time left itself
            self.bar.set_postfix(fields, refresh=False)
        else:
            fields["left"] = duration(left)
            log.info("iter %d | %s", iteration, " | ".join(f"{k} {v}" for k, v in fields.items()))

    def evaluation(
        self,
        iteration: int,
        losses: dict[str, float],
        best_val_loss: float,
        new_best: bool,
        lr: float,
        elapsed: float,
        eval_seconds: float,
        tokens: int,
        loss_scale: Optional[float] = None,
    ) -> dict:
        """Write the metrics row of an evaluation that took eval_seconds, after `tokens`
        training tokens (every rank's), report it, and (--plot)
        redraw loss.png; throughput counts the training since the previous evaluation.
        losses: "train", "val" and optionally "val_bits_per_char"; loss_scale: the fp16
        gradient scaler's factor, where there is one. Returns the row."""
        train_s = time.perf_counter() - self.window_start - eval_seconds
        tokens_per_s = self.window_tokens / train_s if self.window_steps else 0.0
        row = {
            "iter": iteration,
            "train_loss": round(losses["train"], 6),
            "val_loss": round(losses["val"], 6),
            "best_val_loss": round(best_val_loss, 6),
            "lr": lr,
            "elapsed_s": round(elapsed, 3),
            "tokens_per_s": round(tokens_per_s, 1),
            "mfu": round(self.mfu(tokens_per_s), 4),
            "tokens": tokens,
        }
        bpc = losses.get("val_bits_per_char")
        if bpc is not None:
            row["val_bits_per_char"] = round(bpc, 6)
        if loss_scale is not None:
            row["loss_scale"] = loss_scale
        if not self.group.is_main:
            self._restart_window()
            return row
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        log.info(
            "eval @ iter %d: train %.4f, val %.4f%s%s",
            iteration,
            row["train_loss"],
            row["val_loss"],
            f" ({bpc:.3f} bits/char)" if bpc is not None else "",
            " (new best)" if new_best else "",
        )
        if self.board is not None:
            for key in ("train_loss", "val_loss", "val_bits_per_char", "lr", "tokens_per_s", "mfu"):
                if key in row:
                    self.board.add_scalar(BOARD_TAGS[key], row[key], iteration)
            self.board.flush()
        if self.cfg.plot:
            self._plot()
        self._restart_window()
        if self.cfg.time_budget:  # evaluations spend the budget too
            self._move_bar(elapsed)
        return row

    def evaluation_progress(self, iteration: int):
        """A report(batches scored, batches in all) for a long evaluation at `iteration`: a
        line every EVAL_PROGRESS_S seconds with how far it has got and the time left."""
        start = last = time.perf_counter()
        every_s = EVAL_PROGRESS_S

        def report(scored: int, total: int) -> None:
            nonlocal last
            now = time.perf_counter()
            if now - last < every_s or scored == total or not self.group.is_main:
                return
            last = now
            left = (now - start) / scored * (total - scored)
            log.info(
                "evaluating at iter %d: %d/%d batches, %s left",
                iteration,
                scored,
                total,
                duration(left),
            )

        return report

    def _prepare_plots(self) -> None:
        """Import matplotlib now (a second or more on a small CPU), so that a time-budgeted
        run counts it before it plans its steps, not in its final evaluation; or say at the
        start, once, that there will be no loss.png."""
        from . import plots

        if not plots.plotting_available():
            self.plot_failed = True
            log.info("no loss.png: %s (--no-plot silences this)", plots.install_hint())

    def _plot(self) -> None:
        """Redraw loss.png from metrics.jsonl. Should drawing fail, say so once and go on: a
        picture is never worth a training run."""
        from . import plots

        if self.plot_failed:
            return
        try:
            plots.plot_run(self.path.parent)
        except Exception as exc:  # noqa: BLE001 - whatever matplotlib raised
            self.plot_failed = True
            log.warning(
                "could not draw loss.png (%s: %s); training goes on", type(exc).__name__, exc
            )


def log_start(
    cfg: TrainConfig, parameters: int, device: torch.device, precision: str, group: Group
) -> None:
    """The lines a run starts with: the model and where it computes, and the global batch
    of a distributed run."""
    log.info(
        "model: %.2fM parameters, %d layers, %d heads, %d wide, context %d | %s, %s",
        parameters / 1e6,
        cfg.n_layer,
        cfg.n_head,
        cfg.n_embd,
        cfg.block_size,
        device.type,
        precision,
    )
    if group.distributed:
        sequences = cfg.batch_size * cfg.gradient_accumulation_steps * group.world_size
        log.info(
            "distributed: %d rank%s (%s); global batch %d sequences = %d per "
            "micro-batch x %d accumulation x %d ranks, %d tokens a step",
            group.world_size,
            "" if group.world_size == 1 else "s",
            "NCCL" if device.type == "cuda" else "Gloo",
            sequences,
            cfg.batch_size,
            cfg.gradient_accumulation_steps,
            group.world_size,
            sequences * cfg.block_size,
        )


def open_log(
    cfg: TrainConfig,
    out_dir: Path,
    model: torch.nn.Module,
    precision: PrecisionPolicy,
    times: PassTimes,
    progress: Progress,
    group: Group,
    device: torch.device,
) -> RunLog:
    """The run's log, rewound to progress (see RunLog.rewind), after the lines on what
    start-up measured (times): what MFU is measured against (the matmul peak measured on this
    machine) and on a CPU its compute threads."""
    peak = peak_flops(device, precision)
    run_log = RunLog(
        cfg,
        out_dir,
        model.estimate_flops_per_token(),
        peak,
        iteration=progress.iter,
        elapsed=progress.elapsed_s,
        group=group,
    )
    held = peak_key(device, precision.reduced or torch.float32)
    log.info(
        "MFU below is training FLOP/s over a matmul peak of %.1f GFLOP/s a process (%s, "
        "the best measured on this machine)",
        peak / 1e9,
        held,
    )
    if device.type == "cpu":
        log.info("cpu: %s", describe_threads(times.busy_cores, times.timed_against))
    run_log.rewind(progress.iter, progress.evaluated)
    return run_log


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
        f"{step_s:.2f} s, {evals_left} evaluation{'' if evals_left == 1 else 's'} at "
        f"{eval_s:.1f} s"
        f"{'; early stopping may end it sooner' if cfg.early_stop_patience else ''})"
    ]
    if device.type == "cpu" and total > LONG_RUN_S:
        lines.append(
            "that is long for a CPU: --preset micro or --preset nano train smaller "
            "models many times faster, and --time_budget SECONDS stops training "
            "after that many seconds"
        )
    return lines


def plan(
    budget: Budget,
    progress: Progress,
    batch_s: float,
    step_s: float,
    group: Group,
    device: torch.device,
) -> None:
    """From one evaluation batch's time and one step's, timed before training starts: a
    time-budgeted run plans its evaluations' batches (once per run, kept in progress: every
    evaluation scores the same windows) and says so; a run counted in steps says how long it
    will take."""
    cfg = budget.cfg
    budget.eval_batch_s = batch_s
    if not cfg.time_budget:
        pending = not progress.evaluated and progress.iter % cfg.eval_every == 0
        for line in projection(budget, progress.iter, device, step_s, pending):
            log.info(line)
        return
    if progress.eval_batches is None:
        planned = budget.plan_eval_batches(batch_s, step_s)
        progress.eval_batches = round(group.from_main(planned, device))
    budget.eval_batches = batches = progress.eval_batches
    if progress.evaluated:  # a resumed run: its evaluation at progress.iter was made
        budget.evaluated(progress.iter)
    log.info(
        "time budget %s: about %d evaluations of %d batch%s a split (~%.1f s each), "
        "the rest for training steps",
        duration(cfg.time_budget),
        budget.expected_evaluations(step_s),
        batches,
        "" if batches == 1 else "es",
        budget.final_eval_s(),
    )


def tensorboard_writer(folder: Path, purge_from: Optional[int] = None):
    """A TensorBoard SummaryWriter into folder, which hides what earlier writers logged from
    step purge_from on (a resumed run logs those steps again); without the tensorboard
    package, None and one line that says how to get it (training goes on without)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module imports the tensorboard package
        log.warning(
            "no TensorBoard logs: --tensorboard needs the tensorboard package: %s",
            install_command("tensorboard"),
        )
        return None
    return SummaryWriter(str(folder), purge_step=purge_from or None)


def duration(seconds: float) -> str:
    """A duration as 1h05m or 3m07s."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
