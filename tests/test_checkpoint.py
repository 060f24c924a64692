"""Checkpoints: round trip, and every broken, foreign or hostile file refused clearly."""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import flip_bit_in_tensor_data

from smolgpt import checkpoint
from smolgpt.config import ModelConfig, resolve_train_config
from smolgpt.errors import SmolGPTError
from smolgpt.model import GPT
from smolgpt.tokenizer import CharTokenizer, WordTokenizer

TEXT = "It is a capital mistake to theorize before one has data.\n"


def make_checkpoint(config: ModelConfig | None = None, tokenizer=None,
                    position: str = "rope") -> tuple[dict, GPT]:
    tokenizer = tokenizer or CharTokenizer.train([TEXT])
    config = config or ModelConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1,
                                   n_head=2, n_embd=16, dropout=0.0, position=position)
    torch.manual_seed(0)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-3)
    x = torch.randint(config.vocab_size, (2, 8))
    _, loss = model(x, targets=x)
    loss.backward()
    optimizer.step()
    ckpt = {
        "model_config": dataclasses.asdict(config),
        "tokenizer": tokenizer.to_dict(),
        "model": model.state_dict(),
        "train_config": dataclasses.asdict(resolve_train_config({"preset": "nano"})),
        "optimizer": optimizer.state_dict(),
        "scaler": None,
        "progress": {"iteration": 7, "best_val_loss": 1.5, "evals_since_best": 0, "elapsed": 3.0},
        "rng": {"torch": torch.get_rng_state(), "cuda": [], "sampler": torch.Generator().get_state()},
    }
    return ckpt, model


@pytest.fixture
def saved(tmp_path) -> tuple[Path, dict, GPT]:
    ckpt, model = make_checkpoint()
    path = tmp_path / "model.pth"
    checkpoint.save(path, ckpt)
    return path, ckpt, model


def test_round_trip(saved):
    path, ckpt, model = saved
    loaded = checkpoint.load(path)
    assert loaded["format"] == checkpoint.FORMAT
    assert loaded["format_version"] == checkpoint.FORMAT_VERSION
    assert loaded["model_config"] == ckpt["model_config"]
    assert loaded["tokenizer"] == ckpt["tokenizer"]
    assert loaded["train_config"] == ckpt["train_config"]
    assert loaded["progress"] == ckpt["progress"]
    assert torch.equal(loaded["rng"]["torch"], ckpt["rng"]["torch"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded["model"][name], tensor), name
    # the optimiser state (AdamW moments) survives the weights-only unpickler too
    assert loaded["optimizer"]["state"].keys() == ckpt["optimizer"]["state"].keys()
    first = next(iter(ckpt["optimizer"]["state"]))
    assert torch.equal(loaded["optimizer"]["state"][first]["exp_avg"],
                       ckpt["optimizer"]["state"][first]["exp_avg"])


def test_checkpoint_from_before_rotary_loads_with_learned_positions(tmp_path):
    ckpt, model = make_checkpoint(position="learned")
    del ckpt["model_config"]["position"]  # as written by smolgpt 0.1.0
    path = tmp_path / "old.pth"
    checkpoint.save(path, ckpt)
    loaded, _, _ = checkpoint.load_model(path, torch.device("cpu"))
    assert loaded.config.position == "learned"
    x = torch.randint(model.config.vocab_size, (1, 10))
    torch.testing.assert_close(loaded(x)[0], model.eval()(x)[0])


def test_load_model_gives_same_outputs(saved):
    path, _, model = saved
    loaded, tokenizer, raw = checkpoint.load_model(path, torch.device("cpu"))
    assert not loaded.training
    assert tokenizer.decode(tokenizer.encode(TEXT)) == TEXT
    assert raw["progress"]["iteration"] == 7
    x = torch.tensor([tokenizer.encode("It is a capital")])
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])
    assert loaded.lm_head.weight is loaded.wte.weight  # tying survives loading


def test_word_tokenizer_round_trip(tmp_path):
    tok = WordTokenizer.train([TEXT * 3], 2)
    ckpt, _ = make_checkpoint(tokenizer=tok)
    checkpoint.save(tmp_path / "w.pth", ckpt)
    _, tokenizer, _ = checkpoint.load_model(tmp_path / "w.pth", torch.device("cpu"))
    assert tokenizer.to_dict() == tok.to_dict()


