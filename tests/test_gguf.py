"""GGUF exports: the file holds the model and its tokenizer in GGUF's own fields, llama.cpp
itself (through llama-cpp-python) reads the same ids from a prompt, continues it greedily
with the same tokens and gives the same log-probabilities (to the one difference it cannot
avoid, its GELU), and every bad request is refused in one line with nothing written.

The models are tiny (2 layers, 32 wide, context 64) with weights scaled up from their
initialisation, so that their logits differ clearly between tokens and greedy decoding is
not decided by rounding; the tokenizers are trained on a short text written here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from smolgpt import checkpoint
from smolgpt.config import SampleConfig
from smolgpt.errors import SmolGPTError
from smolgpt.gguf_export import export_gguf
from smolgpt.model import GPT
from smolgpt.sampling import generate
from smolgpt.tokenizer import BPETokenizer, CharTokenizer, WordTokenizer

from e2e import (
    e2e_assert_install_advice,
    e2e_assert_one_line_error,
    smolgpt_without,
)
from e2e import (
    e2e_sharp_model as make_model,
)

gguf = pytest.importorskip(
    "gguf", reason='the gguf extra is not installed: pip install -e ".[gguf]"'
)

CORPUS = (
    "ROMEO: But soft, what light through yonder window breaks?\n"
    "It is the east, and Juliet is the sun. 1597 -- (Act II) $4; 100% sure!\n\n"
    "JULIET: O Romeo, Romeo! wherefore art thou Romeo? Café naïve — “quoted” …\n"
) * 4
TEXTS = [
    "ROMEO: But soft, what light?\nJULIET: O Romeo!",
    "  two spaces, then\n\n\nthree line breaks and 1597 -- (Act II) $4; 100%",
    "Café naïve — … wherefore",
]
LAYOUTS = [(level, position) for level in ("char", "bpe") for position in ("learned", "rope")]


def make_tokenizer(level: str):
    if level == "char":
        return CharTokenizer.train([CORPUS])
    pytest.importorskip(
        "tokenizers", reason='bpe level needs the bpe extra: pip install -e ".[bpe]"'
    )
    return BPETokenizer.train([CORPUS], vocab_size=320, strict=False)


def save_checkpoint(model: GPT, tokenizer, path: Path) -> Path:
    checkpoint.save(path, checkpoint.Checkpoint(model.config, tokenizer, model.state_dict()))
    return path


def known(tokenizer, text: str) -> str:
    """text without the characters a character vocabulary lacks (smolgpt refuses them)."""
    missing = set(tokenizer.unknown(text))
    return "".join(ch for ch in text if ch not in missing)


# --------------------------------------------------------------------------- the file


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_the_file_holds_the_model_and_its_tokenizer(tmp_path, position):
    tokenizer = CharTokenizer.train([CORPUS])
    model = make_model(tokenizer.vocab_size, position, bias=False, tie_embeddings=False)
    path = export_gguf(model, tokenizer, tmp_path / "model.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temporary left
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    arch = "gpt2" if position == "learned" else "gptneox"
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.context_length"] == 64 and fields[f"{arch}.block_count"] == 2
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == tokenizer.vocab_size
    assert fields["tokenizer.ggml.add_bos_token"] is False
    if position == "rope":  # every channel of a head rotates; the blocks are sequential
        assert fields["gptneox.rope.dimension_count"] == 16
        assert fields["gptneox.use_parallel_residual"] is False
    tensors = {t.name: np.array(t.data).reshape(tuple(reversed(t.shape))) for t in reader.tensors}
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(tensors["token_embd.weight"], state["wte.weight"])
    np.testing.assert_array_equal(tensors["output.weight"], state["lm_head.weight"])  # untied
    np.testing.assert_array_equal(
        tensors["blk.1.attn_qkv.weight"], state["blocks.1.attn.c_attn.weight"]
    )
    # No biases in the model: zeros in the file, which computes the same.
    assert not tensors["blk.0.ffn_up.bias"].any() and not tensors["output_norm.bias"].any()
    assert ("position_embd.weight" in tensors) is (position == "learned")


def test_q8_0_quantises_the_matrices_it_can(tmp_path):
    tokenizer = CharTokenizer.train([CORPUS])
    model = make_model(tokenizer.vocab_size, "rope", n_embd=48)  # nano's width: 48 = 1.5 blocks
    small = export_gguf(model, tokenizer, tmp_path / "q8.gguf", "q8_0")
    f32 = export_gguf(model, tokenizer, tmp_path / "f32.gguf", "f32")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(small).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 192 = 6 blocks of 32
    assert types["blk.0.attn_qkv.weight"] == "F16"  # rows of 48: not whole blocks
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert small.stat().st_size < 0.5 * f32.stat().st_size


@pytest.mark.parametrize("level", ["char", "bpe"])
def test_the_byte_level_vocabulary_encodes_as_smolgpt(level):
    """The tokens and merges the file holds, run by an independent byte-level BPE (the
    tokenizers library's, with GPT-2's pre-tokenizer, as llama.cpp's "gpt-2"), give
    smolgpt's ids; at char level no merge joins two characters."""
    tk = pytest.importorskip("tokenizers", reason='needs the bpe extra: pip install -e ".[bpe]"')
    tokenizer = make_tokenizer(level)
    tokens, merges = tokenizer.byte_level_bpe()
    # The tokenizers library wants the pieces a merge joins in the vocabulary too (llama.cpp
    # does not): at char level the first bytes of a character, given ids no text gets.
    pieces = [p for pair in merges for p in pair if p not in tokens]
    vocab = {t: i for i, t in enumerate([*tokens, *dict.fromkeys(pieces)])}
    bpe = tk.Tokenizer(tk.models.BPE(vocab, merges))
    bpe.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for text in TEXTS:
        text = known(tokenizer, text)
        assert bpe.encode(text).ids == tokenizer.encode(text), text
    if level == "char":
        # Every merge builds the start of one character's bytes, and some character needs it.
        assert merges and all(any(t.startswith(a + b) for t in tokens) for a, b in merges)


def test_a_word_level_vocabulary_has_no_gguf_form():
    tokenizer = WordTokenizer.train([CORPUS], 1)
    with pytest.raises(SmolGPTError, match="word-level.*--format hf"):
        tokenizer.byte_level_bpe()


# ------------------------------------------------------------------------ the command line


@pytest.fixture
def run_cli(cli_main):
    """run_cli(*args): smolgpt's command line in this process (see cli_main)."""
    return lambda *args: cli_main(list(args))


@pytest.fixture
def char_checkpoint(tmp_path) -> Path:
    tokenizer = CharTokenizer.train([CORPUS])
    return save_checkpoint(make_model(tokenizer.vocab_size, "rope"), tokenizer, tmp_path / "m.pth")


def test_export_writes_one_file_and_says_how_to_run_it(run_cli, char_checkpoint, tmp_path):
    out = tmp_path / "out" / "model.gguf"
    result = run_cli("export", char_checkpoint, out, "--format", "gguf", "--outtype", "f16")
    assert result.returncode == 0, result.describe()
    assert out.read_bytes()[:4] == b"GGUF"
    assert "llama-completion -m" in result.stderr and "f16" in result.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]


