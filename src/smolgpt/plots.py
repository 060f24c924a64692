"""Loss curves from a run's ``metrics.jsonl``, drawn into PNG files.

matplotlib is an optional dependency (the plot extra), so it is imported
only inside the functions that draw. They use its object API (a ``Figure`` on an Agg canvas)
and never pyplot: no global figure state and no GUI backend, so plotting works on a headless
server and from several threads at once. Every PNG is written with
:func:`~smolgpt.files.atomic_write`, so a reader never sees half an image.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Optional, Union

from .config import PLOT_AXES
from .errors import SmolGPTError
from .extras import install_command
from .files import atomic_write
from .runlog import METRICS

PathLike = Union[str, Path]

# The keys of a metrics row (see RunLog.evaluation) that the plots read.
NUMERIC_KEYS = ("iter", "train_loss", "val_loss", "elapsed_s")
TRAIN_COLOR, VAL_COLOR = "#1f77b4", "#ff7f0e"  # matplotlib's first two default colours
X_AXES = PLOT_AXES


def install_hint() -> str:
    return f"plots need matplotlib: {install_command('plot')}"


def plotting_available() -> bool:
    """Whether matplotlib can be imported, i.e. whether the plot functions can work (this
    imports what they use)."""
    try:
        _figure_classes()
    except SmolGPTError:
        return False
    return True


def _figure_classes():
    """matplotlib's Figure and Agg canvas, or a SmolGPTError saying what to install."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise SmolGPTError(install_hint()) from None
    return Figure, FigureCanvasAgg


def read_metrics(run_dir: PathLike) -> list[dict]:
    """The evaluation rows of ``<run_dir>/metrics.jsonl``, in file order, each with numeric
    iter, train_loss, val_loss and elapsed_s.

    A missing, unreadable or malformed file, or one without any evaluation yet, raises a
    SmolGPTError naming it. A last line cut short (the run was killed while writing it) is
    skipped: it is not a finished row.
    """
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise SmolGPTError(f"no metrics file {path}: is {run_dir} a training run directory?")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise SmolGPTError(f"cannot read metrics file {path} ({reason})") from None
    lines = text.split("\n")  # the last item is "" unless the last line was cut short
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: a row being written
                continue
            raise SmolGPTError(f"{path}, line {number}: not a JSON metrics row") from None
        if not isinstance(row, dict) or not all(_is_number(row.get(k)) for k in NUMERIC_KEYS):
            raise SmolGPTError(
                f"{path}, line {number}: a metrics row needs numbers for {', '.join(NUMERIC_KEYS)}"
            )
        rows.append(row)
    if not rows:
        raise SmolGPTError(f"{path} has no evaluations yet: plot after the first one")
    return rows


def _is_number(value) -> bool:
    # bool is an int subclass, but true/false in a loss column is a broken file.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _best(rows: list[dict]) -> Optional[dict]:
    """The row with the lowest finite val loss (None if every val loss is NaN or infinite)."""
    finite = [r for r in rows if math.isfinite(r["val_loss"])]
    return min(finite, key=lambda r: r["val_loss"]) if finite else None


def _time_unit(seconds: float) -> tuple[float, str]:
    """A divisor and a unit that keep wall-time tick labels short."""
    if seconds >= 2 * 3600:
        return 3600.0, "h"
    if seconds >= 2 * 60:
        return 60.0, "min"
    return 1.0, "s"


def _save(fig, canvas_class, out_path: Path) -> Path:
    canvas_class(fig)  # attaches itself to the figure: Agg draws it, no GUI involved
    # dpi="figure": the promised pixel size, whatever a user's matplotlibrc says.
    atomic_write(out_path, lambda f: fig.savefig(f, format="png", dpi="figure"))
    return out_path


