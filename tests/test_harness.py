"""Measured by the field's own yardstick: EleutherAI's lm-evaluation-harness, run as its users
run it (``python -m lm_eval``, a local task over a local JSON file, no download), scores
smolgpt's exports and smolgpt's server, and agrees with smolgpt.

The harness reports bits per byte over every token of a text, the first predicted from the
begin token the export names, in windows of the model's context; ``smolgpt eval`` reports
bits per character over every token but the first (context only), its windows starting one
token later. On ASCII text bytes are characters. So the tests check two things: that the
harness computes exactly what smolgpt's model computes on the harness's own windows (to
1e-4: the export, the tokenizer and the server are exact), and how far that is from ``smolgpt
eval``'s number. The second is the windows' doing: the first tokens of a window, with little
context, cost more, and which tokens they are differs. On real prose it is small (tiny
Shakespeare's validation split, a micro model: 0.0012 at char level, 0.0006 at bpe level,
docs/guides/evaluation.md); on this test's template-made text, which a small model predicts
well everywhere but at a window's start, up to 0.0042 was seen.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import smolgpt

from e2e import e2e_corpus_text

pytest.importorskip(
    "lm_eval", reason='lm-evaluation-harness is not installed: pip install -e ".[eval]"'
)
pytest.importorskip(
    "transformers", reason='the hf export needs the hf extra: pip install -e ".[hf]"'
)
pytestmark = pytest.mark.slow  # each run of the harness starts a process of its own (~10 s)

TASK = "smolgpt_heldout"


def write_task(folder: Path, text: str) -> Path:
    """A loglikelihood_rolling task over one local JSON document, as the docs show it."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "heldout.jsonl"
    data.write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    (folder / "heldout.yaml").write_text(
        f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
""",
        encoding="utf-8",
    )
    return folder


def on_harness_windows(model: smolgpt.Model, text: str, predicted: int) -> float:
    """Bits per byte of text by smolgpt's model on the windows the harness makes (its own
    function), predicted tokens to a window, the text's first from the begin token."""
    import torch
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    ids, nats = model.tokenizer.encode(text), 0.0
    windows = get_rolling_token_windows(ids, model.tokenizer.boundary_id(), predicted, 1)
    for context, continuation in map(make_disjoint_window, windows):
        window = (context + continuation)[-(predicted + 1) :]
        with torch.no_grad():
            logits = model.module(torch.tensor([window[:-1]]))[0][0].double()
        logp = torch.log_softmax(logits[-len(continuation) :], dim=-1)
        nats -= logp[torch.arange(len(continuation)), torch.tensor(continuation)].sum().item()
    return nats / (math.log(2) * len(text.encode("utf-8")))


def harness_bits_per_byte(task_dir: Path, out: Path, *args: str) -> float:
    """Run ``python -m lm_eval ARGS`` on the task, offline, and return its bits_per_byte."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval", *args, "--tasks", TASK, "--include_path", str(task_dir)]
        + ["--output_path", str(out), "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (record,) = out.rglob("results_*.json")
    return json.loads(record.read_text())["results"][TASK]["bits_per_byte,none"]


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """(the training text's file, the held-out ASCII text, the task's folder)."""
    base = tmp_path_factory.mktemp("harness")
    text = e2e_corpus_text(90_000)
    train, held = text[:-30_000], text[-30_000:]
    assert held.isascii()
    (base / "train.txt").write_text(train, encoding="utf-8")
    return base / "train.txt", held, write_task(base / "task", held)


@pytest.fixture(scope="module", params=["char", "bpe"])
def trained(request, heldout, tmp_path_factory):
    """(level, a model trained briefly on the training text, its hf export): rotary at char
    level, learned positions at bpe level. Trained, not random: a random model's losses
    hang on exactly where each window starts, which the two tools place differently."""
    level = request.param
    if level == "bpe":
        pytest.importorskip("tokenizers", reason='needs the bpe extra: pip install -e ".[bpe]"')
    base = tmp_path_factory.mktemp(f"harness-{level}")
    result = smolgpt.train(
        data=str(heldout[0]),
        level=level,
        preset="nano",
        position="rope" if level == "char" else "learned",
        vocab_size=400 if level == "bpe" else None,
        block_size=256,  # (few windows: see the module's docstring)
        max_iters=150,
        eval_interval=150,
        eval_iters=2,
        plot=False,
        out_dir=str(base / "run"),
    )
    model = smolgpt.load(result.best_checkpoint, device="cpu")
    return level, model, model.export(base / "export", format="hf")


def test_the_harness_reads_the_hf_export_as_it_is(heldout, trained, tmp_path):
    """`lm_eval --model hf --model_args pretrained=EXPORT`, nothing more, and its bits per
    byte are smolgpt eval's bits per character."""
    _, held, task_dir = heldout
    _, model, export = trained
    ours = model.evaluate(held).bits_per_char
    theirs = harness_bits_per_byte(
        task_dir, tmp_path / "results", "--model", "hf", "--model_args", f"pretrained={export}"
    )
    # (its windows predict the model's context length of tokens each, after one of context)
    assert abs(theirs - on_harness_windows(model, held, model.config.block_size)) < 1e-4
    assert abs(theirs - ours) < WINDOWS_GAP, (theirs, ours)


def test_the_harness_scores_through_smolgpt_serve(heldout, trained, tmp_path, smol_cli):
    """`lm_eval --model local-completions` against `smolgpt serve`: token-id prompts, echoed
    prompt log-probabilities; the same bits per byte as smolgpt eval."""
    pytest.importorskip(
        "starlette", reason='the server needs the serve extra: pip install -e ".[serve]"'
    )
    _, held, task_dir = heldout
    _, model, export = trained
    ours = model.evaluate(held).bits_per_char
    process = smol_cli.popen("module", "serve", export, "--port", "0").outlive_tests()
    try:
        base = smol_cli.server_url(process)
        with urllib.request.urlopen(base + "v1/models") as response:
            name = json.load(response)["data"][0]["id"]
        max_length = model.config.block_size + 2  # windows of smolgpt eval's size (see docs)
        settings = [
            f"model={name}",
            f"base_url={base}v1/completions",
            f"tokenizer={export}",  # the harness tokenizes; the server takes the ids
            f"max_length={max_length}",
        ]
        theirs = harness_bits_per_byte(
            task_dir,
            tmp_path / "results",
            "--model",
            "local-completions",
            "--model_args",
            ",".join(settings),
        )
    finally:
        process.kill()
    # Through an API the harness's prompts are max_length - 1 tokens (it keeps one for the
    # token it asks the server to generate), its windows one of context and the rest scored.
    same_windows = on_harness_windows(model, held, max_length - 2)
    assert abs(theirs - same_windows) < 1e-4, (theirs, same_windows)
    assert abs(theirs - ours) < WINDOWS_GAP, (theirs, ours)


# How far the harness's windows may take its number from smolgpt eval's on this test's text
# (see the module's docstring).
WINDOWS_GAP = 0.006
