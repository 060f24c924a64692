"""Exports: what ``smolgpt export`` writes loads in Hugging Face transformers (no custom
code) and computes what the smolgpt model computes, its tokenizer gives smolgpt's ids, and
every export loads back into smolgpt exactly. Foreign or broken directories are refused
with one line.

The models are tiny (2 layers, 16 wide, context 32) with weights scaled up from their
initialisation, so that logits differ clearly between tokens and positions; the tokenizers
are trained on a short text written here, with CRLF line ends, curly quotes and punctuation.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import smolgpt
from smolgpt import checkpoint, cli, kernels
from smolgpt.config import ModelConfig, SampleConfig
from smolgpt.errors import SmolGPTError
from smolgpt.export import META, export_safetensors
from smolgpt.hf import export_hf
from smolgpt.interop import load_source
from smolgpt.model import GPT
from smolgpt.sampling import generate
from smolgpt.tokenizer import CharTokenizer, WordTokenizer

from e2e import (
    E2EResult,
    e2e_assert_install_advice,
    e2e_assert_one_line_error,
    e2e_sharp_model,
    names,
)

REPO = Path(__file__).resolve().parents[1]

CORPUS = (
    "“Holmes,” said I, “this is too much. You would certainly have been burned.”\r\n"
    "It’s a capital mistake to theorize before one has data -- red-headed men (all of "
    "them) paid $4 a week [or #2]; 100% sure! Isn’t it? I ca n't say … yes/no — {x} – y\r\n"
    "Über café naïve e\u0301 under_score x² ½ Ⅻ 東京 x\x1cy\u00a0z\tend\r"
)
# Texts to tokenize: line ends, a byte-order mark, quotes, punctuation, words the
# vocabulary lacks, and the characters where Python's regular expressions and the
# tokenizers library's differ unless told (combining marks, separators, numbers).
TEXTS = [
    "“Don’t,” said Holmes.\r\nIt’s 100% red-headed -- (all) $4!",
    "\ufeffHolmes said\rI\r\nyes",
    "Moriarty’s zebra said: hello? Holmes’s hat",
    "e\u0301 x²\x1cy\u00a0z under_score ½ Ⅻ 東京 naïve",
    "  leading and trailing spaces \n\n",
    "",
]
LEVELS = ("char", "word")


def make_tokenizer(level: str):
    return CharTokenizer.train([CORPUS]) if level == "char" else WordTokenizer.train([CORPUS], 1)


def make_model(
    vocab_size: int,
    position: str,
    bias: bool = True,
    block_size: int = 32,
    tied: bool = True,
    activation: str = "gelu",
) -> GPT:
    """A tiny model whose weights are large enough that its logits say something."""
    return e2e_sharp_model(
        vocab_size,
        position,
        16,
        block_size,
        scale=20,
        bias=bias,
        tie_embeddings=tied,
        activation=activation,
    )


def known_text(tokenizer, text: str) -> str:
    """text without the characters a character vocabulary lacks (as read: CR, BOM and
    curly quotes stay, since normalisation turns them into characters it has)."""
    if isinstance(tokenizer, WordTokenizer):
        return text
    missing = set(tokenizer.unknown(text))
    return "".join(ch for ch in text if ch not in missing)


def logits(model: GPT, ids: list) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0]  # (logits, loss) -> the logits of row 0


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def exported_files(folder: Path) -> set:
    return {p.name for p in folder.iterdir()}


def trained_run(make_trainer, folder: Path, level: str, **settings) -> Path:
    """A run directory whose best_model.pth is a real trainer's after one step."""
    trainer = make_trainer(level, **settings)
    trainer.train_step()
    checkpoint.save(folder / "best_model.pth", trainer.state())
    return folder


# ------------------------------------------------------------------- Hugging Face format


