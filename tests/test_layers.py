"""Imports only go down: each module of smolgpt imports only modules below it in LAYERS
(an AST walk over every import, those inside functions too), so there is no cycle and the
layering cannot decay quietly. docs/architecture.md draws the same layers."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "smolgpt"

# Lowest first: a module may import those before it, never those after.
LAYERS = [
    # files and plain facts
    [
        "version",
        "errors",
        "extras",
        "openmp",
        "files",
        "progress",
        "settings",
        "commandconfig",
        "presets",
        "configfile",
        "config",
        "rundir",
    ],
    # the machine, and the pieces of a model
    [
        "distributed",
        "signals",
        "hardware",
        "wordtext",
        "tokenizer",
        "gpt2tokenizer",
        "model",
        "kernels",
        "quantize",
        "optim",
    ],
    # text to batches, scoring, checkpoints, sampling, other formats, pictures
    [
        "sources",
        "tokendata",
        "tokencache",
        "batches",
        "evaluate",
        "logprobs",
        "checkpoint",
        "sampling",
    ],
    ["export", "hf", "gpt2", "gguf_export", "interop", "plots"],
    # training
    ["runlog", "training", "finetune", "inspection", "runinfo", "runsetup"],
    # the Python API, then what stands on it
    ["api"],
    # the HTTP server: its request schemas, its OpenAPI description, its models and their turns
    ["serve_schema", "serve_openapi", "scheduler"],
    ["server", "flags", "docs", "cli", "__main__", "__init__"],
]
ORDER = [name for layer in LAYERS for name in layer]


def imported(path: Path) -> set[str]:
    """The smolgpt modules a file imports (relative or absolute, at any depth)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or node.module == "smolgpt"):
            if node.module not in (None, "smolgpt"):
                found.add(node.module.split(".")[0])
            else:  # from . import x, from smolgpt import x: a module, or a name of __init__
                found |= {a.name if a.name in ORDER else "__init__" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("smolgpt."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("smolgpt.")}
            if any(a.name == "smolgpt" for a in node.names):
                found.add("__init__")
    return found & set(ORDER)


def test_every_module_has_a_layer():
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    assert modules == set(ORDER), (
        f"add to LAYERS: {modules - set(ORDER)}; gone: {set(ORDER) - modules}"
    )


def test_imports_only_go_down():
    upward = [
        f"{path.stem} imports {name}"
        for path in sorted(PACKAGE.glob("*.py"))
        for name in sorted(imported(path))
        if name != path.stem and ORDER.index(name) > ORDER.index(path.stem)
    ]
    assert not upward, "imports that go up (or sideways into a later module):\n" + "\n".join(upward)
