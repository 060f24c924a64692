"""The presets (``--preset``): plain data, :data:`PRESETS`, and :func:`preset_values`, the
fields a preset sets at a tokenizer level. ``config.py`` layers them between the dataclass
defaults and the settings a user gives.
"""

from __future__ import annotations

from typing import Any

from .settings import LEVELS, check_choice

# The preset entries that apply on a CPU without native bf16, which trains in float32.
CPU_FLOAT32 = "cpu_float32"


# Presets: the original smolgpt's model sizes, plus a training recipe for each size and level
# (see benchmarks/RESULTS.md for the experiments behind them). Entries under a level
# apply at that level only; anything not named keeps the TrainConfig default.
#
# Why the recipes differ from the original (AdamW, constant lr 3e-4, dropout 0.1 everywhere):
# on a 2-core CPU (benchmarks/RESULTS.md), nano and micro learn several times faster with
# Muon for the blocks' matrices and a high AdamW rate (1e-2 to 5e-2) for the embeddings,
# warmed up and decayed. Character models of these sizes barely overfit in the time they
# train, so they go without dropout (which costs a quarter of a CPU step); char micro uses
# batches of 16 so that a short run still makes enough steps. Word models overfit within a
# few epochs: they keep dropout (more for the larger micro) and stop early once validation
# stops improving. tiny and small are GPU-sized and were not measured here; they keep AdamW
# at conventional rates.
#
# On a CPU without native bf16 (most laptops), Muon's iteration runs in float32 and costs a
# larger share of a step, while every step is slower: micro orthogonalises with three
# Newton-Schulz iterations instead of five there, and at word level it makes more, smaller
# steps (batches of 16) with less dropout (the fewer steps overfit less).

# micro's recipe at each level, and on float32 CPUs (speedrun shares it).
_MICRO_RECIPES: dict[str, Any] = {
    "char": {"batch_size": 16, "learning_rate": 5e-2, "dropout": 0.0},
    "word": {"learning_rate": 1e-2, "dropout": 0.3, "early_stop_patience": 4},
    "bpe": {"vocab_size": 1024, "batch_size": 16, "learning_rate": 5e-2, "dropout": 0.0},
    CPU_FLOAT32: {
        "char": {"muon_ns_steps": 3},
        "bpe": {"muon_ns_steps": 3},
        "word": {"batch_size": 16, "dropout": 0.2, "muon_ns_steps": 3},
    },
}
PRESETS: dict[str, dict[str, Any]] = {
    "nano": {
        "n_layer": 3,
        "n_head": 3,
        "n_embd": 48,
        "optimizer": "muon",
        "char": {"learning_rate": 2e-2, "dropout": 0.0},
        "word": {"learning_rate": 1e-2, "dropout": 0.2, "early_stop_patience": 4},
        "bpe": {"vocab_size": 4096, "learning_rate": 2e-2, "dropout": 0.0},
    },
    "micro": {"n_layer": 4, "n_head": 4, "n_embd": 128, "optimizer": "muon", **_MICRO_RECIPES},
    # Aimed at nanoGPT's best char-level result on tiny Shakespeare (val 1.4697, 6x384 on an
    # A100) in ten minutes of a 2-core CPU (issue #17; each choice is measured in
    # benchmarks/RESULTS.md): micro made wider rather than deeper (width keeps a CPU's matrix
    # products efficient; depth adds small operations), its learning rate decayed linearly to
    # zero, within a 600 s budget (for shorter budgets micro does better). Word and bpe
    # levels take micro's recipes at this shape.
    "speedrun": {
        "n_layer": 4,
        "n_head": 6,
        "n_embd": 192,
        "optimizer": "muon",
        "time_budget": 600.0,
        "min_lr": 0.0,
        "lr_schedule": "linear",
        **_MICRO_RECIPES,
    },
    "tiny": {
        "n_layer": 6,
        "n_head": 6,
        "n_embd": 384,
        "char": {"batch_size": 64, "learning_rate": 1e-3, "dropout": 0.2},
        "word": {"learning_rate": 5e-4, "dropout": 0.3, "early_stop_patience": 4},
        "bpe": {"vocab_size": 2048, "learning_rate": 1e-3, "dropout": 0.2},
    },
    "small": {
        "n_layer": 12,
        "n_head": 12,
        "n_embd": 768,
        "batch_size": 16,
        "char": {"learning_rate": 6e-4, "dropout": 0.2},
        "word": {"learning_rate": 3e-4, "dropout": 0.3, "early_stop_patience": 4},
        "bpe": {"vocab_size": 8192, "learning_rate": 6e-4, "dropout": 0.2},
    },
}


def preset_values(preset: str, level: str, cpu_float32: bool = False) -> dict[str, Any]:
    """The fields a preset sets at a level: its common entries, then the level's own, then
    (on a CPU that computes in float32, see ``hardware.PrecisionPolicy``) the level's
    ``cpu_float32`` entries."""
    check_choice("preset", preset, tuple(PRESETS))
    check_choice("level", level, LEVELS)
    entry = PRESETS[preset]
    values = {k: v for k, v in entry.items() if k not in (*LEVELS, CPU_FLOAT32)}
    values.update(entry.get(level, {}))
    if cpu_float32:
        values.update(entry.get(CPU_FLOAT32, {}).get(level, {}))
    return values