def test_save_replaces_atomically(saved):
    path, ckpt, _ = saved
    ckpt = {**ckpt, "progress": {**ckpt["progress"], "iteration": 99}}
    checkpoint.save(path, ckpt)
    assert checkpoint.load(path)["progress"]["iteration"] == 99
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pth"]  # no temp files


# --------------------------------------------------------------------------- broken files

def test_missing_file(tmp_path):
    with pytest.raises(SmolGPTError, match="does not exist"):
        checkpoint.load(tmp_path / "nope.pth")
    (tmp_path / "dir.pth").mkdir()
    with pytest.raises(SmolGPTError, match="does not exist"):
        checkpoint.load(tmp_path / "dir.pth")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.touch()
    with pytest.raises(SmolGPTError, match="is empty"):
        checkpoint.load(path)


@pytest.mark.parametrize("fraction", [0.5, 0.1, 0.99])
def test_truncated_file(saved, tmp_path, fraction):
    path, _, _ = saved
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(SmolGPTError, match="not a readable checkpoint") as err:
        checkpoint.load(cut)
    assert str(cut) in str(err.value)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(SmolGPTError, match=str(path)):
        checkpoint.load(path)


@pytest.mark.parametrize("obj", [[1, 2, 3], {"model": {}, "format_version": 1}, {"format": "other"}, "text"])
def test_foreign_file(tmp_path, obj):
    path = tmp_path / "foreign.pth"
    torch.save(obj, path)
    with pytest.raises(SmolGPTError, match="not a smolgpt checkpoint"):
        checkpoint.load(path)


def test_plain_state_dict_is_foreign(tmp_path):
    _, model = make_checkpoint()
    path = tmp_path / "state_dict.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(SmolGPTError, match="not a smolgpt checkpoint"):
        checkpoint.load(path)


def test_newer_format_version(tmp_path):
    ckpt, _ = make_checkpoint()
    path = tmp_path / "future.pth"
    checkpoint.save(path, {**ckpt, "format_version": checkpoint.FORMAT_VERSION + 1})
    with pytest.raises(SmolGPTError, match="newer than this smolgpt") as err:
        checkpoint.load(path)
    assert "upgrade" in str(err.value)


@pytest.mark.parametrize("key", checkpoint.REQUIRED)
def test_missing_required_key(tmp_path, key):
    ckpt, _ = make_checkpoint()
    path = tmp_path / "partial.pth"
    torch.save({"format": checkpoint.FORMAT, "format_version": 1,
                **{k: v for k, v in ckpt.items() if k != key}}, path)
    if key == "format_version":
        del_path = tmp_path / "noversion.pth"
        raw = torch.load(path, weights_only=True)
        raw.pop("format_version")
        torch.save(raw, del_path)
        path = del_path
    with pytest.raises(SmolGPTError, match=key):
        checkpoint.load(path)


def test_weight_shape_mismatch(tmp_path):
    ckpt, _ = make_checkpoint()
    ckpt["model_config"] = {**ckpt["model_config"], "n_embd": 32}
    path = tmp_path / "mismatch.pth"
    checkpoint.save(path, ckpt)
    with pytest.raises(SmolGPTError, match=r"has shape .* expected"):
        checkpoint.load(path)


def test_block_size_mismatch_names_the_weight(tmp_path):
    ckpt, _ = make_checkpoint(position="learned")
    ckpt["model_config"] = {**ckpt["model_config"], "block_size": 64}
    path = tmp_path / "mismatch.pth"
    checkpoint.save(path, ckpt)
    with pytest.raises(SmolGPTError, match="wpe.weight"):
        checkpoint.load(path)


def test_missing_or_extra_weights(tmp_path):
    ckpt, _ = make_checkpoint()
    state = dict(ckpt["model"])
    state.pop("ln_f.weight")
    checkpoint.save(tmp_path / "a.pth", {**ckpt, "model": state})
    with pytest.raises(SmolGPTError, match="do not match"):
        checkpoint.load(tmp_path / "a.pth")
    extra = {**ckpt["model"], "extra.weight": torch.zeros(2)}
    checkpoint.save(tmp_path / "b.pth", {**ckpt, "model": extra})
    with pytest.raises(SmolGPTError, match="do not match"):
        checkpoint.load(tmp_path / "b.pth")


