"""Starting from GPT-2 (issue #36): GPT-2's own tokenizer, its weights read into smolgpt's
model, --init_from gpt2 downloading from a Hub (a local one on 127.0.0.1 here) and
--init_from DIR. The GPT-2 is a tiny random one that transformers builds and saves as the
Hub's openai-community/gpt2 is laid out; smolgpt must compute what transformers does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from smolgpt.gpt2tokenizer import GPT2Tokenizer
from smolgpt.tokenizer import tokenizer_from_dict

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXT = (
    "It was the best of times, it was the worst of times,\n\n"
    "it was the age of wisdom, it was the age of foolishness... "
    "Café naïve 東京 123 4567  spaces   and\ttabs\r\n<|endoftext|>The end.\n"
)
# Texts whose ids must be GPT2TokenizerFast's: runs of spaces and line breaks, characters
# the vocabulary spells in bytes, the special token inside text.
PROBES = [
    TEXT,
    "",
    " ",
    "\n\n\n",
    "a  b   c\n \n",
    "emoji 🦙 and ünïcödé",
    "<|endoftext|><|endoftext|>x",
    "   leading and trailing   ",
]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A transformers GPT-2 directory as the Hub has it (config.json, model.safetensors,
    tokenizer.json, vocab.json, merges.txt, tokenizer_config.json): 2 layers, 32 wide,
    a byte-level BPE of a few hundred tokens ending in <|endoftext|>, weights scaled up so
    that logits differ clearly."""
    folder = tmp_path_factory.mktemp("gpt2")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT * 3], vocab_size=400, special_tokens=[])
    bpe.add_special_tokens(["<|endoftext|>"])
    bpe.save_model(str(folder))  # vocab.json and merges.txt
    bpe.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "model_max_length": 64})
    )
    hf_tokenizer = transformers.GPT2TokenizerFast.from_pretrained(folder)
    config = transformers.GPT2Config(
        vocab_size=len(hf_tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=hf_tokenizer.eos_token_id,
        eos_token_id=hf_tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(8)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def hf_tokenizer(folder: Path):
    return transformers.GPT2TokenizerFast.from_pretrained(folder)


# ------------------------------------------------------------------------------ tokenizer


@pytest.mark.parametrize("files", ["tokenizer.json", "vocab.json + merges.txt"])
def test_the_tokenizer_gives_gpt2_tokenizer_fasts_ids_and_decodes_exactly(
    gpt2_dir, tmp_path, files
):
    folder = gpt2_dir
    if files != "tokenizer.json":  # the older layout: vocabulary and merges only
        folder = tmp_path / "old"
        folder.mkdir()
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            (folder / name).write_bytes((gpt2_dir / name).read_bytes())
    ours, theirs = GPT2Tokenizer.from_files(folder), hf_tokenizer(folder)
    assert ours.vocab_size == len(theirs)
    assert ours.boundary_id() == theirs.eos_token_id == ours.encode("<|endoftext|>")[0]
    for text in PROBES:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.encode_array(text).tolist() == ids
        assert ours.decode(ids) == text == theirs.decode(ids)
        decoder = ours.decoder()
        assert "".join(decoder.add([i]) for i in ids) + decoder.flush() == text
        starts = ours.starts(text)
        assert len(starts) == len(ids) and starts == sorted(starts)
    assert ours.level == "bpe" and ours.unknown(TEXT) == []


def test_the_tokenizer_is_self_contained_in_a_checkpoints_dict(gpt2_dir):
    ours = GPT2Tokenizer.from_files(gpt2_dir)
    back = tokenizer_from_dict(ours.to_dict())
    assert type(back) is GPT2Tokenizer
    assert back.to_dict() == ours.to_dict()
    assert back.encode(TEXT) == ours.encode(TEXT)