@pytest.mark.parametrize(
    "level, position, bias, tied, activation",
    [
        ("char", "learned", True, True, "gelu"),
        ("char", "rope", False, True, "gelu"),
        ("word", "learned", False, True, "gelu"),
        ("word", "rope", True, True, "gelu"),
        ("char", "learned", True, False, "gelu"),
        ("word", "rope", False, False, "gelu"),
        # GPT-2's tanh GELU (a model started from GPT-2) exports as transformers' gelu_new.
        ("char", "learned", True, True, "gelu_tanh"),
        ("word", "rope", True, True, "gelu_tanh"),
    ],
)
def test_transformers_computes_what_smolgpt_computes(
    transformers, tmp_path, level, position, bias, tied, activation
):
    tokenizer = make_tokenizer(level)
    model = make_model(tokenizer.vocab_size, position, bias, tied=tied, activation=activation)
    out = export_hf(model, tokenizer, tmp_path / "hf", train_config={"preset": "nano"})
    assert exported_files(out) == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "smolgpt.json",
    }

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert (
        type(hf).__name__ == {"learned": "GPT2LMHeadModel", "rope": "GPTNeoXForCausalLM"}[position]
    )
    shared = (
        hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    )
    assert shared == tied  # the head is tied or not, as in smolgpt

    ids = tokenizer.encode(known_text(tokenizer, CORPUS))[:32]
    assert len(ids) == 32  # the whole context
    ours = logits(model, ids)
    assert ours.std() > 1.0  # a model whose logits differ clearly
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)

    prompt, new = ids[:8], 24  # prompt and continuation within block_size
    greedy = generate(model, prompt, SampleConfig(temperature=0, max_new_tokens=new))[0]
    hf_greedy = hf.generate(
        torch.tensor([prompt]),
        do_sample=False,
        max_new_tokens=new,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )
    assert hf_greedy[0].tolist() == prompt + greedy
    assert len(set(greedy)) > 1  # not one token over and over: the comparison says something

    # And back: the same model, tokenizer and settings.
    back, back_tokenizer, train_config, _ = load_source(out, torch.device("cpu"))
    assert back.config == model.config
    assert back_tokenizer.to_dict() == tokenizer.to_dict()
    assert train_config == {"preset": "nano"}
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_a_model_changed_and_saved_by_transformers_loads_back(transformers, tmp_path, position):
    """As after fine-tuning in transformers: the zero biases of a model without biases have
    changed, so it comes back with biases."""
    tokenizer = make_tokenizer("word")
    out = export_hf(
        make_model(tokenizer.vocab_size, position, bias=False), tokenizer, tmp_path / "hf"
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.01 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "tuned")
    (tmp_path / "tuned" / "smolgpt.json").write_bytes((out / "smolgpt.json").read_bytes())

    tuned = smolgpt.load(tmp_path / "tuned", "cpu")
    assert tuned.config.bias
    ids = tokenizer.encode(CORPUS)[:32]
    with torch.no_grad():
        theirs = hf.eval()(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits(tuned.module, ids), theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("level", LEVELS)
def test_autotokenizer_gives_smolgpts_ids(transformers, tmp_path, level):
    tokenizer = make_tokenizer(level)
    out = export_hf(make_model(tokenizer.vocab_size, "rope"), tokenizer, tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert isinstance(hf, transformers.PreTrainedTokenizerFast)
    # A begin token for tools that start every text from one (lm-evaluation-harness), the
    # token smolgpt's generation starts from; no end token, at which generate would stop.
    bos = tokenizer.boundary_id()
    assert hf.bos_token_id == bos and hf.eos_token_id is None
    assert json.loads((out / "config.json").read_text())["bos_token_id"] == bos
    assert bos == (WordTokenizer.PAD_ID if level == "word" else tokenizer.encode("\n")[0])
    for text in TEXTS + [CORPUS]:
        text = known_text(tokenizer, text)
        ids = tokenizer.encode(text)
        assert hf(text)["input_ids"] == ids, repr(text)  # no BOS or EOS added either
        if level == "char":
            assert hf.decode(ids) == tokenizer.decode(ids), repr(text)
    if level == "char":
        with pytest.raises(Exception, match="Missing \\[UNK\\]"):  # no unknown id to use
            hf("a character it lacks: @")
        return
    assert hf.unk_token_id == WordTokenizer.UNK_ID and hf.pad_token_id == WordTokenizer.PAD_ID
    assert hf("zebra Moriarty")["input_ids"] == [WordTokenizer.UNK_ID] * 2
    # Decoding re-attaches punctuation as smolgpt does ...
    text = (
        "It's 100% red-headed -- (all) $4 [or #2]; sure! I ca n't say ... yes/no — "
        "{x} – y, said I. Zebra?"
    )
    ids = tokenizer.encode(text)
    expected = "it's 100% red-headed--(all) $4 [or #2]; sure! i can't say... yes/no—{x}–y, "
    assert hf.decode(ids) == tokenizer.decode(ids) == expected + "said i. <UNK>?"
    # ... but for ASCII quotes, which smolgpt alternates between opening and closing.
    ids = tokenizer.encode('"Holmes," said I.')
    assert tokenizer.decode(ids) == '"holmes," said i.'
    assert hf.decode(ids) == '" holmes, " said i.'


def test_a_tokenizer_that_does_not_normalise_exports_as_it_is(transformers, tmp_path):
    """Tokenizers saved before smolgpt 0.5 read text as given (CR, curly quotes and all)."""
    words = WordTokenizer.train([CORPUS], 1).itos[2:] + ["holmes’s", "it’s", "“", "”"]
    tokenizer = WordTokenizer(words, 1, normalize=False)
    out = export_hf(make_model(tokenizer.vocab_size, "learned"), tokenizer, tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert hf(text)["input_ids"] == tokenizer.encode(text), repr(text)


# ---------------------------------------------------------------------- safetensors format


@pytest.mark.parametrize(
    "level, position, tied",
    [("char", "rope", True), ("word", "learned", True), ("char", "learned", False)],
)
def test_safetensors_export_loads_back_exactly(tmp_path, level, position, tied):
    from safetensors import safe_open

    tokenizer = make_tokenizer(level)
    model = make_model(tokenizer.vocab_size, position, bias=position == "rope", tied=tied)
    out = export_safetensors(model, tokenizer, tmp_path / "st", {"max_iters": 7})
    assert exported_files(out) == {"model.safetensors", "smolgpt.json"}  # no pickle
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "wte.weight" in names and ("lm_head.weight" in names) != tied  # a tied one once
    meta = json.loads((out / "smolgpt.json").read_text(encoding="utf-8"))
    assert meta["format"] == "smolgpt-export" and meta["weights"] == "smolgpt"

    loaded = smolgpt.load(out, device="cpu")
    assert loaded.config == model.config and loaded.train_config == {"max_iters": 7}
    assert loaded.tokenizer.to_dict() == tokenizer.to_dict()
    ids = tokenizer.encode(known_text(tokenizer, CORPUS))[:32]
    # (smolgpt.load swaps in the CPU kernels: the same logits as the model with them)
    assert torch.equal(logits(loaded.module, ids), logits(kernels.use_fast_kernels(model), ids))
    assert (loaded.module.lm_head.weight is loaded.module.wte.weight) == tied


def test_an_untied_rotary_head_saved_by_transformers_4_loads_back(tmp_path):
    """transformers 4 named GPT-NeoX's output head embed_out."""
    pytest.importorskip("tokenizers")
    from safetensors.torch import load_file, save_file

    tokenizer = make_tokenizer("char")
    model = make_model(tokenizer.vocab_size, "rope", tied=False)
    out = export_hf(model, tokenizer, tmp_path / "hf")
    tensors = load_file(out / "model.safetensors")
    tensors["embed_out.weight"] = tensors.pop("lm_head.weight")
    save_file(tensors, out / "model.safetensors")
    back = smolgpt.load(out, "cpu").module
    assert not back.config.tie_embeddings
    torch.testing.assert_close(back.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def test_a_model_without_the_causal_mask_exports_only_as_safetensors(tmp_path):
    pytest.importorskip("tokenizers")
    tokenizer = make_tokenizer("char")
    model = GPT(
        ModelConfig(
            vocab_size=tokenizer.vocab_size,
            n_layer=1,
            n_head=2,
            n_embd=8,
            block_size=16,
            causal=False,
        )
    )
    with pytest.raises(SmolGPTError, match=names("--no-causal", "--format safetensors")):
        export_hf(model, tokenizer, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    out = export_safetensors(model, tokenizer, tmp_path / "st")
    assert smolgpt.load(out, "cpu").config.causal is False


def test_model_export_from_python(transformers, tmp_path):
    """smolgpt.load(...).export(...): the API behind `smolgpt export`, both formats."""
    tokenizer = make_tokenizer("char")
    source = export_safetensors(
        make_model(tokenizer.vocab_size, "rope"), tokenizer, tmp_path / "source"
    )
    model = smolgpt.load(source, device="cpu")
    ids = tokenizer.encode("Holmes said")
    for fmt in ("hf", "safetensors"):
        out = model.export(tmp_path / fmt, format=fmt)
        assert out == tmp_path / fmt and (out / "smolgpt.json").is_file()
        assert torch.equal(
            logits(smolgpt.load(out, device="cpu").module, ids), logits(model.module, ids)
        )
    with pytest.raises(SmolGPTError, match=names("'onnx'", "hf", "safetensors", "gguf")):
        model.export(tmp_path / "onnx", format="onnx")
    with pytest.raises(SmolGPTError, match=names(str(tmp_path / "hf"), "empty", "--overwrite")):
        model.export(tmp_path / "hf", format="hf")
    assert model.export(tmp_path / "hf", format="hf", overwrite=True) == tmp_path / "hf"


@pytest.mark.slow
def test_exports_load_without_transformers_and_hf_export_says_what_to_install(
    make_trainer, tmp_path
):
    pytest.importorskip("tokenizers")  # to write the Hugging Face export read below
    run = trained_run(make_trainer, tmp_path / "run", "char")
    model = smolgpt.load(run, "cpu")
    for fmt, export in (("hf", export_hf), ("safetensors", export_safetensors)):
        export(model.module, model.tokenizer, tmp_path / fmt)
    script = (
        "import sys\n"
        "sys.modules['transformers'] = sys.modules['tokenizers'] = None  # not installed\n"
        "import smolgpt\n"
        "from smolgpt.cli import main\n"
        "for folder in sys.argv[1:3]:\n"
        "    print(smolgpt.load(folder, 'cpu').generate(max_new_tokens=5, temperature=0))\n"
        "sys.exit(main(['export', sys.argv[3], sys.argv[4], '--format', 'hf']))\n"
    )
    args = [tmp_path / "hf", tmp_path / "safetensors", run, tmp_path / "out"]
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        text=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    run_result = E2EResult(
        ["python", "-c", "...", *args], result.returncode, result.stdout, result.stderr, 0.0
    )
    expected = model.generate(max_new_tokens=5, temperature=0)
    assert result.stdout == f"{expected}\n{expected}\n", run_result.describe()
    e2e_assert_one_line_error(run_result, "tokenizers")
    e2e_assert_install_advice(run_result.stderr, "hf")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ writing directories


def test_a_failed_export_leaves_nothing_and_keeps_an_earlier_one(tmp_path):
    tokenizer = make_tokenizer("char")
    model = make_model(tokenizer.vocab_size, "rope")
    unwritable = {"seed": object()}  # not JSON: fails after model.safetensors is written
    with pytest.raises(TypeError):
        export_safetensors(model, tokenizer, tmp_path / "st", unwritable)
    assert list(tmp_path.iterdir()) == []  # neither the directory nor a temporary one

    export_safetensors(model, tokenizer, tmp_path / "st", {"seed": 1})
    before = {p.name: p.read_bytes() for p in (tmp_path / "st").iterdir()}
    with pytest.raises(TypeError):
        export_safetensors(model, tokenizer, tmp_path / "st", unwritable, overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "st").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["st"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_an_export_has_the_permissions_of_a_folder_made_by_hand(tmp_path):
    old = os.umask(0o022)
    try:
        tokenizer = make_tokenizer("char")
        out = export_safetensors(
            make_model(tokenizer.vocab_size, "rope"), tokenizer, tmp_path / "st"
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {0o644}


def test_out_dir_rules(tmp_path):
    tokenizer = make_tokenizer("char")
    model = make_model(tokenizer.vocab_size, "learned")
    (tmp_path / "empty").mkdir()
    export_safetensors(model, tokenizer, tmp_path / "empty")  # an empty one is fine
    with pytest.raises(SmolGPTError, match=names(str(tmp_path / "empty"), "--overwrite")) as err:
        export_safetensors(model, tokenizer, tmp_path / "empty")
    assert "empty" in str(err.value).replace(str(tmp_path / "empty"), "")  # not only the path
    export_safetensors(model, tokenizer, tmp_path / "empty", {"a": 1}, overwrite=True)
    assert smolgpt.load(tmp_path / "empty", "cpu").train_config == {"a": 1}

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    # What an earlier export would hold, and what --overwrite replaces: never deleted.
    with pytest.raises(SmolGPTError, match=names(str(tmp_path / "notes"), META, "--overwrite")):
        export_safetensors(model, tokenizer, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


# --------------------------------------------------------------- foreign directories


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data), encoding="utf-8")


def untied_head(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = torch.randn_like(tensors["transformer.wte.weight"])
    save_file(tensors, folder / "model.safetensors")


def pickled_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")


def another_architecture(folder: Path) -> None:
    for name in ("smolgpt.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))


# (position of the exported model, how the directory is changed, what the error names)
FOREIGN = {
    "another activation": (
        "learned",
        lambda d: edit_json(d / "config.json", activation_function="relu"),
        ("config.json", "activation_function", "'relu'", "gelu_new"),
    ),
    "parallel residual": (
        "rope",
        lambda d: edit_json(d / "config.json", use_parallel_residual=True),
        ("config.json", "use_parallel_residual", "True"),
    ),
    "partial rotary": (
        "rope",
        lambda d: edit_json(
            d / "config.json",
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.25,
            },
        ),
        ("config.json", "partial_rotary_factor", "0.25", "1.0"),
    ),
    "untied in config": (
        "rope",
        lambda d: edit_json(d / "config.json", tie_word_embeddings=False),
        ("model.safetensors", "lm_head.weight", "missing"),
    ),
    "tie not a bool": (
        "learned",
        lambda d: edit_json(d / "config.json", tie_word_embeddings=1),
        ("config.json", "tie_word_embeddings", "1"),
    ),
    "untied in weights": ("learned", untied_head, ("lm_head.weight", "config.json", "tied")),
    "another shape": (
        "learned",
        lambda d: edit_json(d / "config.json", n_layer=3),
        ("model.safetensors", "transformer.h.2.attn.c_attn.bias", "missing"),
    ),
    "another architecture": ("rope", another_architecture, ("'llama'", "gpt2", "gpt_neox")),
    "mismatched tokenizer": (
        "rope",
        lambda d: edit_json(
            d / "smolgpt.json", tokenizer={"type": "word", "words": ["one", "two"]}
        ),
        ("tokenizer", "4 tokens"),
    ),
    "no smolgpt tokenizer": ("rope", lambda d: (d / "smolgpt.json").unlink(), ("no smolgpt.json",)),
    "pickled weights": ("learned", pickled_weights, ("pytorch_model.bin", "model.safetensors")),
    "no weights": (
        "rope",
        lambda d: (d / "model.safetensors").unlink(),
        ("no model.safetensors",),
    ),
}


@pytest.mark.parametrize("name", list(FOREIGN))
def test_directories_smolgpt_cannot_reproduce_are_refused(tmp_path, name):
    pytest.importorskip("tokenizers")
    position, change, needles = FOREIGN[name]
    tokenizer = make_tokenizer("word")
    out = export_hf(make_model(tokenizer.vocab_size, position), tokenizer, tmp_path / "hf")
    change(out)
    with pytest.raises(SmolGPTError, match=names(*needles)) as error:
        smolgpt.load(out, "cpu")
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------- the command line


@pytest.mark.slow
def test_export_command_then_generate_gives_the_same_text(smol_cli, make_trainer, tmp_path):
    """Each format once (the API tests above cover the other level and layout of each):
    hf from a rotary char run directory, safetensors from a learned word .pth file."""
    pytest.importorskip("tokenizers")
    runs = {
        "hf": trained_run(make_trainer, tmp_path / "char", "char", position="rope"),
        "safetensors": trained_run(make_trainer, tmp_path / "word", "word", position="learned"),
    }
    sources = {"hf": runs["hf"], "safetensors": runs["safetensors"] / "best_model.pth"}
    exports = {fmt: tmp_path / f"export_{fmt}" for fmt in runs}
    results = smol_cli.run_many(
        [("module", ["export", sources[fmt], out, "--format", fmt]) for fmt, out in exports.items()]
    )
    for result in results:
        assert result.returncode == 0 and result.stdout == "", result.describe()
    assert "AutoModelForCausalLM.from_pretrained" in results[0].stderr, results[0].describe()
    assert "model.safetensors" in results[0].stderr and "tokenizer.json" in results[0].stderr
    assert f"generate {exports['safetensors']}" in results[1].stderr, results[1].describe()

    greedy = ["--temperature", "0", "--max_new_tokens", "12"]
    samples = smol_cli.run_many([("generate", [out, *greedy]) for out in exports.values()])
    for fmt, result in zip(exports, samples):
        assert result.returncode == 0, result.describe()
        # What generate.py prints from the original checkpoint (test_api shows it is this).
        original = smolgpt.load(runs[fmt]).generate(max_new_tokens=12, temperature=0)
        assert result.stdout == original + "\n", result.describe()


@pytest.fixture
def run_cli(capsys):
    """run_cli(*args) -> E2EResult: smolgpt.cli.main in this process, output captured; the
    'smolgpt' logger main() configures is put back afterwards."""
    logger = logging.getLogger("smolgpt")
    saved = list(logger.handlers), logger.level, logger.propagate

    def run(*args) -> E2EResult:
        argv = [str(a) for a in args]
        capsys.readouterr()
        try:
            status = cli.main(argv)
        except SystemExit as exc:  # argparse's usage errors
            status = exc.code
        out, err = capsys.readouterr()
        return E2EResult(["smolgpt", *argv], status, out, err, 0.0)

    yield run
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def test_export_command_refuses_bad_input_in_one_line(run_cli, make_trainer, tmp_path):
    pytest.importorskip("tokenizers")
    run = trained_run(make_trainer, tmp_path / "run", "char")
    out = tmp_path / "out"
    e2e_assert_one_line_error(
        run_cli("export", run, out, "--format", "onnx"), "--format", "'onnx'", "hf", "safetensors"
    )
    e2e_assert_one_line_error(
        run_cli("export", tmp_path / "nope.pth", out, "--format", "hf"), "nope.pth", "not exist"
    )
    (tmp_path / "notes.txt").write_text("not a model")
    e2e_assert_one_line_error(
        run_cli("export", tmp_path / "notes.txt", out, "--format", "hf"),
        "notes.txt",
        "smolgpt checkpoint",
    )
    (tmp_path / "empty").mkdir()
    e2e_assert_one_line_error(
        run_cli("export", tmp_path / "empty", out, "--format", "hf"),
        str(tmp_path / "empty"),
        "best_model.pth",
        "latest_model.pth",
    )
    assert not out.exists()

    assert run_cli("export", run, out, "--format", "hf").returncode == 0
    e2e_assert_one_line_error(
        run_cli("export", run, out, "--format", "safetensors"), str(out), "empty", "--overwrite"
    )
    assert (out / "config.json").is_file()  # the earlier export is untouched
    assert run_cli("export", run, out, "--format", "safetensors", "--overwrite").returncode == 0
    assert exported_files(out) == {"model.safetensors", "smolgpt.json"}

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "activation_function": "relu"})
    )
    e2e_assert_one_line_error(run_cli("export", foreign, tmp_path / "o2", "--format", "hf"), "relu")
    e2e_assert_one_line_error(run_cli("generate", foreign), "relu")


# ------------------------------------------------------------------------- the guide


def test_readme_export_snippet_runs(transformers, tmp_path, monkeypatch, capsys):
    """The export guide's snippet, as written, on a char model that knows its prompt."""
    guide = (REPO / "docs" / "guides" / "export.md").read_text(encoding="utf-8")
    snippet = guide.split("```python\n")[1].split("```")[0]
    tokenizer = CharTokenizer.train([CORPUS + "ROMEO:"])
    model = make_model(tokenizer.vocab_size, "learned", block_size=128)
    export_hf(model, tokenizer, tmp_path / "exports" / "char_nano_hf")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    exec(compile(snippet, "docs/guides/export.md", "exec"), {})
    prompt = tokenizer.encode("ROMEO:")
    greedy = generate(model, prompt, SampleConfig(temperature=0, max_new_tokens=100))[0]
    assert capsys.readouterr().out == tokenizer.decode(prompt + greedy) + "\n"
