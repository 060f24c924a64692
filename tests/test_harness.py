"""Measured by the field's own yardstick: EleutherAI's lm-evaluation-harness, run as its users
run it (``python -m lm_eval``, a local task over a local JSON file, no download), scores
smolgpt's exports and agrees with ``smolgpt eval``.

The harness reports bits per byte over every token of a text, the first predicted from the
begin token the export names; ``smolgpt eval`` reports bits per character over every token
but the first (context only). On ASCII text bytes are characters, so the two differ only by
that first token and by where the windows of the model's context fall (the harness starts
its second window one token earlier): well under 0.002 bits on a text of thousands of
characters.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import smolgpt
from smolgpt.hf import export_hf
from smolgpt.tokenizer import BPETokenizer, CharTokenizer

from e2e import e2e_corpus_text, e2e_sharp_model

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


def make_tokenizer(level: str, text: str):
    if level == "char":
        return CharTokenizer.train([text])
    pytest.importorskip("tokenizers", reason='needs the bpe extra: pip install -e ".[bpe]"')
    return BPETokenizer.train([text], vocab_size=400)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """(training text, held-out ASCII text, the task's folder)."""
    text = e2e_corpus_text(40_000)
    train, held = text[:-6000], text[-6000:]
    assert held.isascii()
    return train, held, write_task(tmp_path_factory.mktemp("task"), held)


@pytest.mark.parametrize("level", ["char", "bpe"])
def test_the_harness_reads_the_hf_export_as_it_is(heldout, tmp_path, level):
    """`lm_eval --model hf --model_args pretrained=EXPORT`, nothing more, and its bits per
    byte are smolgpt eval's bits per character."""
    train, held, task_dir = heldout
    if level == "char":
        tokenizer = CharTokenizer.train([train])
    else:
        pytest.importorskip("tokenizers", reason='needs the bpe extra: pip install -e ".[bpe]"')
        tokenizer = BPETokenizer.train([train], vocab_size=400)
    export = export_hf(
        e2e_sharp_model(tokenizer.vocab_size, "rope"), tokenizer, tmp_path / "export"
    )
    ours = smolgpt.load(export, device="cpu").evaluate(held).bits_per_char
    theirs = harness_bits_per_byte(
        task_dir, tmp_path / "results", "--model", "hf", "--model_args", f"pretrained={export}"
    )
    assert abs(theirs - ours) < 0.002, (theirs, ours)


@pytest.mark.parametrize("level", ["char", "bpe"])
def test_the_harness_scores_through_smolgpt_serve(heldout, tmp_path, smol_cli, level):
    """`lm_eval --model local-completions` against `smolgpt serve`: token-id prompts, echoed
    prompt log-probabilities; the same bits per byte as smolgpt eval."""
    pytest.importorskip(
        "starlette", reason='the server needs the serve extra: pip install -e ".[serve]"'
    )
    train, held, task_dir = heldout
    tokenizer = make_tokenizer(level, train)
    model = e2e_sharp_model(tokenizer.vocab_size, "learned")
    export = export_hf(model, tokenizer, tmp_path / "export")
    ours = smolgpt.load(export, device="cpu").evaluate(held).bits_per_char
    process = smol_cli.popen("module", "serve", export, "--port", "0").outlive_tests()
    try:
        found = smol_cli.wait_for(
            lambda: re.search(r"serving .* at (http://\S+/) ", process.stderr_so_far()),
            timeout=120,
            process=process,
            what="the server to listen",
        )
        base = found.group(1).replace("0.0.0.0", "127.0.0.1")
        with urllib.request.urlopen(base + "v1/models") as response:
            name = json.load(response)["data"][0]["id"]
        settings = [
            f"model={name}",
            f"base_url={base}v1/completions",
            f"tokenizer={export}",  # the harness tokenizes; the server takes the ids
            f"max_length={model.config.block_size}",
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
    assert abs(theirs - ours) < 0.002, (theirs, ours)
