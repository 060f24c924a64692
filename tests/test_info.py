"""``smolgpt info`` / ``smolgpt.info``: what a checkpoint, a run directory or an export holds,
right for a fresh run and for checkpoints written by older smolgpt versions, and one clear
line for a path that holds no model."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import smolgpt
from smolgpt import checkpoint
from smolgpt.config import LEGACY_DEFAULTS
from smolgpt.errors import SmolGPTError
from smolgpt.model import GPT
from smolgpt.runinfo import describe, format_description

from e2e import E2E_TINY, e2e_corpus_text, names

TINY = dict(
    level="char",
    preset="nano",
    n_layer=1,
    n_embd=16,
    n_head=2,
    block_size=16,
    batch_size=4,
    max_iters=4,
    eval_interval=2,
    eval_iters=2,
)
KEYS = {
    "path",
    "kind",
    "checkpoint",
    "format_version",
    "parameters",
    "parameters_human",
    "shape",
    "level",
    "tokenizer",
    "iterations",
    "best_val_loss",
    "last_val_loss",
    "best_val_bits_per_char",
    "last_val_bits_per_char",
    "training_time_s",
    "data",
    "data_source",
    "data_fingerprint",
    "data_path",
    "preset",
    "device",
    "precision",
    "smolgpt_version",
    "torch_version",
    "saved",
    "saved_from",
    "file_size",
    "train_config",
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real tiny run, trained once for the module, with its own token cache."""
    base = tmp_path_factory.mktemp("info")
    corpus = base / "corpus.txt"
    corpus.write_text(e2e_corpus_text(8_000), encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:  # the per-test cache fixture is not up yet
        patch.setenv("SMOLGPT_CACHE_DIR", str(base / "cache"))
        smolgpt.train(data=str(corpus), out_dir=str(base / "run"), **TINY)
    return base / "run"


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_directory(run_dir):
    info = describe(run_dir)
    assert KEYS | {"evaluations", "run_config"} <= set(info)
    assert (info["path"], info["kind"]) == (str(run_dir), "run directory")
    assert info["checkpoint"] == str(run_dir / "best_model.pth")  # which one was described
    ckpt = checkpoint.load(run_dir / "best_model.pth")
    model = GPT(ckpt.model_config)
    assert info["parameters"] == model.num_parameters()
    assert info["parameters_human"] == f"{model.num_parameters() / 1e6:.2f}M"
    assert info["shape"] == {
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 16,
        "block_size": 16,
        "vocab_size": model.config.vocab_size,
        "position": "rope",
        "bias": True,
    }
    assert info["level"] == "char" and info["tokenizer"] == {"vocab_size": model.config.vocab_size}
    rows = metrics(run_dir)
    assert info["evaluations"] == len(rows)
    assert info["iterations"] == ckpt.progress.iter <= 4
    assert info["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in rows), abs=1e-5)
    for key in ("best_val_bits_per_char", "last_val_bits_per_char"):
        # Recorded by training from smolgpt 0.7 on (None while that is being wired up).
        assert info[key] is None or (isinstance(info[key], float) and info[key] > 0), key
    assert info["training_time_s"] == pytest.approx(ckpt.progress.elapsed_s)
    assert info["data_fingerprint"] == ckpt.data["fingerprint"]
    assert info["data"].endswith("corpus.txt") and info["preset"] == "nano"
    assert (info["smolgpt_version"], info["torch_version"]) == (
        smolgpt.__version__,
        torch.__version__,
    )
    assert info["device"] == "cpu" and info["precision"]
    assert info["saved_from"] == "checkpoint"
    assert datetime.datetime.fromisoformat(info["saved"]).tzinfo is not None
    assert info["file_size"] == (run_dir / "best_model.pth").stat().st_size
    assert info["run_config"] == json.loads((run_dir / "config.json").read_text())
    json.dumps(info, allow_nan=False)  # plain JSON: no inf, no NaN, no objects


def test_a_checkpoint_file_and_the_python_name(run_dir):
    latest = run_dir / "latest_model.pth"
    info = smolgpt.info(latest)
    assert info == describe(str(latest))
    assert (info["kind"], info["checkpoint"]) == ("checkpoint", str(latest))
    assert info["iterations"] == 4
    assert info["last_val_loss"] == pytest.approx(metrics(run_dir)[-1]["val_loss"], abs=1e-5)
    assert "evaluations" not in info  # a file alone: no run around it
    assert KEYS <= set(info)


def test_the_lines_are_aligned_and_complete(run_dir):
    text = format_description(describe(run_dir))
    lines = text.splitlines()
    starts = {len(line) - len(line.split(":", 1)[1].lstrip()) for line in lines}
    assert len(starts) == 1, text  # every value starts in the same column
    fields = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in lines}
    assert fields["iterations"] == "4"
    assert fields["checkpoint"] == str(run_dir / "best_model.pth")
    assert fields["versions"] == f"smolgpt {smolgpt.__version__}, torch {torch.__version__}"
    for name in (
        "parameters",
        "shape",
        "tokenizer",
        "val loss",
        "val bits/char",
        "data",
        "fingerprint",
        "precision",
        "saved",
        "training time",
        "file size",
        "evaluations",
    ):
        assert fields[name], name


def test_an_export(run_dir, tmp_path):
    out = smolgpt.load(run_dir, "cpu").export(tmp_path / "export", "safetensors")
    info = describe(out)
    assert info["kind"] == "export" and info["checkpoint"] is None
    assert info["parameters"] == describe(run_dir)["parameters"]
    assert info["shape"] == describe(run_dir)["shape"] and info["preset"] == "nano"
    assert info["saved_from"] == "file modification time"
    assert "iterations" in format_description(describe(run_dir))
    assert "iterations" not in format_description(info)  # an export keeps no progress


def test_the_data_as_given_and_where_it_is(cli_main, tmp_path):
    """A run's text is shown as its --data was given and where that is (absolute), for the
    checkpoint and for its exports alike, wherever info runs (issue #31, item 8)."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    elsewhere.mkdir()
    text = project / "input.txt"
    project.mkdir()
    text.write_text(e2e_corpus_text(8_000), encoding="utf-8")
    train = ["train", "--data", "input.txt", "--out_dir", "run", "--level", "char", *E2E_TINY]
    trained = cli_main([*train, "--max_iters", "2", "--eval_interval", "2"], cwd=project)
    assert trained.returncode == 0, trained.describe()
    formats = ["safetensors"] + (["hf"] if importlib.util.find_spec("tokenizers") else [])
    for fmt in formats:
        exported = cli_main(["export", "run", fmt, "--format", fmt], cwd=project)
        assert exported.returncode == 0, exported.describe()
    absolute = str(text.resolve())
    for target in ["run", "run/latest_model.pth", *formats]:
        shown = cli_main(["info", project / target], cwd=elsewhere)
        assert shown.returncode == 0, shown.describe()
        fields = dict(line.split(":", 1) for line in shown.stdout.splitlines())
        assert fields["data"].strip() == f"input.txt ({absolute})", (target, shown.stdout)
        info = describe(project / target)
        assert (info["data"], info["data_path"]) == ("input.txt", absolute), target
        assert info["data_fingerprint"] == describe(project / "run")["data_fingerprint"]


def test_a_built_in_corpus_and_an_absolute_path_are_shown_once(make_trainer, tmp_path):
    ckpt = make_trainer().state()
    ckpt.data["source"] = ckpt.train_config["data"] = "shakespeare"
    checkpoint.save(tmp_path / "builtin.pth", ckpt)
    info = describe(tmp_path / "builtin.pth")
    assert (info["data"], info["data_path"]) == ("shakespeare", None)
    assert "\ndata:          shakespeare\n" in format_description(info)
    where = str(tmp_path / "book.txt")
    info.update(data=where, data_source=where, data_path=where)
    assert f"\ndata:          {where}\n" in format_description(info)
    # Older checkpoints record no absolute path: what the run read, where it differs.
    info.update(data="~/book.txt", data_path=None)
    assert f"\ndata:          ~/book.txt (read as {where})\n" in format_description(info)


# ------------------------------------------------------------------ older checkpoints


def version_1(make_trainer, path: Path) -> Path:
    """A checkpoint as smolgpt 0.1 wrote it: format version 1, no checksums, no position in
    model_config (learned positions), one optimiser state, the progress of those days (no
    last val loss, no bits per character), and no run_info or data source."""
    trainer = make_trainer(position="learned", optimizer="adamw")
    trainer.train_step()
    ckpt = trainer.state().to_dict()
    del ckpt["model_config"]["position"], ckpt["run_info"], ckpt["data"]["source"]
    ckpt["progress"] = {
        "iter": 120,
        "best_val_loss": 1.875,
        "evals_since_best": 0,
        "elapsed_s": 42.0,
    }
    ckpt["optimizer"] = ckpt["optimizer"][0]
    ckpt["train_config"] = {
        k: v for k, v in ckpt["train_config"].items() if k not in LEGACY_DEFAULTS
    }
    torch.save({**ckpt, "format_version": 1}, path)
    return path


def test_a_format_version_1_checkpoint(make_trainer, tmp_path):
    path = version_1(make_trainer, tmp_path / "old.pth")
    info = describe(path)
    assert info["format_version"] == 1
    assert info["shape"]["position"] == "learned"
    model = GPT(checkpoint.load(path).model_config)
    assert info["parameters"] == model.num_parameters()
    assert (info["iterations"], info["best_val_loss"], info["training_time_s"]) == (
        120,
        1.875,
        42.0,
    )
    for key in (
        "last_val_loss",
        "best_val_bits_per_char",
        "last_val_bits_per_char",
        "precision",
        "device",
        "smolgpt_version",
        "torch_version",
        "data_source",
    ):
        assert info[key] is None, key
    assert info["saved_from"] == "file modification time"
    mtime = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
    assert info["saved"] == mtime.isoformat(timespec="seconds")
    text = format_description(info)
    assert "val loss:      best 1.8750, last unknown" in text
    assert "val bits/char: best unknown, last unknown" in text
    assert "precision:     unknown" in text and "iterations:    120" in text
    assert "versions:      smolgpt unknown, torch unknown" in text
    assert f"saved:         {info['saved']} (file modification time)" in text
    json.dumps(info, allow_nan=False)


def test_no_evaluation_yet_and_bits_per_char_recorded(make_trainer, tmp_path):
    """Losses are infinite before the first evaluation: null, not Infinity. Bits per
    character, where the checkpoint has them, are reported as they are."""
    trainer = make_trainer()
    ckpt = trainer.state()
    assert math.isinf(ckpt.progress.best_val_loss)
    checkpoint.save(tmp_path / "fresh.pth", ckpt)
    info = describe(tmp_path / "fresh.pth")
    assert info["best_val_loss"] is None and info["iterations"] == 0
    json.dumps(info, allow_nan=False)

    ckpt.progress = dataclasses.replace(
        ckpt.progress, best_val_loss=1.5, best_val_bits_per_char=2.125, last_val_bits_per_char=2.25
    )
    checkpoint.save(tmp_path / "bits.pth", ckpt)
    info = describe(tmp_path / "bits.pth")
    assert (info["best_val_bits_per_char"], info["last_val_bits_per_char"]) == (2.125, 2.25)
    assert "val bits/char: best 2.1250, last 2.2500" in format_description(info)


def test_a_word_level_model_shows_its_min_word_freq(make_trainer, tmp_path):
    ckpt = make_trainer("word").state()  # its vocabulary kept words seen once
    checkpoint.save(tmp_path / "word.pth", ckpt)
    info = describe(tmp_path / "word.pth")
    assert info["level"] == "word"
    assert info["tokenizer"] == {
        "vocab_size": ckpt.model_config.vocab_size,
        "min_word_freq": 1,
    }
    assert "(min_word_freq 1)" in format_description(info)


# --------------------------------------------------------------------------- bad paths


def test_paths_without_a_model(tmp_path, write_text):
    with pytest.raises(SmolGPTError, match=names(str(tmp_path / "nope.pth"), "not exist")):
        describe(tmp_path / "nope.pth")
    # What a directory should hold: a run's checkpoints, or an export's smolgpt.json.
    models = ("best_model.pth", "latest_model.pth", "smolgpt.json")
    with pytest.raises(SmolGPTError, match=names(str(tmp_path), *models)):
        describe(tmp_path)
    with pytest.raises(SmolGPTError, match=names("notes.txt", "smolgpt checkpoint")):
        describe(write_text("notes.txt", "hello"))
    started = tmp_path / "started"
    started.mkdir()
    (started / "config.json").write_text(json.dumps({"smolgpt_version": smolgpt.__version__}))
    with pytest.raises(SmolGPTError, match=names(str(started), "checkpoint yet")):
        describe(started)
    foreign = tmp_path / "foreign"  # a transformers model's directory, say
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(SmolGPTError, match=names(str(foreign), *models)):
        describe(foreign)


@pytest.mark.slow
def test_the_command_line(smol_cli, cli_main, run_dir, tmp_path):
    printed = smol_cli.run("module", "info", run_dir, "--json")
    assert printed.returncode == 0, printed.describe()
    assert json.loads(printed.stdout) == describe(run_dir)
    # The rest in this process: one real process has shown the command works as users run it.
    lines = cli_main(["info", run_dir / "latest_model.pth"])
    assert lines.returncode == 0, lines.describe()
    assert lines.stdout == format_description(describe(run_dir / "latest_model.pth")) + "\n"

    missing = cli_main(["info", tmp_path / "nope"])
    smol_cli.assert_one_line_error(missing, str(tmp_path / "nope"), "not exist")
    (tmp_path / "notes.txt").write_text("hello")
    foreign = cli_main(["info", tmp_path / "notes.txt", "--json"])
    smol_cli.assert_one_line_error(foreign, "notes.txt", "smolgpt checkpoint")
    assert foreign.stdout == ""