def test_bad_exports_are_refused_in_one_line_and_write_nothing(run_cli, char_checkpoint, tmp_path):
    export = ("export", char_checkpoint)
    word = WordTokenizer.train([CORPUS], 1)
    word_ckpt = save_checkpoint(make_model(word.vocab_size, "rope"), word, tmp_path / "w.pth")
    chars = CharTokenizer.train([CORPUS])
    blind = make_model(chars.vocab_size, "rope", causal=False)  # trained without the mask
    blind_ckpt = save_checkpoint(blind, chars, tmp_path / "b.pth")
    e2e_assert_one_line_error(
        run_cli("export", word_ckpt, tmp_path / "w.gguf", "--format", "gguf"), "word", "--format hf"
    )
    e2e_assert_one_line_error(
        run_cli("export", blind_ckpt, tmp_path / "b.gguf", "--format", "gguf"), "causal"
    )
    e2e_assert_one_line_error(
        run_cli(*export, tmp_path / "x", "--format", "hf", "--outtype", "q8_0"), "--outtype"
    )
    (tmp_path / "dir").mkdir()
    e2e_assert_one_line_error(run_cli(*export, tmp_path / "dir", "--format", "gguf"), "directory")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))
    # An existing file is kept, unless --overwrite, and then only if it is a GGUF file.
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes")
    e2e_assert_one_line_error(run_cli(*export, notes, "--format", "gguf"), "exists", "--overwrite")
    e2e_assert_one_line_error(
        run_cli(*export, notes, "--format", "gguf", "--overwrite"), "not a GGUF file"
    )
    assert notes.read_text() == "my notes"
    first = tmp_path / "model.gguf"
    assert run_cli(*export, first, "--format", "gguf").returncode == 0
    again = run_cli(*export, first, "--format", "gguf", "--outtype", "q8_0", "--overwrite")
    assert again.returncode == 0, again.describe()