def plot_run(run_dir: PathLike, out_path: Optional[PathLike] = None) -> Path:
    """Draw one run's train and val loss against iterations (left) and wall time (right),
    with the best val loss marked and labelled, into a 1000x400-pixel PNG.

    Writes ``<run_dir>/loss.png`` unless out_path is given, atomically (an existing file is
    replaced only by a complete image). Returns the path written.
    """
    Figure, Canvas = _figure_classes()
    rows = read_metrics(run_dir)
    out_path = Path(out_path) if out_path is not None else Path(run_dir) / "loss.png"
    best = _best(rows)
    divisor, unit = _time_unit(max(r["elapsed_s"] for r in rows))

    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    panels = fig.subplots(1, 2, sharey=True)
    for ax, key, scale, label in (
        (panels[0], "iter", 1.0, "iteration"),
        (panels[1], "elapsed_s", divisor, f"wall time ({unit})"),
    ):
        xs = [r[key] / scale for r in rows]
        ax.plot(xs, [r["train_loss"] for r in rows], color=TRAIN_COLOR, label="train")
        ax.plot(xs, [r["val_loss"] for r in rows], color=VAL_COLOR, label="val")
        if best is not None:
            bx = best[key] / scale
            ax.plot([bx], [best["val_loss"]], "o", color=VAL_COLOR, markeredgecolor="black")
            ax.annotate(
                f"best val {best['val_loss']:.4f}\n@ iter {best['iter']}",
                (bx, best["val_loss"]),
                textcoords="offset points",
                xytext=(0, 12),
                ha="center",
                fontsize=8,
            )
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    panels[0].set_ylabel("loss")
    panels[0].legend()
    fig.suptitle(Path(run_dir).resolve().name)
    return _save(fig, Canvas, out_path)


def plot_runs(
    run_dirs: Iterable[PathLike],
    out_path: PathLike,
    x: str = "iter",
    ylim: Optional[tuple[float, float]] = None,
    title: Optional[str] = None,
) -> Path:
    """Overlay the val loss of several runs in one PNG (1000x500 pixels), one line per run,
    labelled with its directory's name; x is "iter", "time" (wall time) or "tokens" (training
    tokens seen). ylim: the val loss range shown (low, high), e.g. to leave the untrained
    model's loss off the top; title: a heading. Writes out_path atomically and returns it.
    """
    if x not in X_AXES:
        raise SmolGPTError(f"x must be one of {', '.join(X_AXES)}, not {x!r}")
    if ylim is not None and not (
        len(ylim) == 2 and all(map(math.isfinite, ylim)) and ylim[0] < ylim[1]
    ):
        raise SmolGPTError(f"ylim must be two finite numbers, low then high, not {ylim!r}")
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise SmolGPTError("plot_runs needs at least one run directory")
    Figure, Canvas = _figure_classes()
    runs = [(d, read_metrics(d)) for d in run_dirs]  # every file is checked before drawing

    if x == "time":
        divisor, unit = _time_unit(max(r["elapsed_s"] for _, rows in runs for r in rows))
        xlabel = f"wall time ({unit})"
    else:
        xlabel = {"iter": "iteration", "tokens": "training tokens"}[x]
    fig = Figure(figsize=(10, 5), dpi=100, layout="constrained")
    ax = fig.subplots()
    for run_dir, rows in runs:
        if x == "iter":
            xs = [r["iter"] for r in rows]
        elif x == "time":
            xs = [r["elapsed_s"] / divisor for r in rows]
        else:
            xs = _tokens_seen(run_dir, rows)
        ax.plot(xs, [r["val_loss"] for r in rows], label=run_dir.resolve().name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("val loss")
    if ylim is not None:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, Canvas, Path(out_path))


def _tokens_seen(run_dir: Path, rows: list[dict]) -> list[float]:
    """Training tokens seen at each row: its "tokens" if every row has one, else iter times
    the run's tokens per step (batch_size x block_size x gradient_accumulation_steps), which
    only the run's checkpoint records."""
    if all(_is_number(r.get("tokens")) for r in rows):
        return [r["tokens"] for r in rows]
    per_step = _tokens_per_step(run_dir)
    return [r["iter"] * per_step for r in rows]


def _tokens_per_step(run_dir: Path) -> int:
    import torch  # a dependency of smolgpt; only this axis needs it

    for name in ("latest_model.pth", "best_model.pth"):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            # mmap: only the small train_config is read, not every tensor in the file.
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            cfg = ckpt["train_config"]
            return cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
        except Exception:  # noqa: BLE001 - any unreadable checkpoint means the same here
            raise SmolGPTError(
                f"{path} is not a readable checkpoint: cannot count the "
                f"tokens of {run_dir}; plot with x='iter' instead"
            ) from None
    raise SmolGPTError(
        f"{run_dir} has no checkpoint recording its tokens per step; "
        "plot with x='iter' or x='time' instead"
    )
