"""The Python API as a notebook uses it: ``import smolgpt``, then train, load and generate
through ``smolgpt.train`` and ``smolgpt.load`` alone, with the command line's settings,
checks and errors."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import smolgpt

from e2e import names

REPO = Path(__file__).resolve().parents[1]

# A model that trains in a second or two on 2 CPU cores.
TINY = dict(
    level="char",
    preset="nano",
    n_layer=1,
    n_head=2,
    n_embd=16,
    block_size=32,
    batch_size=8,
    eval_iters=2,
    eval_interval=10,
    log_interval=10,
)


@pytest.fixture
def corpus(tmp_path) -> Path:
    rng = random.Random(0)
    words = "the cat sat on a mat and a dog ran far from home to see the sea".split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(1500))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.slow
def test_a_notebook_trains_loads_and_generates(corpus, tmp_path):
    result = smolgpt.train(data=str(corpus), out_dir=str(tmp_path / "run"), max_iters=20, **TINY)
    assert result.iterations == 20
    assert result.best_checkpoint == tmp_path / "run" / "best_model.pth"
    assert result.best_checkpoint.is_file() and result.latest_checkpoint.is_file()
    rows = [
        json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["iter"] for r in rows] == [0, 10, 20]
    assert result.last_val_loss == pytest.approx(rows[-1]["val_loss"], abs=1e-6)
    assert result.best_val_loss == pytest.approx(min(r["val_loss"] for r in rows), abs=1e-6)
    assert result.best_val_loss < rows[0]["val_loss"]  # it learned something

    model = smolgpt.load(result.best_checkpoint)
    assert model.config.n_layer == 1 and model.config.vocab_size == model.tokenizer.vocab_size
    assert model.train_config["max_iters"] == 20
    assert not model.module.training  # ready for inference
    text = model.generate("the ", max_new_tokens=30)
    assert isinstance(text, str) and text.startswith("the ") and len(text) == 34
    assert model.generate("the ", max_new_tokens=30) == text  # the same seed, the same text
    assert model.generate("the ", max_new_tokens=30, seed=1) != text
    several = model.generate("the ", max_new_tokens=10, num_samples=3, temperature=1.0)
    assert isinstance(several, list) and len(several) == 3
    greedy = model.generate("the ", max_new_tokens=10, temperature=0)
    assert greedy == model.generate("the ", max_new_tokens=10, temperature=0, seed=5)


@pytest.mark.slow
def test_the_api_and_the_command_line_generate_the_same_text(corpus, tmp_path):
    result = smolgpt.train(data=str(corpus), out_dir=str(tmp_path / "run"), max_iters=10, **TINY)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    printed = subprocess.run(
        [
            sys.executable,
            str(REPO / "generate.py"),
            str(result.best_checkpoint),
            "--prompt",
            "a dog",
            "--max_new_tokens",
            "25",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    # The same defaults (temperature, top_k, seed, ...) on both sides.
    assert (
        printed == smolgpt.load(result.best_checkpoint).generate("a dog", max_new_tokens=25) + "\n"
    )


def test_the_api_keeps_the_run_rules(corpus, tmp_path):
    run = dict(data=str(corpus), out_dir=str(tmp_path / "run"), **TINY)
    smolgpt.train(max_iters=10, **run)
    with pytest.raises(smolgpt.SmolGPTError, match=names(run["out_dir"], "--resume")):
        smolgpt.train(max_iters=10, **run)
    resumed = smolgpt.train(max_iters=20, resume=True, **run)
    assert resumed.iterations == 20
    with pytest.raises(smolgpt.SmolGPTError, match=names("--resume", "--n_layer 2")):
        smolgpt.train(max_iters=30, resume=True, **{**run, "n_layer": 2})


@pytest.mark.parametrize(
    "settings, needles",
    [
        ({"preset": "nano", "n_embd": 50}, ("n_embd", "50", "n_head")),
        ({"learning_rate": -1.0}, ("--learning_rate", "-1.0")),
        ({"level": "byte"}, ("level", "'byte'", "char", "word", "bpe")),
        ({"n_lyer": 3}, ("n_lyer",)),
        ({"data": "no/such/file.txt"}, ("no/such/file.txt",)),
    ],
)
def test_bad_settings_raise_the_command_lines_errors(settings, needles, tmp_path):
    with pytest.raises(smolgpt.SmolGPTError, match=names(*needles)):
        smolgpt.train(out_dir=str(tmp_path / "run"), **settings)
    assert not list(tmp_path.glob("run/*.pth")) and not list(tmp_path.glob("run/*.jsonl"))


def test_bad_sampling_settings_raise_before_generating(corpus, tmp_path):
    result = smolgpt.train(data=str(corpus), out_dir=str(tmp_path / "run"), max_iters=1, **TINY)
    model = smolgpt.load(result.latest_checkpoint)
    for settings, needles in [
        ({"top_p": 0.0}, ("--top_p", "0.0")),
        ({"temperature": -1.0}, ("--temperature", "-1.0")),
        ({"top_kk": 3}, ("top_kk", "temperature")),  # the unknown one, and the known ones
    ]:
        with pytest.raises(smolgpt.SmolGPTError, match=names(*needles)):
            model.generate("the", **settings)
    with pytest.raises(smolgpt.SmolGPTError, match=names("prompt", "empty")):
        model.generate("")
    with pytest.raises(smolgpt.SmolGPTError, match=names("missing.pth")):
        smolgpt.load(tmp_path / "missing.pth")


@pytest.mark.slow
def test_importing_smolgpt_does_not_import_torch():
    # `smolgpt --help` and `import smolgpt` stay fast: torch comes with the first train/load.
    code = (
        "import sys, smolgpt; assert 'torch' not in sys.modules, 'torch imported'; "
        "smolgpt.load; assert 'torch' in sys.modules"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )


def test_resume_refuses_a_run_whose_text_now_reads_into_another_vocabulary(corpus, tmp_path):
    # A run started by smolgpt before 0.5, which did not normalise text, has such a tokenizer.
    import torch

    from smolgpt import checkpoint

    run = dict(data=str(corpus), out_dir=str(tmp_path / "run"), **TINY)
    result = smolgpt.train(max_iters=5, **run)
    saved = torch.load(result.latest_checkpoint, weights_only=True)
    saved["tokenizer"]["normalize"] = False
    checkpoint.save_dict(result.latest_checkpoint, saved)
    with pytest.raises(smolgpt.SmolGPTError, match=names(str(corpus), "vocabulary", "--overwrite")):
        smolgpt.train(max_iters=10, resume=True, **run)
