"""Loss curves from a run's ``metrics.jsonl``, drawn into PNG files.

matplotlib is an optional dependency (the plot extra), so it is imported
only inside the functions that draw. They use its object API (a ``Figure`` on an Agg canvas)
and never pyplot: no global figure state and no GUI backend, so plotting works on a headless
server and from several threads at once. Every PNG is written with
:func:`~smolgpt.files.atomic_write`, so a reader never sees half an image.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Iterable, Optional, Union

from .config import LEVELS, PLOT_AXES, PLOT_VALUES
from .errors import SmolGPTError
from .extras import install_command
from .files import atomic_write
from .rundir import BEST, LATEST, LOSS_PLOT, METRICS, RUN_CONFIG

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

# The keys of a metrics row (see RunLog.evaluation) that the plots read.
NUMERIC_KEYS = ("iter", "train_loss", "val_loss", "elapsed_s")
TRAIN_COLOR, VAL_COLOR = "#1f77b4", "#ff7f0e"  # matplotlib's first two default colours
X_AXES = PLOT_AXES
Y_VALUES = PLOT_VALUES
# What each y of plot_runs draws (a metrics row's key), and how its axis is labelled.
Y_KEYS = {"loss": "val_loss", "bits_per_char": "val_bits_per_char"}
Y_LABELS = {"loss": "val loss (nats per token)", "bits_per_char": "val bits per character"}
# A line of at most this many points has a marker at each: one point would draw nothing
# else, and two or three would read as a bare segment. Longer curves stay plain lines.
MARKED_POINTS = 25
# The narrowest loss range an axis shows, as a share of the loss: one evaluation, or a few
# almost equal, would otherwise be drawn with ticks of 0.0001 under an offset of "+2.147".
LEAST_SPAN = 0.05


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


def _markers(points: int) -> dict:
    """Line style that shows each point of a short line (see MARKED_POINTS)."""
    return {"marker": "o", "markersize": 3.5} if points <= MARKED_POINTS else {}


def _readable(ax, xs: list[float], ys: list[float]) -> None:
    """Tick labels that read at a glance however few points ax draws: never an offset, and
    where the points span (almost) nothing, a range wide enough for ticks of a sensible size.
    On y (a loss) that is LEAST_SPAN of the loss around them; on x (iterations, wall time or
    tokens, which start at 0) a single value is drawn in the middle of 0 to twice it."""
    ax.ticklabel_format(useOffset=False)
    finite = [v for v in ys if math.isfinite(v)]
    if finite:
        low, high = min(finite), max(finite)
        least = LEAST_SPAN * max(abs(low), abs(high)) or 1.0
        if high - low < least:
            half, middle = max(least, 1.1 * (high - low)) / 2, (low + high) / 2
            ax.set_ylim(middle - half, middle + half)
    if xs and min(xs) == max(xs):
        ax.set_xlim(*((0, 2 * xs[0]) if xs[0] > 0 else (xs[0] - 1, xs[0] + 1)))


def _save(fig, canvas_class, out_path: Path) -> Path:
    canvas_class(fig)  # attaches itself to the figure: Agg draws it, no GUI involved
    # dpi="figure": the promised pixel size, whatever a user's matplotlibrc says.
    atomic_write(out_path, lambda f: fig.savefig(f, format="png", dpi="figure"))
    return out_path


def plot_run(run_dir: PathLike, out_path: Optional[PathLike] = None) -> Path:
    """Draw one run's train and val loss against iterations (left) and wall time (right),
    with the best val loss marked and labelled, into a 1000x400-pixel PNG. Every point of a
    short run is marked, so one evaluation draws a visible train and val point.

    Writes ``<run_dir>/loss.png`` unless out_path is given, atomically (an existing file is
    replaced only by a complete image). Returns the path written.
    """
    Figure, Canvas = _figure_classes()
    rows = read_metrics(run_dir)
    out_path = Path(out_path) if out_path is not None else Path(run_dir) / LOSS_PLOT
    best = _best(rows)
    divisor, unit = _time_unit(max(r["elapsed_s"] for r in rows))

    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    panels = fig.subplots(1, 2, sharey=True)
    for ax, key, scale, label in (
        (panels[0], "iter", 1.0, "iteration"),
        (panels[1], "elapsed_s", divisor, f"wall time ({unit})"),
    ):
        xs = [r[key] / scale for r in rows]
        style = _markers(len(rows))
        train, val = [r["train_loss"] for r in rows], [r["val_loss"] for r in rows]
        # Above the best-val marker: one evaluation's train point shows even on top of it.
        ax.plot(xs, train, color=TRAIN_COLOR, label="train", zorder=3, **style)
        ax.plot(xs, val, color=VAL_COLOR, label="val", **style)
        _readable(ax, xs, train + val)
        if best is not None:
            bx = best[key] / scale
            # Wider than the line's markers, so a train point on top leaves a ring of it.
            ax.plot([bx], [best["val_loss"]], "o", ms=9, color=VAL_COLOR, mec="black")
            ax.annotate(
                f"best val {best['val_loss']:.4f}\n@ iter {best['iter']}",
                (bx, best["val_loss"]),
                textcoords="offset points",
                xytext=(0, 14),
                ha="center",
                fontsize=8,
            )
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    panels[0].set_ylabel("loss (nats per token)")
    panels[0].legend()
    fig.suptitle(Path(run_dir).resolve().name)
    return _save(fig, Canvas, out_path)


def plot_runs(
    run_dirs: Iterable[PathLike],
    out_path: PathLike,
    x: str = "iter",
    ylim: Optional[tuple[float, float]] = None,
    title: Optional[str] = None,
    y: Optional[str] = None,
) -> Path:
    """Overlay the validation curves of several runs in one PNG (1000x500 pixels), one line
    per run, labelled with its directory's name; x is "iter", "time" (wall time) or "tokens"
    (training tokens seen). y is "loss" (val loss, nats per token) or "bits_per_char" (val
    bits per character, which compares runs of different levels); by default bits per
    character where the runs' tokenizers differ (see :func:`default_y`, which says so in a
    log line), else loss. ylim: the range of y shown (low, high), e.g. to leave the untrained
    model's loss off the top; title: a heading. Writes out_path atomically and returns it.
    """
    _check_plot_args(x, y, ylim)
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise SmolGPTError("plot_runs needs at least one run directory")
    Figure, Canvas = _figure_classes()
    why = None
    if y is None:
        y, why = default_y(run_dirs)
    # Every file is read and checked before anything is drawn.
    runs = [(d, _y_rows(d, read_metrics(d), y, why)) for d in run_dirs]
    xlabel, xs_of_runs = _x_values(x, runs)
    fig = Figure(figsize=(10, 5), dpi=100, layout="constrained")
    ax = fig.subplots()
    every_x, every_y = [], []
    for (run_dir, rows), xs in zip(runs, xs_of_runs):
        ys = [r[Y_KEYS[y]] for r in rows]
        ax.plot(xs, ys, label=run_dir.resolve().name, **_markers(len(rows)))
        every_x += xs
        every_y += ys
    _readable(ax, every_x, every_y)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(Y_LABELS[y])
    if ylim is not None:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    written = _save(fig, Canvas, Path(out_path))
    if why:
        log.info(
            "%s: drew val bits per character, which compares them; --y loss draws nats per token",
            why,
        )
    return written


def _check_plot_args(x: str, y: Optional[str], ylim: Optional[tuple[float, float]]) -> None:
    """Raise SmolGPTError unless x, y and ylim are what :func:`plot_runs` takes."""
    if x not in X_AXES:
        raise SmolGPTError(f"x must be one of {', '.join(X_AXES)}, not {x!r}")
    if y is not None and y not in Y_VALUES:
        raise SmolGPTError(f"y must be one of {', '.join(Y_VALUES)}, not {y!r}")
    if ylim is not None and not (
        len(ylim) == 2 and all(map(math.isfinite, ylim)) and ylim[0] < ylim[1]
    ):
        raise SmolGPTError(f"ylim must be two finite numbers, low then high, not {ylim!r}")


def _x_values(x: str, runs: list[tuple[Path, list[dict]]]) -> tuple[str, list[list[float]]]:
    """The x axis's label, and each run's x values: its rows' iterations, wall times (in one
    unit for all the runs) or training tokens seen."""
    if x == "iter":
        return "iteration", [[r["iter"] for r in rows] for _, rows in runs]
    if x == "time":
        divisor, unit = _time_unit(max(r["elapsed_s"] for _, rows in runs for r in rows))
        xs = [[r["elapsed_s"] / divisor for r in rows] for _, rows in runs]
        return f"wall time ({unit})", xs
    return "training tokens", [_tokens_seen(run_dir, rows) for run_dir, rows in runs]


def default_y(run_dirs: Iterable[PathLike]) -> tuple[str, Optional[str]]:
    """What :func:`plot_runs` draws when not told, and why when it is not val loss:
    ("bits_per_char", "runs of different levels (char, word)") where the runs' levels
    differ, or at one level their vocabularies (bpe's vocab_size, word's min_word_freq):
    nats per token of different tokenizers measure different things. Else ("loss", None).
    A run whose level neither its config.json nor a checkpoint records takes no part."""
    known = [t for t in map(_tokenizer, map(Path, run_dirs)) if t is not None]
    for kind, index in (("levels", 0), ("vocabularies", 1)):
        differing = list(dict.fromkeys(t[index] for t in known))
        if len(differing) > 1:
            return "bits_per_char", f"runs of different {kind} ({', '.join(differing)})"
    return "loss", None


def _tokenizer(run_dir: Path) -> Optional[tuple[str, str]]:
    """The run's level and its vocabulary in words ("bpe with vocab_size 1024"), from its
    config.json, else its checkpoint's train_config; None where neither says."""
    settings = _run_config(run_dir)
    if settings is None or "level" not in settings:
        _, settings = _checkpoint_config(run_dir)
    level = settings.get("level") if settings else None
    if level not in LEVELS:
        return None
    setting = {"word": "min_word_freq", "bpe": "vocab_size"}.get(level)
    if setting is None or settings.get(setting) is None:
        return level, level
    return level, f"{level} with {setting} {settings[setting]}"


