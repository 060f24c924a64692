"""Loss curves (smolgpt.plots): the PNGs are written atomically, decode to the promised size
and show the curves; a bad metrics file or a missing matplotlib is a one-line SmolGPTError."""

from __future__ import annotations

import json
import logging
import math
import random
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

import pytest

pytest.importorskip("matplotlib")

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.image import imread  # noqa: E402

import smolgpt  # noqa: E402
from smolgpt import plots  # noqa: E402
from smolgpt.errors import SmolGPTError  # noqa: E402

from e2e import e2e_assert_install_advice, e2e_assert_one_line_error, names, without_package  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BLUE, ORANGE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # train / first run, val / second run


def make_run(
    directory: Path,
    n_evals: int = 11,
    seconds_per_eval: float = 3.0,
    tokens: bool = False,
    settings: Optional[dict] = None,
    bits_per_char: float = 0.0,
    scale: float = 1.0,
) -> Path:
    """A run directory with a metrics.jsonl as RunLog.evaluation writes it: val loss falls,
    then rises again (overfitting), so the best point is in the middle. tokens: add a
    "tokens" count (640 a step) to every row; settings: write them as the run's config.json
    (every run has one, with its level and vocabulary settings); bits_per_char: give every
    row a val_bits_per_char, this times its val_loss; scale: multiply the losses (a word
    loss is larger than a char loss)."""
    directory.mkdir(parents=True, exist_ok=True)
    if settings is not None:
        (directory / "config.json").write_text(json.dumps(settings))
    best, lines = math.inf, []
    for i in range(n_evals):
        train = scale * (4.0 - 0.3 * i)
        val = scale * (4.0 - 0.3 * i + 0.06 * i * i)
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
        if bits_per_char:
            row["val_bits_per_char"] = round(bits_per_char * val, 6)
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


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The figures the plot functions draw, in order, as they were saved (so drawn: their
    ticks, tick labels and offset texts are the PNG's)."""
    figures = []
    original = plots._save

    def capture(fig, canvas_class, out_path):
        written = original(fig, canvas_class, out_path)
        figures.append(fig)
        return written

    monkeypatch.setattr(plots, "_save", capture)
    return figures


def test_plot_run_marks_the_best_val_point(tmp_path, drawn):
    run = make_run(tmp_path / "run")
    plots.plot_run(run, tmp_path / "elsewhere.png")
    labels = [t.get_text() for ax in drawn[0].axes for t in ax.texts]
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


def in_panel(png: Path, ax, rgb: tuple[int, int, int]) -> int:
    """How many pixels inside ax's frame in the PNG are (nearly) this colour."""
    box = ax.get_window_extent()  # pixels from the bottom left; image rows go down
    height = imread(png).shape[0]
    image = imread(png)[
        round(height - box.y1) : round(height - box.y0), round(box.x0) : round(box.x1)
    ]
    return int((np.abs(image[..., :3] - np.array(rgb) / 255).max(axis=-1) < 0.04).sum())


def test_one_evaluation_draws_a_train_and_val_point_on_readable_ticks(tmp_path, drawn):
    # Issue #31's run: one evaluation, train and val 0.0006 apart. loss.png showed no train
    # curve and a y axis ticked every 0.0001 under an offset of "+2.147".
    run = tmp_path / "run"
    run.mkdir()
    row = {"iter": 200, "train_loss": 2.1473, "val_loss": 2.1479, "elapsed_s": 30.2}
    (run / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    out = plots.plot_run(run)
    for ax in drawn[0].axes:
        lines = {line.get_label(): line for line in ax.get_lines()}
        for label in ("train", "val"):
            (x,), (y,) = lines[label].get_data()
            assert lines[label].get_marker() == "o"  # a line of one point draws only this
            assert ax.get_xlim()[0] < x < ax.get_xlim()[1]
            assert ax.get_ylim()[0] < y < ax.get_ylim()[1]
        for axis in (ax.xaxis, ax.yaxis):
            assert axis.get_offset_text().get_text() == ""
        # In the picture (the right panel has no legend): the train point, drawn on top of
        # the best val marker, and the val marker's ring around it.
        assert in_panel(out, ax, BLUE) > 10 and in_panel(out, ax, ORANGE) > 10
    ticks = [t.get_text() for t in drawn[0].axes[0].get_yticklabels()]  # (the panels share y)
    assert "2.14" in ticks or "2.15" in ticks, ticks
    assert all(len(t) <= 4 for t in ticks), ticks  # 2.12, not 2.1475


def test_every_point_of_a_short_line_is_marked_and_a_long_line_is_plain(tmp_path, drawn):
    plots.plot_run(make_run(tmp_path / "short", n_evals=plots.MARKED_POINTS))
    plots.plot_run(make_run(tmp_path / "long", n_evals=plots.MARKED_POINTS + 1))
    short, long = (fig.axes[0].get_lines()[:2] for fig in drawn)  # train and val
    assert all(line.get_marker() == "o" for line in short)
    assert all(line.get_marker() in ("None", "", None) for line in long)
    plots.plot_runs([tmp_path / "short", tmp_path / "long"], tmp_path / "both.png")
    assert [line.get_marker() for line in drawn[2].axes[0].get_lines()] == ["o", "None"]


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
    with pytest.raises(SmolGPTError, match=names("'nats'", *plots.Y_VALUES)):
        plots.plot_runs([run], tmp_path / "a.png", y="nats")
    assert not (tmp_path / "a.png").exists()


LEVELS = (("char", 1.44, 1.0), ("word", 0.3, 2.2), ("bpe", 0.6, 1.6))  # bpc / loss, scale


def test_runs_of_different_levels_are_compared_in_bits_per_character(tmp_path, drawn, caplog):
    # Nats per token of a word model and a char model measure different things: the default
    # draws bits per character, and says so.
    runs = [
        make_run(tmp_path / level, settings={"level": level}, bits_per_char=bpc, scale=scale)
        for level, bpc, scale in LEVELS
    ]
    with caplog.at_level(logging.INFO, logger="smolgpt.plots"):
        plots.plot_runs(runs, tmp_path / "levels.png")
    ax = drawn[0].axes[0]
    assert ax.get_ylabel() == "val bits per character"
    assert [line.get_label() for line in ax.get_lines()] == ["char", "word", "bpe"]
    for run, line in zip(runs, ax.get_lines()):
        assert list(line.get_ydata()) == [r["val_bits_per_char"] for r in plots.read_metrics(run)]
    assert "runs of different levels (char, word, bpe)" in caplog.text
    assert "--y loss" in caplog.text

    caplog.clear()  # y="loss" (--y loss): nats per token all the same, and nothing to say
    with caplog.at_level(logging.INFO, logger="smolgpt.plots"):
        plots.plot_runs(runs, tmp_path / "nats.png", y="loss")
    ax = drawn[1].axes[0]
    assert ax.get_ylabel() == "val loss (nats per token)"
    for run, line in zip(runs, ax.get_lines()):
        assert list(line.get_ydata()) == [r["val_loss"] for r in plots.read_metrics(run)]
    assert caplog.text == ""


def test_the_default_follows_the_runs_tokenizers(tmp_path):
    char = [make_run(tmp_path / n, settings={"level": "char"}, bits_per_char=1.44) for n in "ab"]
    bare = make_run(tmp_path / "bare")  # no config.json, no checkpoint: it takes no part
    assert plots.default_y([*char, bare]) == ("loss", None)
    bpe = [
        make_run(tmp_path / f"bpe{size}", settings={"level": "bpe", "vocab_size": size})
        for size in (1024, 1024, 4096)
    ]
    assert plots.default_y(bpe[:2]) == ("loss", None)
    assert plots.default_y(bpe) == (
        "bits_per_char",
        "runs of different vocabularies (bpe with vocab_size 1024, bpe with vocab_size 4096)",
    )
    # A run without a config.json: its checkpoint's train_config says its level.
    torch = pytest.importorskip("torch")
    old = make_run(tmp_path / "old")
    torch.save({"train_config": {"level": "word", "min_word_freq": 3}}, old / "best_model.pth")
    assert plots.default_y([char[0], old]) == (
        "bits_per_char",
        "runs of different levels (char, word)",
    )


def test_the_plot_command_compares_levels_or_says_in_one_line_what_to_do(tmp_path, cli_main):
    char = make_run(tmp_path / "char", settings={"level": "char"}, bits_per_char=1.44)
    word = make_run(tmp_path / "word", settings={"level": "word"}, bits_per_char=0.3, scale=2)
    out = tmp_path / "levels.png"
    done = cli_main(["plot", char, word, "--out", out])
    assert done.returncode == 0, done.describe()
    note, wrote = done.stderr.strip().splitlines()
    assert "runs of different levels (char, word)" in note and "--y loss" in note
    assert wrote == f"wrote {out}"
    assert_png(out, 500, 1000)

    done = cli_main(["plot", char, word, "--y", "loss", "--out", out])
    assert done.returncode == 0 and done.stderr.strip() == f"wrote {out}", done.describe()

    # A run written before val bits per character were recorded: it cannot be compared
    # with the others that way, and the error says which run, why and what to do instead.
    old = make_run(tmp_path / "old", settings={"level": "word"})
    refused = tmp_path / "refused.png"
    done = cli_main(["plot", char, old, "--out", refused])
    e2e_assert_one_line_error(done, str(old), "levels (char, word)", "--y loss")
    done = cli_main(["plot", old, "--y", "bits_per_char", "--out", refused])
    e2e_assert_one_line_error(done, str(old), "val_bits_per_char", "--y loss")
    assert not refused.exists()
    assert cli_main(["plot", char, old, "--y", "loss", "--out", refused]).returncode == 0


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


def test_tokens_of_older_rows_count_every_rank(real_run, tmp_path):
    """Rows written before they carried "tokens" are counted from the checkpoint's recipe,
    times the processes that trained (each on its own batches)."""
    import json
    import shutil

    import torch

    run = tmp_path / "two-ranks"
    shutil.copytree(real_run, run, ignore=shutil.ignore_patterns(".lock"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("tokens", None)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("latest_model.pth", "best_model.pth"):
        ckpt = torch.load(run / name, weights_only=True)
        ckpt["run_info"]["world_size"] = 2
        torch.save(ckpt, run / name)
    rows = plots.read_metrics(run)
    assert plots._tokens_seen(run, rows) == [r["iter"] * 64 * 2 for r in rows]