@pytest.mark.slow
def test_without_the_gguf_package_one_line_says_what_to_install(char_checkpoint, tmp_path):
    result = smolgpt_without(
        "gguf", "export", char_checkpoint, tmp_path / "m.gguf", "--format", "gguf"
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    e2e_assert_install_advice(result.stderr, "gguf")
    assert not (tmp_path / "m.gguf").exists()


# ------------------------------------------------------------------------- in llama.cpp

needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (make test builds it from source: "
    'pip install -e ".[llamacpp]", which needs a C++ compiler and CMake)',
)


class GgmlGelu(nn.Module):
    """GELU as llama.cpp computes it on a CPU: GPT-2's tanh approximation, looked up in a
    table indexed by the input rounded to float16 and holding float16 results (ggml's
    GGML_GELU_FP16), the identity from 10 on and 0 from -10 down."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.half().float()
        tanh = torch.tanh(math.sqrt(2 / math.pi) * h * (1 + 0.044715 * h * h))
        table = (0.5 * h * (1 + tanh)).half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))


def with_ggml_gelu(model: GPT) -> GPT:
    """A copy of model whose MLPs use llama.cpp's GELU."""
    copy = GPT(model.config)
    copy.load_state_dict(model.state_dict())
    for block in copy.blocks:
        block.mlp.gelu = GgmlGelu()
    return copy.eval()


def load_llama(path: Path):
    """The file in llama.cpp, in float32 throughout (its key-value cache too: it would
    round keys and values to float16 by default), every position's logits kept."""
    from llama_cpp import Llama

    return Llama(
        model_path=str(path),
        n_ctx=64,
        n_batch=64,
        logits_all=True,
        type_k=0,  # GGML_TYPE_F32
        type_v=0,
        flash_attn=False,
        n_threads=2,
        verbose=False,
    )


def llama_logprobs(llama, ids: list[int]) -> np.ndarray:
    """log p(ids[i + 1] | ids[: i + 1]) for every i, by llama.cpp."""
    llama.reset()
    llama.eval(ids)
    scores = np.array(llama.scores[: len(ids)], dtype=np.float64)
    scores -= scores.max(axis=1, keepdims=True)
    logp = scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))
    return logp[np.arange(len(ids) - 1), ids[1:]]


