"""Config files: ``smolgpt train --config run.toml`` (and ``smolgpt.train(config=...)``),
layered defaults < preset < file < flags, every mistake in the file one clear line; and the
config.json every run writes beside its checkpoints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import smolgpt
from smolgpt import checkpoint
from smolgpt.config import PRESETS, TrainConfig, read_config_file
from smolgpt.errors import SmolGPTError

from e2e import e2e_corpus_text, names

# A run of a few steps on a tiny model (the file gives the rest: preset, level, data, out_dir).
TINY_TOML = """\
# a comment, as a user would write one
preset = "nano"
level = "char"
n_layer = 1
n_embd = 16
n_head = 2
block_size = 16
batch_size = 4
max_iters = 4
eval_interval = 2
eval_iters = 2
learning_rate = 5e-3
time_budget = 600
"""


@pytest.fixture
def corpus(write_text) -> Path:
    return write_text("corpus.txt", e2e_corpus_text(8_000))


@pytest.fixture
def write_config(write_text):
    """write_config(text, name="run.toml") -> Path."""
    return lambda text, name="run.toml": write_text(name, text)


# ----------------------------------------------------------------------- reading a file


def test_a_file_gives_typed_settings(write_config):
    path = write_config(TINY_TOML + 'bias = false\ndata = "my book.txt"\n')
    values = read_config_file(path)
    assert values["preset"] == "nano" and values["n_layer"] == 1 and values["bias"] is False
    assert values["learning_rate"] == 5e-3 and values["data"] == "my book.txt"
    # An integer where a number is expected is a number, as --time_budget 600 would be.
    assert values["time_budget"] == 600.0 and isinstance(values["time_budget"], float)
    assert read_config_file(str(path)) == values  # a str or a Path


def test_a_json_file_is_read_too_and_a_byte_order_mark_ignored(write_text):
    path = write_text(
        "run.json", '{"preset": "micro", "max_iters": null, "smolgpt_version": "0.6.0"}'
    )
    assert read_config_file(path) == {"preset": "micro", "max_iters": None}
    bom = write_text("bom.toml", '\ufeffpreset = "micro"\n')
    assert read_config_file(bom) == {"preset": "micro"}


@pytest.mark.parametrize(
    "text, needles",
    [
        ("maxiters = 10\n", ["maxiters", "max_iters"]),
        ("max_iters = 10\nlearnig_rate = 0.1\nzzz = 1\n", ["learnig_rate", "learning_rate", "zzz"]),
        # No file includes another ("config" alone is in every message: --config FILE).
        ('config = "other.toml"\n', ["unknown", "config"]),
    ],
)
def test_unknown_keys_are_named_with_the_closest_valid_one(write_config, text, needles):
    with pytest.raises(SmolGPTError) as err:
        read_config_file(write_config(text))
    message = str(err.value)
    assert "run.toml" in message and "\n" not in message
    for needle in needles:
        assert needle in message


@pytest.mark.parametrize(
    "line, needles",
    [
        ('max_iters = "2000"', ["max_iters", "integer", "'2000'", "string"]),
        ("max_iters = 2000.0", ["max_iters", "integer", "2000.0", "number"]),
        ("batch_size = true", ["batch_size", "integer", "True", "true or false"]),
        ("amp = 1", ["amp", "true or false", "integer"]),
        ('learning_rate = "1e-3"', ["learning_rate", "number", "string"]),
        ("level = 1", ["level", "string", "integer"]),
        ("n_layer = [1, 2]", ["n_layer", "integer", "array"]),
        ("seed = 1979-05-27", ["seed", "integer"]),
    ],
)
def test_a_value_of_the_wrong_type_names_the_key_and_the_type(write_config, line, needles):
    with pytest.raises(SmolGPTError) as err:
        read_config_file(write_config(f'preset = "nano"\n{line}\n'))
    for needle in needles:
        assert needle in str(err.value)


def test_sections_are_refused(write_config):
    with pytest.raises(SmolGPTError, match=names("run.toml", "[model]")):
        read_config_file(write_config('preset = "nano"\n[model]\nn_layer = 2\n'))


def test_bad_syntax_says_the_line(write_config):
    with pytest.raises(SmolGPTError, match=names("run.toml", "line 3")):
        read_config_file(write_config('preset = "nano"\nlevel = "char"\nmax_iters = \n'))
    with pytest.raises(SmolGPTError, match=names("run.json", "line 1")):
        read_config_file(write_config("{preset: nano}", "run.json"))
    with pytest.raises(SmolGPTError, match=names("run.json", "object")):
        read_config_file(write_config('["preset"]', "run.json"))


def test_a_missing_file_a_directory_and_non_text_are_refused(tmp_path, write_text):
    with pytest.raises(SmolGPTError, match=names(str(tmp_path / "nope.toml"), "not exist")):
        read_config_file(tmp_path / "nope.toml")
    with pytest.raises(SmolGPTError, match=names(str(tmp_path))) as err:
        read_config_file(tmp_path)
    assert "directory" in str(err.value).replace(str(tmp_path), "")  # not only in the path
    (tmp_path / "latin1.toml").write_bytes('data = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(SmolGPTError, match=names("latin1.toml", "UTF-8")):
        read_config_file(tmp_path / "latin1.toml")


# ------------------------------------------------------------------------ training with one


def saved_train_config(run_dir: Path) -> dict:
    return checkpoint.load(run_dir / "latest_model.pth").train_config


def test_preset_then_file_then_keyword_arguments(write_config, corpus, tmp_path, monkeypatch):
    """Each layer wins over the one before: nano's recipe where neither file nor arguments
    say otherwise, the file over nano, the arguments over the file; relative paths in the
    file are relative to the current directory."""
    monkeypatch.chdir(tmp_path)
    path = write_config(TINY_TOML + f'data = "{corpus.name}"\nout_dir = "run"\n', "conf/run.toml")
    result = smolgpt.train(config=path, learning_rate=7e-3)
    assert result.out_dir == Path("run") and result.iterations == 4
    cfg = saved_train_config(tmp_path / "run")
    assert cfg["optimizer"] == PRESETS["nano"]["optimizer"] == "muon"  # the preset
    assert cfg["dropout"] == PRESETS["nano"]["char"]["dropout"]  # the preset at the file's level
    assert cfg["n_layer"] == 1 != PRESETS["nano"]["n_layer"]  # the file over the preset
    assert cfg["learning_rate"] == 7e-3  # the argument over the file (and the preset)
    assert cfg["muon_lr"] == TrainConfig.muon_lr  # the default: nobody set it
    assert cfg["data"] == "corpus.txt"  # as written: read from the current directory

    # config.json: the resolved settings, exactly as the checkpoint records them.
    written = json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))
    assert written.pop("smolgpt_version") == smolgpt.__version__
    assert written == cfg and set(cfg) == {f.name for f in dataclasses.fields(TrainConfig)}
    # And it reads back as a config file.
    assert read_config_file(tmp_path / "run" / "config.json") == cfg


def test_resume_rewrites_config_json_and_holds_the_file_to_the_resume_rules(
    write_config, corpus, tmp_path
):
    run = tmp_path / "run"
    path = write_config(TINY_TOML + f'data = "{corpus}"\nout_dir = "{run}"\n')
    smolgpt.train(config=path)
    first = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert first["max_iters"] == 4 and first["resume"] is False

    resumed = smolgpt.train(config=path, resume=True, max_iters=6)
    assert resumed.iterations == 6
    again = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert again["max_iters"] == 6 and again["resume"] is True
    assert {k: v for k, v in again.items() if k not in ("max_iters", "resume")} == {
        k: v for k, v in first.items() if k not in ("max_iters", "resume")
    }

    # A file's value counts as a flag typed now: one that changes what the run is, is refused.
    bigger = write_config(
        TINY_TOML.replace("n_layer = 1", "n_layer = 2") + f'data = "{corpus}"\nout_dir = "{run}"\n',
        "bigger.toml",
    )
    with pytest.raises(SmolGPTError, match=names("--resume", "--n_layer 2")):
        smolgpt.train(config=bigger, resume=True, max_iters=8)
    assert json.loads((run / "config.json").read_text(encoding="utf-8")) == again


def test_a_bad_file_stops_the_run_before_anything_is_written(write_config, corpus, tmp_path):
    path = write_config(TINY_TOML + f'data = "{corpus}"\nmaxiter = 5\n')
    with pytest.raises(SmolGPTError, match=names("maxiter", "max_iters")):
        smolgpt.train(config=path, out_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------- the command line


@pytest.mark.slow
def test_train_py_reads_a_config_file_and_flags_win(smol_cli, tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    (tmp_path / "corpus.txt").write_text(e2e_corpus_text(8_000), encoding="utf-8")
    (conf / "run.toml").write_text(
        TINY_TOML + 'data = "corpus.txt"\nout_dir = "run"\n', encoding="utf-8"
    )
    result = smol_cli.run("train", "--config", conf / "run.toml", "--max_iters", "2", cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    cfg = json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))
    assert (cfg["max_iters"], cfg["n_layer"], cfg["optimizer"]) == (2, 1, "muon")
    assert smol_cli.metrics(tmp_path / "run")[-1]["iter"] == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "text, needles",
    [
        ('preset = "nano"\nmaxiter = 5\n', ["maxiter", "max_iters"]),
        ('preset = "nano"\nmax_iters = "5"\n', ["max_iters", "integer", "string"]),
        ('preset = "nano"\nmax_iters = \n', ["line 2"]),
    ],
)
def test_a_bad_config_file_is_one_line_and_status_2(smol_cli, tmp_path, text, needles):
    (tmp_path / "run.toml").write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    result = smol_cli.run(
        "module",
        "train",
        "--config",
        tmp_path / "run.toml",
        "--data",
        smol_cli.corpus,
        "--out_dir",
        out,
    )
    smol_cli.assert_one_line_error(result, "run.toml", *needles)
    assert not out.exists()


@pytest.mark.slow
def test_a_missing_config_file_is_one_line_and_status_2(smol_cli, tmp_path):
    result = smol_cli.run(
        "module", "train", "--config", tmp_path / "nope.toml", "--out_dir", tmp_path / "run"
    )
    smol_cli.assert_one_line_error(result, "nope.toml", "not exist")
    assert not (tmp_path / "run").exists()