def test_tokenizer_vocab_mismatch(tmp_path):
    ckpt, _ = make_checkpoint()
    ckpt["tokenizer"] = CharTokenizer.train(["abc"]).to_dict()
    checkpoint.save(tmp_path / "t.pth", ckpt)
    with pytest.raises(SmolGPTError, match="tokenizer has 3 tokens"):
        checkpoint.load(tmp_path / "t.pth")


@pytest.mark.parametrize(
    "model_config",
    [None, "n_embd=16", {"block_size": 8}, {"vocab_size": 5, "bogus": 1}, {"vocab_size": 0}],
)
def test_malformed_model_config(tmp_path, model_config):
    ckpt, _ = make_checkpoint()
    ckpt["model_config"] = model_config
    checkpoint.save(tmp_path / "m.pth", ckpt)
    with pytest.raises(SmolGPTError):
        checkpoint.load(tmp_path / "m.pth")


def test_malformed_tokenizer(tmp_path):
    ckpt, _ = make_checkpoint()
    ckpt["tokenizer"] = {"type": "char"}
    checkpoint.save(tmp_path / "tok.pth", ckpt)
    with pytest.raises(SmolGPTError, match="tokenizer"):
        checkpoint.load(tmp_path / "tok.pth")


# --------------------------------------------------------------------------- hostile files

class OpenFile:
    """Unpickling this calls open(marker, 'w'), creating the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class RunShell:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", [OpenFile, RunShell])
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused(tmp_path, payload, writer):
    def write(path: Path, marker: Path) -> None:
        ckpt, _ = make_checkpoint()
        evil = {**ckpt, "format": checkpoint.FORMAT, "format_version": 1, "extra": payload(marker)}
        if writer == "torch":
            torch.save(evil, path)
        else:
            with open(path, "wb") as f:
                pickle.dump(evil, f, protocol=2)  # torch.load's legacy format

    # The payload is real: an unsafe load of a twin file does create its marker.
    twin, twin_marker = tmp_path / "twin.pth", tmp_path / "twin-marker"
    write(twin, twin_marker)
    if writer == "torch":
        torch.load(twin, weights_only=False)
    else:
        with open(twin, "rb") as f:
            pickle.load(f)
    assert twin_marker.exists()

    path, marker = tmp_path / "evil.pth", tmp_path / "marker"
    write(path, marker)
    with pytest.raises(SmolGPTError) as err:
        checkpoint.load(path)
    assert not marker.exists()
    assert str(path) in str(err.value)
    assert "refusing to load" in str(err.value)
    with pytest.raises(SmolGPTError):
        checkpoint.load_model(path, torch.device("cpu"))
    assert not marker.exists()


# ------------------------------------------------------------------------------ checksums

def test_every_tensor_has_a_checksum(saved):
    path, ckpt, _ = saved
    raw = torch.load(path, weights_only=True)
    places = set(raw["checksums"])
    assert {"model/wte.weight", "rng/torch", "rng/sampler"} <= places
    assert any(p.startswith("optimizer/state/") for p in places)
    assert raw["checksums"] == checkpoint.checksums(raw)


def test_a_flipped_bit_in_a_tensor_is_refused(saved, tmp_path):
    path, _, _ = saved
    before = torch.load(path, weights_only=True)
    entry = flip_bit_in_tensor_data(path)
    after = torch.load(path, weights_only=True)  # torch itself reads the damage silently
    assert checkpoint.checksums(after) != checkpoint.checksums(before), entry
    with pytest.raises(SmolGPTError, match=r"is damaged: the bytes of \S+ no longer match") as err:
        checkpoint.load(path)
    assert str(path) in str(err.value) and "best_model.pth" in str(err.value)
    with pytest.raises(SmolGPTError, match="is damaged"):
        checkpoint.load_model(path, torch.device("cpu"))  # what generate and the API use


def test_checkpoints_without_checksums_still_load_with_a_note(tmp_path, caplog):
    ckpt, model = make_checkpoint()
    path = tmp_path / "old.pth"
    # As smolgpt 0.3 wrote them: the same dictionary, no checksums.
    torch.save({"format": checkpoint.FORMAT, "format_version": 2, **ckpt}, path)
    with caplog.at_level(logging.INFO, logger="smolgpt.checkpoint"):
        loaded, _, _ = checkpoint.load_model(path, torch.device("cpu"))
    assert "written before smolgpt checkpoints carried checksums" in caplog.text
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