def smolgpt_logprobs(model: GPT, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0][0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


def llama_greedy(llama, prompt: list[int], count: int) -> list[int]:
    llama.reset()
    llama.eval(prompt)
    out = []
    for _ in range(count):
        out.append(int(np.argmax(llama.scores[llama.n_tokens - 1])))
        llama.eval(out[-1:])
    return out


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda p: "-".join(p))
def exported(request, tmp_path_factory):
    """(tokenizer, model, {outtype: file}) of one level and position scheme, every outtype."""
    level, position = request.param
    tokenizer = make_tokenizer(level)
    model = make_model(tokenizer.vocab_size, position)
    folder = tmp_path_factory.mktemp(f"gguf-{level}-{position}")
    files = {t: export_gguf(model, tokenizer, folder / f"{t}.gguf", t) for t in GAPS}
    return tokenizer, model, files


@needs_llama
def test_llama_cpp_reads_smolgpt_ids(exported):
    tokenizer, _, files = exported
    llama = load_llama(files["f32"])
    for text in TEXTS:
        text = known(tokenizer, text)
        assert llama.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text)
        assert llama.detokenize(tokenizer.encode(text)).decode() == text


@needs_llama
def test_an_ascii_character_vocabulary_needs_no_merges(tmp_path):
    text = "Plain ASCII, on two lines:\nno character takes two bytes. 1597! (Act II)" * 3
    tokenizer = CharTokenizer.train([text])
    assert tokenizer.byte_level_bpe()[1] == []
    path = export_gguf(make_model(tokenizer.vocab_size, "rope"), tokenizer, tmp_path / "a.gguf")
    assert load_llama(path).tokenize(text.encode(), add_bos=False) == tokenizer.encode(text)


@needs_llama
def test_llama_cpp_continues_greedily_with_smolgpt_tokens(exported):
    tokenizer, model, files = exported
    prompt = tokenizer.encode(known(tokenizer, "ROMEO: But"))
    ours = generate(model, prompt, SampleConfig(temperature=0, max_new_tokens=50))[0]
    assert llama_greedy(load_llama(files["f32"]), prompt, 50) == ours


@needs_llama
def test_llama_cpp_log_probabilities_agree(exported):
    """In float32 the file computes what smolgpt computes with llama.cpp's GELU: the same
    log-probabilities (measured: median 2e-7, at most 1.02e-4 where a GELU input within
    float rounding of a float16 step takes the neighbouring table entry). Against smolgpt's
    own exact GELU, and for f16 and q8_0, within GAPS (measured on these deliberately sharp
    models: 7.7e-4, 1.3e-3 and 3.2e-2 at most; a trained model's cost is in
    docs/guides/export.md)."""
    tokenizer, model, files = exported
    ids = tokenizer.encode(known(tokenizer, TEXTS[0] + "\n" + TEXTS[1]))[:64]
    gap = np.abs(
        llama_logprobs(load_llama(files["f32"]), ids) - smolgpt_logprobs(with_ggml_gelu(model), ids)
    )
    assert np.median(gap) < 1e-5 and gap.max() < 2e-4, gap
    exact = smolgpt_logprobs(model, ids)
    for outtype, bound in GAPS.items():
        gap = np.abs(llama_logprobs(load_llama(files[outtype]), ids) - exact)
        assert gap.max() < bound, (outtype, gap.max())


# How far llama.cpp's log-probabilities may be from smolgpt's own (exact GELU), per token.
GAPS = {"f32": 2e-3, "f16": 5e-3, "q8_0": 0.1}


@needs_llama
@pytest.mark.slow
def test_the_benchmark_scores_every_outtype(char_checkpoint, tmp_path):
    """benchmarks/gguf_quality.py (what docs/guides/export.md quotes) runs, at toy size."""
    text = tmp_path / "held_out.txt"
    text.write_text(known(CharTokenizer.train([CORPUS]), TEXTS[0] * 3), encoding="utf-8")
    out = tmp_path / "gguf.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gguf_quality.py"
    result = subprocess.run(
        [sys.executable, str(script), str(char_checkpoint), "--data", str(text), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| q8_0 |" in result.stdout, result.stdout
    assert "Command: python benchmarks/gguf_quality.py" in result.stdout
    record = json.loads(out.read_text())
    assert [r["outtype"] for r in record["exports"]] == ["f32", "f16", "q8_0"]