def _run_config(run_dir: Path) -> Optional[dict]:
    """The settings of the run's config.json, or None where it is absent or damaged."""
    try:
        settings = json.loads((run_dir / RUN_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        return None
    return settings if isinstance(settings, dict) else None


def _y_rows(run_dir: Path, rows: list[dict], y: str, why: Optional[str]) -> list[dict]:
    """The rows of a run that hold y's value: all of them for the loss; for bits per
    character those that record it, or a SmolGPTError where none does (why: the reason
    bits per character was chosen, where it was not asked for)."""
    if y == "loss":
        return rows
    kept = [r for r in rows if _is_number(r.get(Y_KEYS[y]))]
    if kept:
        return kept
    reason = f"{why} are compared in bits per character, but " if why else ""
    raise SmolGPTError(
        f"{reason}{run_dir / METRICS} has no val_bits_per_char (a run of an older smolgpt, "
        "or one whose validation text's size was unknown): draw val loss with --y loss "
        f"(y='loss' from Python), or measure its model with `smolgpt eval {run_dir}`"
    )


def _tokens_seen(run_dir: Path, rows: list[dict]) -> list[float]:
    """Training tokens seen at each row: its "tokens" if every row has one, else iter times
    the run's tokens per step (batch_size x block_size x gradient_accumulation_steps), which
    only the run's checkpoint records."""
    if all(_is_number(r.get("tokens")) for r in rows):
        return [r["tokens"] for r in rows]
    per_step = _tokens_per_step(run_dir)
    return [r["iter"] * per_step for r in rows]


def _tokens_per_step(run_dir: Path) -> int:
    path, cfg = _checkpoint_config(run_dir)
    if path is None:
        raise SmolGPTError(
            f"{run_dir} has no checkpoint recording its tokens per step; "
            "plot with x='iter' or x='time' instead"
        )
    try:
        per_rank = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
        return per_rank * cfg["world_size"]  # every rank trains on its own batches
    except (KeyError, TypeError):  # an unreadable checkpoint (cfg None) or one without these
        raise SmolGPTError(
            f"{path} is not a readable checkpoint: cannot count the "
            f"tokens of {run_dir}; plot with x='iter' instead"
        ) from None


def _checkpoint_config(run_dir: Path) -> tuple[Optional[Path], Optional[dict]]:
    """The train_config of the run's latest checkpoint (else its best), with that file's
    path, and "world_size", the processes that trained it (its run_info; 1 where it does
    not say): (path, None) where it cannot be read, (None, None) where the run has none."""
    path = next((p for p in (run_dir / LATEST, run_dir / BEST) if p.is_file()), None)
    if path is None:
        return None, None
    import torch  # a dependency of smolgpt; only what a checkpoint records needs it

    try:
        # mmap: only the small train_config is read, not every tensor in the file.
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        cfg = ckpt["train_config"]
        world_size = (ckpt.get("run_info") or {}).get("world_size", 1)
    except Exception:  # noqa: BLE001 - any unreadable checkpoint means the same here
        return path, None
    return path, {**cfg, "world_size": world_size} if isinstance(cfg, dict) else None
