"""Loss curves (smolgpt.plots): the PNGs are written atomically, decode to the promised size
and show the curves; a bad metrics file or a missing matplotlib is a one-line SmolGPTError."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.image import imread  # noqa: E402

import smolgpt  # noqa: E402
from smolgpt import plots  # noqa: E402
from smolgpt.errors import SmolGPTError  # noqa: E402

from e2e import e2e_assert_install_advice, names, without_package  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BLUE, ORANGE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # train / first run, val / second run


def make_run(
    directory: Path, n_evals: int = 11, seconds_per_eval: float = 3.0, tokens: bool = False
) -> Path:
    """A run directory with a metrics.jsonl as RunLog.evaluation writes it: val loss falls,
    then rises again (overfitting), so the best point is in the middle. tokens: add a
    "tokens" count (640 a step) to every row."""
    directory.mkdir(parents=True, exist_ok=True)
    best, lines = math.inf, []
    for i in range(n_evals):
        train = 4.0 - 0.3 * i
        val = 4.0 - 0.3 * i + 0.06 * i * i
        best = min(best, val)
        row = {
            "iter": 10 * i,
            "train_loss": round(train, 6),
            "val_loss": round(val, 6),
            "best_val_loss": round(best, 6),
            "lr": 3e-4,
            "elapsed_s": seconds_per_eval * i,
            "tokens_per_s": 1000.0,
            "mfu": 0.01,
        }
        if tokens:
            row["tokens"] = 640 * 10 * i
        lines.append(json.dumps(row) + "\n")
    (directory / "metrics.jsonl").write_text("".join(lines), encoding="utf-8")
    return directory


def colour_pixels(png: Path, rgb: tuple[int, int, int]) -> int:
    """How many pixels of the image are (nearly) this colour."""
    image = imread(png)[..., :3]  # PNG decodes to floats in [0, 1]
    return int((np.abs(image - np.array(rgb) / 255).max(axis=-1) < 0.04).sum())


def assert_png(path: Path, height: int, width: int) -> None:
    assert path.is_file()
    assert imread(path).shape[:2] == (height, width)


def test_plot_run_draws_both_curves_into_loss_png(tmp_path):
    run = make_run(tmp_path / "run")
    out = plots.plot_run(run)
    assert out == run / "loss.png"
    assert_png(out, 400, 1000)
    # Each curve spans both panels: far more pixels than its legend line alone.
    assert colour_pixels(out, BLUE) > 300
    assert colour_pixels(out, ORANGE) > 300
    assert not list(run.glob(".*.tmp"))  # atomic_write left no temporary file behind


def test_plot_run_marks_the_best_val_point(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    labels = []
    original = plots._save

    def capture(fig, canvas_class, out_path):
        labels.extend(t.get_text() for ax in fig.axes for t in ax.texts)
        return original(fig, canvas_class, out_path)

    monkeypatch.setattr(plots, "_save", capture)
    plots.plot_run(run, tmp_path / "elsewhere.png")
    rows = plots.read_metrics(run)
    best = min(rows, key=lambda r: r["val_loss"])
    assert 0 < best["iter"] < rows[-1]["iter"]  # the data does have an inner minimum
    assert labels == [f"best val {best['val_loss']:.4f}\n@ iter {best['iter']}"] * 2
    assert_png(tmp_path / "elsewhere.png", 400, 1000)


@pytest.fixture
def real_run(tmp_path) -> Path:
    """The run directory of a real (tiny, 20-step) training run."""
    rng = random.Random(0)
    words = "the cat sat on a mat and a dog ran far from home to see the sea".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(500)),
        encoding="utf-8",
    )
    out_dir = tmp_path / "real"
    smolgpt.train(
        data=str(corpus),
        level="char",
        preset="nano",
        n_layer=1,
        n_head=1,
        n_embd=16,
        block_size=16,
        batch_size=4,
        max_iters=20,
        eval_interval=5,
        eval_iters=2,
        log_interval=5,
        out_dir=str(out_dir),
    )
    return out_dir


def test_a_real_run_plots_and_counts_its_tokens(real_run, tmp_path):
    rows = plots.read_metrics(real_run)
    assert [r["iter"] for r in rows][-1] == 20
    assert_png(plots.plot_run(real_run), 400, 1000)
    # Tokens come from the checkpoint's recipe: batch 4 x context 16 x 1 micro-batch.
    assert plots._tokens_seen(real_run, rows) == [r["iter"] * 64 for r in rows]
    # A run whose rows carry "tokens" themselves overlays with it.
    other = make_run(tmp_path / "other", tokens=True)
    out = plots.plot_runs([real_run, other], tmp_path / "tokens.png", x="tokens")
    assert_png(out, 500, 1000)


@pytest.mark.parametrize("x", ["iter", "time", "tokens"])
def test_plot_runs_overlays_val_losses(tmp_path, x):
    first = make_run(tmp_path / "first", tokens=True)
    second = make_run(tmp_path / "second", n_evals=6, seconds_per_eval=50.0, tokens=True)
    out = plots.plot_runs([first, second], tmp_path / "compare.png", x=x)
    assert_png(out, 500, 1000)
    assert colour_pixels(out, BLUE) > 150  # first run (matplotlib's first colour)
    assert colour_pixels(out, ORANGE) > 150  # second run


def test_plot_runs_refuses_what_it_cannot_draw(tmp_path):
    run = make_run(tmp_path / "run")  # no "tokens" in its rows and no checkpoint
    with pytest.raises(SmolGPTError, match=names("'steps'", *plots.X_AXES)):
        plots.plot_runs([run], tmp_path / "a.png", x="steps")
    with pytest.raises(SmolGPTError, match=names(str(run), "checkpoint", "x='iter'")):
        plots.plot_runs([run], tmp_path / "a.png", x="tokens")
    with pytest.raises(SmolGPTError, match="at least one"):
        plots.plot_runs([], tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


def one_line_error(call) -> str:
    with pytest.raises(SmolGPTError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_missing_or_broken_metrics_file_is_one_line_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    metrics = str(empty / "metrics.jsonl")
    assert metrics in one_line_error(lambda: plots.plot_run(empty))
    assert metrics in one_line_error(lambda: plots.read_metrics(empty))

    (empty / "metrics.jsonl").write_text("")
    message = one_line_error(lambda: plots.read_metrics(empty))
    assert metrics in message and "evaluations" in message

    broken = make_run(tmp_path / "broken")
    with open(broken / "metrics.jsonl", "a") as f:
        f.write(
            "{not json\n"
            + json.dumps({"iter": 200, "train_loss": 1.0, "val_loss": 1.0, "elapsed_s": 1.0})
            + "\n"
        )
    message = one_line_error(lambda: plots.read_metrics(broken))
    assert str(broken / "metrics.jsonl") in message and "line 12" in message and "JSON" in message

    bad_value = make_run(tmp_path / "bad_value")
    with open(bad_value / "metrics.jsonl", "a") as f:
        f.write(
            json.dumps({"iter": 200, "train_loss": 1.0, "val_loss": "oops", "elapsed_s": 1.0})
            + "\n"
        )
    message = one_line_error(lambda: plots.read_metrics(bad_value))
    assert str(bad_value / "metrics.jsonl") in message and "line 12" in message
    assert all(key in message for key in plots.NUMERIC_KEYS)  # the keys that need numbers


def test_a_last_line_cut_short_is_skipped(tmp_path):
    run = make_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iter": 110, "train_lo')  # the run was killed while writing this row
    assert len(plots.read_metrics(run)) == 11


def test_an_existing_png_is_replaced_only_by_a_complete_one(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    old = plots.plot_run(run).read_bytes()

    # A bad row: refused before anything is drawn.
    with open(run / "metrics.jsonl", "a") as f:
        f.write(
            json.dumps({"iter": 200, "train_loss": 1.0, "val_loss": None, "elapsed_s": 1.0}) + "\n"
        )
    with pytest.raises(SmolGPTError):
        plots.plot_run(run)
    assert (run / "loss.png").read_bytes() == old

    # Drawing fails half-way through writing the PNG: the old image is still whole.
    make_run(run)

    def broken_png(self, f, *args, **kwargs):
        f.write(b"\x89PNG\r\n\x1a\n half an image")
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(FigureCanvasAgg, "print_png", broken_png)
    with pytest.raises(RuntimeError, match="drawing failed"):
        plots.plot_run(run)
    assert (run / "loss.png").read_bytes() == old
    assert not list(run.glob(".*.tmp"))


def test_plots_draw_from_several_threads(tmp_path):
    runs = [make_run(tmp_path / f"run{i}") for i in range(4)]
    errors = []

    def draw(run):
        try:
            plots.plot_run(run)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=draw, args=(run,)) for run in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for run in runs:
        assert_png(run / "loss.png", 400, 1000)


BLOCK_MATPLOTLIB = (
    without_package("matplotlib")
    + """
