"""Settings: presets and their layering, validation, resuming, sampling options."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from smolgpt.config import (
    CPU_FLOAT32,
    DEVICES,
    LEVELS,
    PRESETS,
    RESUME_FIXED,
    GenerateConfig,
    ModelConfig,
    ModelShape,
    SampleConfig,
    TrainConfig,
    preset_default,
    preset_values,
    resolve_train_config,
    resume_train_config,
)
from smolgpt.errors import SmolGPTError
from smolgpt.runsetup import describe_settings
from smolgpt.serve_schema import check
from smolgpt.settings import JSON_TYPES, json_schema

from e2e import names


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("level", ["char", "word"])
def test_preset_values_are_applied(preset, level):
    cfg = resolve_train_config({"preset": preset, "level": level})
    for name, value in preset_values(preset, level).items():
        assert getattr(cfg, name) == value, name
    assert (cfg.preset, cfg.level) == (preset, level)


def test_explicit_flag_wins_over_preset():
    cfg = resolve_train_config({"preset": "small", "n_layer": 2, "batch_size": 4})
    assert cfg.n_layer == 2 and cfg.batch_size == 4
    assert (cfg.n_head, cfg.n_embd) == (12, 768)  # the rest of the preset still applies


def test_preset_changes_only_what_it_names():
    defaults = TrainConfig()
    cfg = resolve_train_config({"preset": "nano", "level": "word"})
    named = set(preset_values("nano", "word")) | {"preset", "level"}
    for field in dataclasses.fields(TrainConfig):
        if field.name not in named:
            assert getattr(cfg, field.name) == getattr(defaults, field.name), field.name


def test_per_level_preset_entries():
    # 'tiny' sets batch_size 64 at char level only.
    assert preset_values("tiny", "char")["batch_size"] == 64
    assert "batch_size" not in preset_values("tiny", "word")
    assert "char" not in preset_values("tiny", "char")  # level keys are not fields
    assert resolve_train_config({"preset": "tiny", "level": "char"}).batch_size == 64
    assert (
        resolve_train_config({"preset": "tiny", "level": "word"}).batch_size
        == TrainConfig().batch_size
    )
    # an explicit flag still beats the per-level entry
    assert (
        resolve_train_config({"preset": "tiny", "level": "char", "batch_size": 8}).batch_size == 8
    )


def test_unknown_preset_level_or_setting():
    # The value refused, and the ones to choose from.
    with pytest.raises(SmolGPTError, match=names("preset", "'huge'", *PRESETS)):
        resolve_train_config({"preset": "huge"})
    with pytest.raises(SmolGPTError, match=names("level", "'byte'", *LEVELS)):
        resolve_train_config({"level": "byte"})
    with pytest.raises(SmolGPTError, match="n_lyer"):
        resolve_train_config({"n_lyer": 3})


def test_n_embd_must_be_divisible_by_n_head():
    with pytest.raises(SmolGPTError, match=names("n_embd", "50", "n_head")):
        resolve_train_config({"preset": "nano", "n_embd": 50})
    with pytest.raises(SmolGPTError, match=names("n_embd", "10", "n_head", "3")):
        ModelConfig(vocab_size=10, n_embd=10, n_head=3)


@pytest.mark.parametrize("position", ["rope", "learned"])
@pytest.mark.parametrize("n_embd, n_head", [(100, 3), (10, 3), (50, 4), (36, 5), (7, 2), (1, 6)])
def test_a_suggested_width_passes_every_check(n_embd, n_head, position):
    """What an error suggests for --n_embd is accepted when followed (--n_embd 100 --n_head 3
    once suggested 99, whose head size of 33 rotary positions then refused)."""
    with pytest.raises(SmolGPTError, match="--n_embd") as err:
        ModelConfig(vocab_size=10, n_embd=n_embd, n_head=n_head, position=position)
    suggested = int(re.search(r"--n_embd (\d+)", str(err.value)).group(1))
    ModelConfig(vocab_size=10, n_embd=suggested, n_head=n_head, position=position)
    assert abs(suggested - n_embd) <= n_head * (2 if position == "rope" else 1)


@pytest.mark.parametrize(
    "name, value",
    [
        ("max_iters", 0),
        ("max_iters", -5),
        ("batch_size", 0),
        ("block_size", 0),
        ("block_size", -1),
        ("n_layer", 0),
        ("eval_interval", 0),
        ("eval_iters", 0),
        ("gradient_accumulation_steps", 0),
        ("min_word_freq", 0),
        ("learning_rate", 0.0),
        ("learning_rate", -1e-3),
        ("learning_rate", math.nan),
        ("learning_rate", math.inf),
        ("warmup_iters", -1),
        ("time_budget", 0.0),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("grad_clip", -1.0),
        ("min_lr", 1.0),
    ],
)
def test_invalid_values_raise(name, value):
    with pytest.raises(SmolGPTError, match=name):
        resolve_train_config({"preset": "nano", name: value})


def test_valid_edge_values_are_accepted():
    cfg = resolve_train_config(
        {
            "preset": "nano",
            "warmup_iters": 0,
            "dropout": 0.0,
            "grad_clip": 0.0,
            "min_lr": 0.0,
            "max_iters": 1,
        }
    )
    assert cfg.final_lr == 0.0
    assert resolve_train_config({"learning_rate": 1e-3}).final_lr == pytest.approx(1e-4)


def test_model_config_rejects_non_positive_shapes():
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        kwargs = {"vocab_size": 10, name: 0}
        with pytest.raises(SmolGPTError, match=name):
            ModelConfig(**kwargs)


def test_model_config_from_train_config():
    cfg = resolve_train_config({"preset": "nano", "block_size": 32, "dropout": 0.0, "bias": False})
    model = cfg.model_config(vocab_size=77)
    assert model == ModelConfig(
        vocab_size=77, block_size=32, n_layer=3, n_head=3, n_embd=48, dropout=0.0, bias=False
    )


# --------------------------------------------------------------------------- resume


def saved_config(**changes) -> dict:
    cfg = resolve_train_config(
        {"preset": "nano", "level": "char", "max_iters": 100, "optimizer": "muon", **changes}
    )
    return dataclasses.asdict(cfg)


@pytest.mark.parametrize(
    "flag, value",
    [
        ("n_layer", 5),
        ("n_embd", 96),
        ("block_size", 64),
        ("level", "word"),
        ("preset", "micro"),
        ("batch_size", 7),
        ("seed", 1),
        ("min_word_freq", 1),
        ("position", "learned"),
        ("optimizer", "adamw"),
    ],
)
def test_resume_refuses_conflicting_flags(flag, value):
    with pytest.raises(SmolGPTError, match=names("--resume", f"--{flag}", str(value))):
        resume_train_config(saved_config(), {flag: value})


def test_resume_accepts_fixed_flags_equal_to_the_checkpoint():
    saved = saved_config()
    same = {k: saved[k] for k in RESUME_FIXED}
    cfg, changed = resume_train_config(saved, same)
    assert changed == {}
    assert dataclasses.asdict(cfg) == saved


def test_resume_applies_and_reports_harmless_flags():
    cfg, changed = resume_train_config(
        saved_config(), {"max_iters": 300, "eval_interval": 50, "resume": True, "out_dir": "x"}
    )
    assert cfg.max_iters == 300 and cfg.eval_interval == 50 and cfg.resume
    assert changed == {"max_iters": (100, 300), "eval_interval": (None, 50)}
    assert (cfg.n_layer, cfg.n_embd, cfg.level) == (3, 48, "char")  # saved shape kept


def test_resume_validates_applied_flags():
    with pytest.raises(SmolGPTError, match="max_iters"):
        resume_train_config(saved_config(), {"max_iters": 0})


def test_resume_of_a_run_saved_before_rotary_and_muon_keeps_what_it_used():
    saved = saved_config()
    del saved["position"], saved["optimizer"], saved["muon_lr"]
    cfg, changed = resume_train_config(saved, {})
    assert (cfg.position, cfg.optimizer) == ("learned", "adamw")
    assert changed == {}


def test_resume_ignores_unknown_saved_keys():
    saved = saved_config()
    saved["some_future_setting"] = 1
    cfg, _ = resume_train_config(saved, {})
    assert cfg.n_embd == 48


# --------------------------------------------------------------------------- sampling


def test_sample_config_accepts_greedy_and_edges():
    SampleConfig(temperature=0.0)
    SampleConfig(top_k=0, top_p=1.0, max_new_tokens=0)
    SampleConfig(top_p=1e-6)


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"num_samples": 0}, "num_samples"),
    ],
)
def test_sample_config_rejects_bad_values(kwargs, flag):
    with pytest.raises(SmolGPTError, match=f"--{flag}"):
        SampleConfig(**kwargs)


# ------------------------------------------------------------------ per-level recipes


@pytest.mark.parametrize("cpu_float32", [False, True])
def test_speedrun_is_the_measured_flags_over_micro(cpu_float32):
    """benchmarks/RESULTS.md measured the speedrun recipe as flags over --preset micro: the
    preset must stay exactly that (plus its 600 s budget), on either kind of CPU."""
    flags = {"level": "char", "n_embd": 192, "n_head": 6, "min_lr": 0.0, "lr_schedule": "linear"}
    measured = resolve_train_config({"preset": "micro", **flags}, cpu_float32)
    speedrun = resolve_train_config({"preset": "speedrun", "level": "char"}, cpu_float32)
    assert dataclasses.asdict(speedrun) == {
        **dataclasses.asdict(measured),
        "preset": "speedrun",
        "time_budget": 600.0,
    }
    shorter = resolve_train_config({"preset": "speedrun", "level": "char", "time_budget": 60})
    assert shorter.time_budget == 60


def test_word_presets_stop_early_and_char_presets_do_not():
    for preset in PRESETS:
        assert resolve_train_config({"preset": preset, "level": "word"}).early_stop_patience > 0
        assert resolve_train_config({"preset": preset, "level": "char"}).early_stop_patience == 0


def test_the_original_recipe_is_still_reachable_by_flags():
    cfg = resolve_train_config(
        {
            "preset": "micro",
            "level": "char",
            "optimizer": "adamw",
            "position": "learned",
            "learning_rate": 3e-4,
            "lr_schedule": "constant",
            "dropout": 0.1,
            "batch_size": 32,
            "eval_iters": 100,
        }
    )
    assert (cfg.optimizer, cfg.position, cfg.learning_rate, cfg.batch_size) == (
        "adamw",
        "learned",
        3e-4,
        32,
    )


def test_presets_choose_their_recipe_by_the_cpu_kind():
    """On a CPU without native bf16 (float32), a preset's cpu_float32 entries for the level
    apply on top of its recipe, and nothing else changes; explicit settings still win."""
    assert any(CPU_FLOAT32 in entry for entry in PRESETS.values())  # something to check
    for preset, entry in PRESETS.items():
        for level in LEVELS:
            bf16 = resolve_train_config({"preset": preset, "level": level})
            fp32 = resolve_train_config({"preset": preset, "level": level}, cpu_float32=True)
            overrides = entry.get(CPU_FLOAT32, {}).get(level, {})
            assert dataclasses.asdict(fp32) == {**dataclasses.asdict(bf16), **overrides}
    mine = resolve_train_config(
        {"preset": "micro", "level": "word", "batch_size": 32, "muon_ns_steps": 5}, cpu_float32=True
    )
    assert (mine.batch_size, mine.muon_ns_steps) == (32, 5)


def test_muon_ns_steps_must_be_positive():
    with pytest.raises(SmolGPTError, match="--muon_ns_steps"):
        resolve_train_config({"preset": "micro", "level": "char", "muon_ns_steps": 0})


# --------------------------------------------------------------------------- one definition


def test_every_config_checks_itself_however_it_is_made():
    # The API builds configs from keyword arguments, the command line from flags, a resume
    # from a checkpoint's dict: all go through __post_init__.
    with pytest.raises(SmolGPTError, match="learning_rate"):
        TrainConfig(learning_rate=-1.0)
    with pytest.raises(SmolGPTError, match=names("n_embd", "n_head", "5")):
        dataclasses.replace(TrainConfig(), n_head=5)
    with pytest.raises(SmolGPTError, match="top_p"):
        SampleConfig(top_p=0.0)
    with pytest.raises(SmolGPTError, match=names("device", "'tpu'", *DEVICES)):
        GenerateConfig(device="tpu")
    with pytest.raises(SmolGPTError, match="vocab_size"):
        ModelConfig(vocab_size=0)


def test_json_schema_states_what_a_field_allows():
    def schema(cls, name):
        found = json_schema({f.name: f for f in dataclasses.fields(cls)}[name])
        return {k: v for k, v in found.items() if k != "description"}

    assert schema(SampleConfig, "top_p") == {
        "type": "number",
        "minimum": 0,
        "exclusiveMinimum": True,
        "maximum": 1,
        "default": 1.0,
    }
    assert schema(ModelShape, "dropout") == {
        "type": "number",
        "minimum": 0,
        "maximum": 1,
        "exclusiveMaximum": True,
        "default": 0.1,
    }
    assert schema(SampleConfig, "num_samples") == {"type": "integer", "minimum": 1, "default": 1}
    assert schema(SampleConfig, "repetition_penalty")["exclusiveMinimum"] is True
    assert schema(TrainConfig, "max_iters") == {
        "type": "integer",
        "nullable": True,
        "minimum": 1,
        "default": None,
    }
    assert schema(GenerateConfig, "device") == {
        "type": "string",
        "enum": list(DEVICES),
        "default": "auto",
    }
    with pytest.raises(TypeError, match="stop"):
        json_schema({f.name: f for f in dataclasses.fields(SampleConfig)}["stop"])


def test_every_default_is_in_its_json_schema():
    import smolgpt.commandconfig
    import smolgpt.config

    modules = (smolgpt.config, smolgpt.commandconfig)
    classes = {c for m in modules for c in vars(m).values() if dataclasses.is_dataclass(c)}
    settings = [f for cls in classes for f in dataclasses.fields(cls) if "help" in f.metadata]
    for f in settings:
        scalar = str(f.type).removeprefix("Optional[").rstrip("]") in JSON_TYPES
        if scalar and f.default is not dataclasses.MISSING:
            check(f.default, json_schema(f), f.name)
    assert len(settings) > 100  # the settings of every command, not of some


def test_model_and_training_share_one_shape_definition():
    shape = {f.name for f in dataclasses.fields(ModelShape)}
    assert shape <= {f.name for f in dataclasses.fields(TrainConfig)}
    assert {f.name for f in dataclasses.fields(ModelConfig)} == shape | {"vocab_size"}
    cfg = resolve_train_config({"preset": "micro", "level": "word"})
    assert cfg.model_config(vocab_size=99) == ModelConfig(vocab_size=99, **cfg.shape())


@pytest.mark.parametrize(
    "name",
    [
        "n_layer",
        "batch_size",
        "learning_rate",
        "dropout",
        "muon_ns_steps",
        "optimizer",
        "lr_schedule",
    ],
)
def test_help_shows_each_presets_real_default(name):
    # "--n_layer (default: from --preset: nano 3; micro 4; ...)": every number shown is the
    # one the preset resolves to, at each level, on either kind of CPU.
    text = preset_default(name)
    assert text.startswith("from --preset: ")
    shown = {}  # preset -> its value text ("nano 3"; "nano, tiny 5" where they leave it be)
    for part in text.removeprefix("from --preset: ").split("; "):
        names, value = re.fullmatch(r"((?:\w+, )*\w+) (.+)", part).groups()
        shown.update((preset, value) for preset in names.split(", "))
    assert sorted(shown) == sorted(PRESETS)
    for preset, part in shown.items():
        for level in ("char", "word"):
            for cpu_float32 in (False, True):
                value = getattr(
                    resolve_train_config({"preset": preset, "level": level}, cpu_float32), name
                )
                assert str(value) in part, (preset, level, cpu_float32, part)
    assert preset_default("block_size") is None  # no preset sets it: the plain default


def test_the_settings_line_leaves_out_what_means_nothing_at_the_level():
    described = {
        level: describe_settings(resolve_train_config({"preset": "nano", "level": level}))
        for level in ("char", "word", "bpe")
    }
    assert "min_word_freq=3" in described["word"]
    assert "min_word_freq" not in described["char"] + described["bpe"]
    assert "vocab_size=" in described["bpe"] and "vocab_size" not in described["char"]
