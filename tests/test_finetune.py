"""Fine-tuning with --init_from: a run that starts from a trained model's weights, tokenizer
and shape, at a smaller default learning rate, on real files with real (tiny) training."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import pytest

import smolgpt
from smolgpt import tokencache, tokendata
from smolgpt.config import FINETUNE_LR_FACTOR, PRESETS, TrainConfig, preset_values
from smolgpt.export import export_safetensors
from smolgpt.hf import export_hf
from smolgpt.sources import Corpus
from smolgpt.tokenizer import WordTokenizer

from e2e import e2e_corpus_text, e2e_metrics, e2e_snapshot, names

# The source models: trained 10 steps, evaluated at 0, 5 and 10.
SOURCE = dict(
    preset="nano",
    n_layer=1,
    n_head=2,
    n_embd=16,
    block_size=16,
    batch_size=4,
    eval_iters=2,
    eval_interval=5,
    log_interval=5,
    early_stop_patience=0,
    max_iters=10,
)
# A fine-tuning run's own settings: the same batches and evaluations as the source's, so
# that its first evaluation measures the source's weights as the source measured them.
RUN = dict(
    batch_size=4, eval_iters=2, eval_interval=5, log_interval=5, early_stop_patience=0, max_iters=5
)


@dataclasses.dataclass
class Source:
    """A finished source run (read-only: tests copy it before changing it)."""

    level: str
    out_dir: Path
    corpus: Path  # the text it was trained on

    @property
    def rows(self) -> list:
        return e2e_metrics(self.out_dir)

    @property
    def best(self) -> Path:
        return self.out_dir / "best_model.pth"

    @property
    def latest(self) -> Path:
        return self.out_dir / "latest_model.pth"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """{'char': Source, 'word': Source}, trained once for the module, in its own cache (the
    per-test cache fixture does not reach module fixtures)."""
    base = tmp_path_factory.mktemp("finetune-sources")
    corpus = base / "a.txt"
    corpus.write_text(e2e_corpus_text(20_000), encoding="utf-8")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMOLGPT_CACHE_DIR", str(base / "cache"))
        for level in ("char", "word"):
            extra = {"min_word_freq": 1} if level == "word" else {}
            smolgpt.train(
                data=str(corpus), level=level, out_dir=str(base / level), **SOURCE, **extra
            )
            out[level] = Source(level, base / level, corpus)
    return out


def finetune(src: Source, out_dir: Path, **settings) -> smolgpt.TrainResult:
    """Fine-tune from src (its latest checkpoint unless init_from is given) on its own text,
    unless data is given."""
    settings = {"init_from": str(src.latest), "data": str(src.corpus), **RUN, **settings}
    return smolgpt.train(out_dir=str(out_dir), **settings)


def saved_config(run_dir: Path) -> dict:
    return smolgpt.load(run_dir / "latest_model.pth").train_config


# ------------------------------------------------------------------ where a run starts


@pytest.mark.parametrize("level", ["char", "word"])
def test_fine_tuning_starts_from_the_checkpoints_weights_shape_and_level(sources, level, tmp_path):
    src = sources[level]
    result = finetune(src, tmp_path / "ft")
    first = e2e_metrics(result.out_dir)[0]
    source_last = src.rows[-1]  # the evaluation of the weights latest_model.pth holds
    assert first["iter"] == 0 and source_last["iter"] == 10
    assert first["val_loss"] == pytest.approx(source_last["val_loss"], abs=1e-6)
    assert first["train_loss"] == pytest.approx(source_last["train_loss"], abs=1e-6)

    cfg = saved_config(result.out_dir)
    assert cfg["init_from"] == str(src.latest)
    assert (cfg["level"], cfg["preset"]) == (level, "nano")  # taken from the source
    assert (cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["block_size"]) == (1, 2, 16, 16)
    model = smolgpt.load(result.best_checkpoint)
    assert model.tokenizer.to_dict() == smolgpt.load(src.latest).tokenizer.to_dict()


def test_a_run_directory_means_its_best_model(sources, tmp_path, caplog):
    src = sources["char"]
    with caplog.at_level(logging.INFO, logger="smolgpt"):
        result = finetune(src, tmp_path / "ft", init_from=str(src.out_dir))
    first = e2e_metrics(result.out_dir)[0]
    assert first["val_loss"] == pytest.approx(min(r["val_loss"] for r in src.rows), abs=1e-6)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("fine-tuning"))
    assert str(src.best) in line  # the start-up line names the source
    assert f"init_from={src.out_dir}" in caplog.text  # and so do the settings


# ------------------------------------------------------------------ the source's tokenizer


def test_new_words_are_unk_in_the_sources_vocabulary(sources, write_text, tmp_path):
    src = sources["word"]
    vocabulary = smolgpt.load(src.latest).tokenizer
    text = src.corpus.read_text(encoding="utf-8").replace("Holmes", "Poirot")
    new = write_text("b.txt", text.replace("river", "canal"))
    result = finetune(src, tmp_path / "ft", data=str(new))
    assert smolgpt.load(result.best_checkpoint).tokenizer.to_dict() == vocabulary.to_dict()

    tokens = tokencache.prepare(Corpus("b", (new,)), "word", tokenizer=vocabulary)  # cached
    assert tokens.given_tokenizer and tokens.tokenizer.to_dict() == vocabulary.to_dict()
    words = WordTokenizer.split(new.read_text(encoding="utf-8").lower())
    assert "poirot" in words and "poirot" not in vocabulary.stoi
    assert list(tokens.train) + list(tokens.val) == [
        vocabulary.stoi.get(w, WordTokenizer.UNK_ID) for w in words
    ]
    assert 0.01 < tokens.unk_rates[0] < 0.2
    # The advice for too much <UNK> is not a --min_word_freq that would not apply.
    assert "--init_from" in tokendata._fewer_unk(1, given_tokenizer=True)


def test_unknown_characters_are_left_out_with_a_warning(sources, write_text, tmp_path, caplog):
    src = sources["char"]
    vocabulary = smolgpt.load(src.latest).tokenizer
    text = src.corpus.read_text(encoding="utf-8")
    strange = text.replace("Holmes", "Hölmes").replace(" house", " house€")
    new = write_text("b.txt", strange)
    with caplog.at_level(logging.INFO, logger="smolgpt"):
        result = finetune(src, tmp_path / "ft", data=str(new))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    count = strange.count("ö") + strange.count("€")
    assert len(warnings) == 1 and f"{count:,}" in warnings[0]  # how many, and which
    assert "'ö'" in warnings[0] and "'€'" in warnings[0]
    assert "0.0%" not in warnings[0]  # a count that is not zero beside a share that is not
    assert smolgpt.load(result.best_checkpoint).tokenizer.to_dict() == vocabulary.to_dict()

    # The rest of the text is encoded as it is; the cache remembers what was dropped.
    tokens = tokencache.prepare(Corpus("b", (new,)), "char", tokenizer=vocabulary)
    kept = strange.replace("ö", "").replace("€", "")
    assert vocabulary.decode(list(tokens.train) + list(tokens.val)) == kept
    assert tokens.dropped == {"ö": strange.count("ö"), "€": strange.count("€")}


def test_a_text_mostly_unknown_to_the_source_is_refused(sources, write_text):
    vocabulary = smolgpt.load(sources["char"].latest).tokenizer
    greek = write_text("greek.txt", "Μῆνιν ἄειδε θεὰ Πηληϊάδεω Ἀχιλῆος\n" * 50)
    with pytest.raises(smolgpt.SmolGPTError, match=names("greek", "characters", "--init_from")):
        tokencache.prepare(Corpus("greek", (greek,)), "char", tokenizer=vocabulary)
    words = smolgpt.load(sources["word"].latest).tokenizer
    other = write_text("other.txt", "zebra quokka wombat, emu. " * 200)
    with pytest.raises(smolgpt.SmolGPTError, match=names("<UNK>", "--init_from")):
        tokencache.prepare(Corpus("other", (other,)), "word", tokenizer=words)


def test_the_token_cache_is_keyed_by_the_given_tokenizer(sources, write_text):
    text = write_text("c.txt", sources["char"].corpus.read_text(encoding="utf-8")[:3000])
    corpus = Corpus("c", (text,))
    learned = tokencache.prepare(corpus, "char")
    vocabulary = smolgpt.load(sources["char"].latest).tokenizer  # knows more characters
    given = tokencache.prepare(corpus, "char", tokenizer=vocabulary)
    assert learned.tokenizer.to_dict() != given.tokenizer.to_dict()
    assert given.tokenizer.to_dict() == vocabulary.to_dict()
    assert learned.tokenizer.decode(learned.train) == vocabulary.decode(given.train)
    assert tokencache.prepare(corpus, "char").tokenizer.to_dict() == learned.tokenizer.to_dict()


# ------------------------------------------------------------------ the learning rate


def test_the_default_learning_rates_are_scaled_down(sources, tmp_path, caplog):
    src = sources["char"]
    recipe = preset_values("nano", "char")
    with caplog.at_level(logging.INFO, logger="smolgpt"):
        result = finetune(src, tmp_path / "ft")
    cfg = saved_config(result.out_dir)
    assert cfg["optimizer"] == "muon"
    assert cfg["learning_rate"] == pytest.approx(recipe["learning_rate"] * FINETUNE_LR_FACTOR)
    assert cfg["muon_lr"] == pytest.approx(TrainConfig.muon_lr * FINETUNE_LR_FACTOR)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("fine-tuning"))
    assert f"learning_rate {cfg['learning_rate']:g}" in line and f"{FINETUNE_LR_FACTOR:g}" in line
    assert f"muon_lr {cfg['muon_lr']:g}" in line


def test_a_learning_rate_given_wins(sources, tmp_path):
    src = sources["char"]
    result = finetune(src, tmp_path / "lr", learning_rate=0.01)
    cfg = saved_config(result.out_dir)
    assert cfg["learning_rate"] == 0.01
    assert cfg["muon_lr"] == pytest.approx(TrainConfig.muon_lr * FINETUNE_LR_FACTOR)
    both = finetune(src, tmp_path / "both", learning_rate=0.01, muon_lr=0.03)
    assert (saved_config(both.out_dir)["muon_lr"]) == 0.03


def test_a_preset_given_sets_the_recipe_but_not_the_shape(sources, tmp_path):
    result = finetune(
        sources["char"], tmp_path / "ft", preset="micro", optimizer="adamw", n_layer=1
    )  # a shape flag equal to the source's is fine
    cfg = saved_config(result.out_dir)
    assert cfg["preset"] == "micro" and PRESETS["micro"]["n_layer"] != 1
    assert (cfg["n_layer"], cfg["n_head"], cfg["n_embd"]) == (1, 2, 16)
    micro = preset_values("micro", "char")["learning_rate"]
    assert cfg["learning_rate"] == pytest.approx(micro * FINETUNE_LR_FACTOR)
    assert cfg["muon_lr"] == TrainConfig.muon_lr  # unused by AdamW, left as it is


def test_a_smaller_block_size_crops_a_rotary_source(sources, tmp_path):
    result = finetune(sources["char"], tmp_path / "ft", block_size=8)
    assert saved_config(result.out_dir)["block_size"] == 8
    assert smolgpt.load(result.out_dir / "latest_model.pth").module.config.block_size == 8


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "settings, needles",
    [  # the flag as typed (and the source's value where that is not a digit or in its path)
        ({"n_layer": 2}, ["--n_layer 2"]),
        ({"n_embd": 32, "n_layer": 2}, ["--n_embd 32", "--n_layer 2"]),
        ({"block_size": 32}, ["--block_size 32", "16 positions"]),  # fewer would be cropped
        ({"position": "learned"}, ["--position learned", "rope"]),
        ({"level": "word"}, ["--level word"]),
        ({"min_word_freq": 1}, ["--min_word_freq"]),
        ({"bias": False}, ["--no-bias"]),
        ({"min_lr": 0.01}, ["--min_lr 0.01", "0.002", "--learning_rate"]),  # and the way out
    ],
)
def test_settings_that_contradict_the_source_are_refused(sources, tmp_path, settings, needles):
    out_dir = tmp_path / "ft"
    with pytest.raises(smolgpt.SmolGPTError, match=names("--init_from", *needles)) as caught:
        finetune(sources["char"], out_dir, **settings)
    assert "\n" not in str(caught.value)
    assert not out_dir.exists()


@pytest.mark.slow
def test_the_command_line_refuses_a_bad_source_in_one_line(smol_cli, cli_main, sources, tmp_path):
    src = sources["char"]
    before = e2e_snapshot(src.out_dir)
    not_a_model = tmp_path / "notes.pth"
    not_a_model.write_text("not a model\n", encoding="utf-8")
    cases = {
        "not a model": (
            ["--init_from", not_a_model],
            ("--init_from", "notes.pth", "smolgpt checkpoint"),
        ),
        "level": (["--init_from", src.latest, "--level", "word"], ("--level word",)),
        "shape": (["--init_from", src.out_dir, "--n_head", "4"], ("--n_head 4",)),
    }
    for name, (args, needles) in cases.items():
        result = cli_main(
            ["train", "--data", src.corpus, "--out_dir", tmp_path / name, "--max_iters", "5", *args]
        )
        smol_cli.assert_one_line_error(result, *needles)
        assert not (tmp_path / name).exists(), name
    # One as a real process, as a user runs it.
    result = smol_cli.run(
        "train",
        "--data",
        src.corpus,
        "--out_dir",
        tmp_path / "missing",
        "--init_from",
        tmp_path / "missing.pth",
    )
    smol_cli.assert_one_line_error(result, "--init_from", "missing.pth", "not exist")
    assert not (tmp_path / "missing").exists()
    assert e2e_snapshot(src.out_dir) == before  # the source is untouched


# ------------------------------------------------------------------ resume


def test_a_fine_tuned_run_resumes_without_its_source(sources, write_text, tmp_path, caplog):
    src = sources["char"]
    source_copy = tmp_path / "source"
    shutil.copytree(src.out_dir, source_copy, ignore=shutil.ignore_patterns(".lock"))
    # Unknown characters: a vocabulary learned from this text would differ from the run's.
    new = write_text("b.txt", src.corpus.read_text(encoding="utf-8").replace("o", "ø"))
    run = dict(init_from=str(source_copy), data=str(new), out_dir=str(tmp_path / "ft"), **RUN)
    smolgpt.train(**run)
    shutil.rmtree(source_copy)  # a resumed run continues from its own checkpoint
    with caplog.at_level(logging.INFO, logger="smolgpt"):
        resumed = smolgpt.train(**{**run, "max_iters": 10, "resume": True})
    assert resumed.iterations == 10
    assert [r["iter"] for r in e2e_metrics(resumed.out_dir)] == [0, 5, 10]
    cfg = saved_config(resumed.out_dir)
    assert cfg["init_from"] == str(source_copy) and cfg["max_iters"] == 10
    assert cfg["learning_rate"] == pytest.approx(0.02 * FINETUNE_LR_FACTOR)  # as it started
    assert "fine-tuning" not in caplog.text

    # Another --init_from on resume is not used (the run keeps the record of its start).
    again = smolgpt.train(**{**run, "init_from": str(src.latest), "max_iters": 15, "resume": True})
    assert again.iterations == 15
    assert saved_config(again.out_dir)["init_from"] == str(source_copy)


def test_a_fine_tuning_runs_default_directory_is_named_after_its_source():
    assert (
        TrainConfig(init_from="runs/x/best_model.pth").default_out_dir == "checkpoints/x_finetune"
    )
    assert TrainConfig(init_from="runs/x/").default_out_dir == "checkpoints/x_finetune"
    assert TrainConfig(init_from="model.pth").default_out_dir == "checkpoints/model_finetune"
    assert TrainConfig(level="char", preset="nano").default_out_dir == "checkpoints/char_nano"


# ------------------------------------------------------------------ exported models


@pytest.mark.parametrize("export", [export_safetensors, export_hf], ids=lambda f: f.__name__)
def test_fine_tuning_from_an_export(sources, tmp_path, export):
    src = sources["char"]
    model = smolgpt.load(src.latest)
    exported = tmp_path / "exported"
    export(model.module, model.tokenizer, exported, train_config=model.train_config)
    result = finetune(src, tmp_path / "ft", init_from=str(exported))
    first = e2e_metrics(result.out_dir)[0]
    assert first["val_loss"] == pytest.approx(src.rows[-1]["val_loss"], abs=1e-5)
    cfg = saved_config(result.out_dir)
    assert (cfg["n_layer"], cfg["n_embd"], cfg["level"]) == (1, 16, "char")
    assert smolgpt.load(result.best_checkpoint).tokenizer.to_dict() == model.tokenizer.to_dict()