from smolgpt import plots
from smolgpt.errors import SmolGPTError

print("available", plots.plotting_available())
for call in (lambda: plots.plot_run(sys.argv[1]),
             lambda: plots.plot_runs([sys.argv[1]], sys.argv[1] + "/all.png")):
    try:
        call()
    except SmolGPTError as exc:
        print("error", exc)
"""
)


@pytest.mark.slow
def test_without_matplotlib_the_error_says_what_to_install(tmp_path):
    run = make_run(tmp_path / "run")
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_MATPLOTLIB, str(run)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "available False" and len(lines) == 3, done.stdout
    for line in lines[1:]:  # each call: a SmolGPTError naming what to install
        assert line.startswith("error "), line
        e2e_assert_install_advice(line, "plot")
    assert not (run / "loss.png").exists()
    assert plots.plotting_available()  # and here, where it is installed


@pytest.mark.slow
def test_the_plot_command_overlays_runs_and_refuses_in_one_line(tmp_path):
    first = make_run(tmp_path / "first")
    second = make_run(tmp_path / "second", n_evals=6, seconds_per_eval=50.0)
    out = tmp_path / "both.png"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "smolgpt",
            "plot",
            str(first),
            str(second),
            "--x",
            "time",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert_png(out, 500, 1000)
    assert colour_pixels(out, BLUE) > 150 and colour_pixels(out, ORANGE) > 150
    assert str(out) in done.stderr  # where the picture went
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "smolgpt",
            "plot",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "x.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "nope" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "x.png").exists()


def test_the_plot_command_says_where_its_default_picture_went(tmp_path, cli_main):
    pytest.importorskip("matplotlib")
    here = tmp_path / "here"
    here.mkdir()
    done = cli_main(["plot", make_run(tmp_path / "run")], cwd=here)
    assert done.returncode == 0, done.describe()
    assert done.stderr.strip().splitlines()[-1] == f"wrote {here.resolve() / 'loss_curves.png'}"
    assert (here / "loss_curves.png").is_file()
