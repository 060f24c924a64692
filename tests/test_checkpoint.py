"""Checkpoints: round trip, and every broken, foreign or hostile file refused clearly.

The checkpoints are built from a real Trainer's state() (see the make_trainer fixture), so
they hold exactly what training writes and cannot drift from it."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import pytest
import torch

from smolgpt import checkpoint, kernels
from smolgpt.errors import SmolGPTError
from smolgpt.model import GPT
from smolgpt.tokenizer import CharTokenizer

from e2e import E2E_ROOT, flip_bit_in_tensor_data, names


def trained(make_trainer, level: str = "char", **settings) -> tuple[dict, GPT]:
    """A checkpoint's plain data as training writes it (to change into broken files): the
    state() of a real Trainer after one step (so the optimisers hold moments), and its
    model."""
    trainer = make_trainer(level, **settings)
    trainer.train_step()
    return trainer.state().to_dict(), trainer.model.eval()


@pytest.fixture
def state(make_trainer) -> tuple[dict, GPT]:
    return trained(make_trainer)


@pytest.fixture
def saved(tmp_path, state) -> tuple[Path, dict, GPT]:
    ckpt, model = state
    path = tmp_path / "model.pth"
    checkpoint.save_dict(path, ckpt)
    return path, ckpt, model


def test_round_trip(make_trainer, tmp_path):
    """Everything a run needs to resume survives save and the weights-only unpickler."""
    trainer = make_trainer()
    trainer.train_step()
    ckpt, path = trainer.state(), tmp_path / "model.pth"
    checkpoint.save(path, ckpt)
    loaded = checkpoint.load(path)
    assert torch.load(path, weights_only=True)["format"] == checkpoint.FORMAT
    assert loaded.format_version == checkpoint.FORMAT_VERSION
    for key in ("model_config", "train_config", "progress", "data", "run_info", "scaler"):
        assert getattr(loaded, key) == getattr(ckpt, key), key
    assert loaded.tokenizer.to_dict() == ckpt.tokenizer.to_dict()
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(loaded.model[name], tensor), name
    assert len(loaded.optimizer) == len(ckpt.optimizer) == 2  # AdamW and Muon
    for mine, theirs in zip(loaded.optimizer, ckpt.optimizer):
        assert mine["state"], "the step left no optimiser state: nothing was compared"
        assert mine["param_groups"] == theirs["param_groups"]
        torch.testing.assert_close(mine["state"], theirs["state"], rtol=0, atol=0)
    for key in ("torch", "sampler"):
        assert torch.equal(loaded.rng[key], ckpt.rng[key]), key


def test_fields_a_newer_smolgpt_added_to_progress_are_left_out(saved):
    """A checkpoint of the same format version from a later smolgpt, whose progress has a
    field this one does not know, still loads."""
    path, ckpt, _ = saved
    checkpoint.save_dict(path, {**ckpt, "progress": {**ckpt["progress"], "future": 1}})
    assert checkpoint.load(path).progress == checkpoint.Progress(**ckpt["progress"])


def test_checkpoint_from_before_rotary_loads_with_learned_positions(make_trainer, tmp_path):
    ckpt, model = trained(make_trainer, position="learned")
    del ckpt["model_config"]["position"]  # as written by smolgpt 0.1.0
    path = tmp_path / "old.pth"
    checkpoint.save_dict(path, ckpt)
    loaded, _, _ = checkpoint.load_model(path, torch.device("cpu"))
    assert loaded.config.position == "learned"
    x = torch.randint(model.config.vocab_size, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0])


def test_load_model_gives_same_outputs(saved):
    path, _, model = saved
    loaded, tokenizer, _ = checkpoint.load_model(path, torch.device("cpu"))
    assert not loaded.training
    text = "Holmes and Watson opened the old door."
    assert tokenizer.decode(tokenizer.encode(text)) == text
    x = torch.tensor([tokenizer.encode(text)[:16]])
    # The trainer's model has kernels.py's faster parts; the loaded one is plain until they
    # are swapped in (as smolgpt.load does): then the outputs are the same, bit for bit.
    kernels.use_fast_kernels(loaded)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            assert torch.equal(loaded(x)[0], model(x)[0])
    finally:
        model.train(was_training)
    assert loaded.lm_head.weight is loaded.wte.weight  # tying survives loading


def test_word_tokenizer_round_trip(make_trainer, tmp_path):
    ckpt, _ = trained(make_trainer, "word")
    checkpoint.save_dict(tmp_path / "w.pth", ckpt)
    _, tokenizer, _ = checkpoint.load_model(tmp_path / "w.pth", torch.device("cpu"))
    assert tokenizer.level == "word"
    assert tokenizer.to_dict() == ckpt["tokenizer"]


def test_save_replaces_atomically(saved):
    path, ckpt, _ = saved
    ckpt = {**ckpt, "progress": {**ckpt["progress"], "iter": 99}}
    checkpoint.save_dict(path, ckpt)
    assert checkpoint.load(path).progress.iter == 99
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pth"]  # no temp files


# --------------------------------------------------------------------------- broken files


def test_missing_file(tmp_path):
    with pytest.raises(SmolGPTError, match=names(str(tmp_path / "nope.pth"), "not exist")):
        checkpoint.load(tmp_path / "nope.pth")
    (tmp_path / "dir.pth").mkdir()
    with pytest.raises(SmolGPTError, match=names(str(tmp_path / "dir.pth"), "not exist")):
        checkpoint.load(tmp_path / "dir.pth")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.touch()
    with pytest.raises(SmolGPTError, match=names(str(path))) as err:
        checkpoint.load(path)
    assert "empty" in str(err.value).replace(str(path), "")  # not only in the path


@pytest.mark.parametrize("fraction", [0.5, 0.1, 0.99])
def test_truncated_file(saved, tmp_path, fraction):
    path, _, _ = saved
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(SmolGPTError, match=names(str(cut))) as err:
        checkpoint.load(cut)
    assert "truncated" in str(err.value).replace(str(cut), "")  # not only in the path


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(SmolGPTError, match=names(str(path))):
        checkpoint.load(path)


@pytest.mark.parametrize(
    "obj", [[1, 2, 3], {"model": {}, "format_version": 1}, {"format": "other"}, "text"]
)
def test_foreign_file(tmp_path, obj):
    path = tmp_path / "foreign.pth"
    torch.save(obj, path)
    with pytest.raises(SmolGPTError, match=names(str(path), "smolgpt checkpoint")):
        checkpoint.load(path)


def test_plain_state_dict_is_foreign(tmp_path, state):
    _, model = state
    path = tmp_path / "state_dict.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(SmolGPTError, match=names(str(path), "smolgpt checkpoint")):
        checkpoint.load(path)


def test_newer_format_version(tmp_path, state):
    ckpt, _ = state
    path = tmp_path / "future.pth"
    version = checkpoint.FORMAT_VERSION + 1
    checkpoint.save_dict(path, {**ckpt, "format_version": version})
    # The file, its version, and how to get a smolgpt that reads it (in this clone).
    with pytest.raises(
        SmolGPTError, match=names(str(path), str(version), str(E2E_ROOT), "git pull")
    ):
        checkpoint.load(path)


@pytest.mark.parametrize("key", checkpoint.REQUIRED)
def test_missing_required_key(tmp_path, state, key):
    ckpt, _ = state
    path = tmp_path / "partial.pth"
    torch.save(
        {
            "format": checkpoint.FORMAT,
            "format_version": 1,
            **{k: v for k, v in ckpt.items() if k != key},
        },
        path,
    )
    if key == "format_version":
        del_path = tmp_path / "noversion.pth"
        raw = torch.load(path, weights_only=True)
        raw.pop("format_version")
        torch.save(raw, del_path)
        path = del_path
    with pytest.raises(SmolGPTError, match=key):
        checkpoint.load(path)


def test_weight_shape_mismatch(tmp_path, state):
    ckpt, _ = state
    ckpt["model_config"] = {**ckpt["model_config"], "n_embd": 32}
    path = tmp_path / "mismatch.pth"
    checkpoint.save_dict(path, ckpt)
    stored = tuple(ckpt["model"]["wte.weight"].shape)  # the first weight whose shape differs
    with pytest.raises(
        SmolGPTError, match=names(str(path), "wte.weight", str(stored), str((stored[0], 32)))
    ):
        checkpoint.load(path)


def test_block_size_mismatch_names_the_weight(tmp_path, make_trainer):
    ckpt, _ = trained(make_trainer, position="learned")
    ckpt["model_config"] = {**ckpt["model_config"], "block_size": 64}
    path = tmp_path / "mismatch.pth"
    checkpoint.save_dict(path, ckpt)
    with pytest.raises(SmolGPTError, match="wpe.weight"):
        checkpoint.load(path)


def test_missing_or_extra_weights(tmp_path, state):
    ckpt, _ = state
    weights = dict(ckpt["model"])
    weights.pop("ln_f.weight")
    checkpoint.save_dict(tmp_path / "a.pth", {**ckpt, "model": weights})
    with pytest.raises(SmolGPTError, match=names(str(tmp_path / "a.pth"), "weights", "config")):
        checkpoint.load(tmp_path / "a.pth")
    extra = {**ckpt["model"], "extra.weight": torch.zeros(2)}
    checkpoint.save_dict(tmp_path / "b.pth", {**ckpt, "model": extra})
    with pytest.raises(SmolGPTError, match=names(str(tmp_path / "b.pth"), "weights", "config")):
        checkpoint.load(tmp_path / "b.pth")


def test_tokenizer_vocab_mismatch(tmp_path, state):
    ckpt, _ = state
    ckpt["tokenizer"] = CharTokenizer.train(["abc"]).to_dict()
    checkpoint.save_dict(tmp_path / "t.pth", ckpt)
    vocab_size = ckpt["model_config"]["vocab_size"]
    # The file, and the two sizes that disagree.
    with pytest.raises(SmolGPTError, match=names("t.pth", "tokenizer", "3", str(vocab_size))):
        checkpoint.load(tmp_path / "t.pth")


@pytest.mark.parametrize(
    "model_config",
    [None, "n_embd=16", {"block_size": 8}, {"vocab_size": 5, "bogus": 1}, {"vocab_size": 0}],
)
def test_malformed_model_config(tmp_path, state, model_config):
    ckpt, _ = state
    ckpt["model_config"] = model_config
    checkpoint.save_dict(tmp_path / "m.pth", ckpt)
    with pytest.raises(SmolGPTError):
        checkpoint.load(tmp_path / "m.pth")


def test_malformed_tokenizer(tmp_path, state):
    ckpt, _ = state
    ckpt["tokenizer"] = {"type": "char"}
    checkpoint.save_dict(tmp_path / "tok.pth", ckpt)
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
def test_malicious_pickle_is_refused(tmp_path, state, payload, writer):
    def write(path: Path, marker: Path) -> None:
        ckpt, _ = state
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
    assert "run code" in str(err.value)  # why it is refused
    with pytest.raises(SmolGPTError):
        checkpoint.load_model(path, torch.device("cpu"))
    assert not marker.exists()


# ------------------------------------------------------------------------------ checksums


def test_every_tensor_has_a_checksum(saved):
    path, ckpt, _ = saved
    raw = torch.load(path, weights_only=True)
    places = set(raw["checksums"])
    assert {"model/wte.weight", "rng/torch", "rng/sampler"} <= places
    for i in range(len(ckpt["optimizer"])):  # AdamW's moments and Muon's momentum
        assert any(p.startswith(f"optimizer/{i}/state/") for p in places), i
    assert raw["checksums"] == checkpoint.checksums(raw)


def test_a_flipped_bit_in_a_tensor_is_refused(saved, tmp_path):
    path, _, _ = saved
    before = torch.load(path, weights_only=True)
    entry = flip_bit_in_tensor_data(path)
    after = torch.load(path, weights_only=True)  # torch itself reads the damage silently
    assert checkpoint.checksums(after) != checkpoint.checksums(before), entry
    # The file, what is wrong with it, and the run's other checkpoints to use instead.
    with pytest.raises(
        SmolGPTError, match=names(str(path), "damaged", "best_model.pth", "latest_model.pth")
    ):
        checkpoint.load(path)
    with pytest.raises(SmolGPTError, match=names(str(path), "damaged")):
        checkpoint.load_model(path, torch.device("cpu"))  # what generate and the API use


def test_checkpoints_without_checksums_still_load_with_a_note(tmp_path, caplog, state):
    ckpt, model = state
    path = tmp_path / "old.pth"
    # As smolgpt 0.3 wrote them: the same dictionary, no checksums.
    torch.save({"format": checkpoint.FORMAT, "format_version": 2, **ckpt}, path)
    with caplog.at_level(logging.INFO, logger="smolgpt.checkpoint"):
        loaded, _, _ = checkpoint.load_model(path, torch.device("cpu"))
    assert str(path) in caplog.text and "checksums" in caplog.text
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
