"""Shared fixtures for the smolgpt tests (the helpers they build on are in e2e.py).

Every test runs with its own token/corpus cache (``SMOLGPT_CACHE_DIR``) and with the
Gutenberg mirror pointed at a closed local port, so no test reads or writes the user's real
cache or reaches the internet. Tests that want a real corpus use :func:`shared_data`, which
skips when the reference corpora beside the project (``../shared/data``) are absent.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Optional

import pytest
import torch

from smolgpt import cli, hardware, sources, tokencache
from smolgpt.config import ModelConfig, resolve_train_config
from smolgpt.model import GPT
from smolgpt.training import Trainer

from e2e import (
    LOSS_TOLERANCE,
    PROXY_VARS,
    CpuPrecision,
    E2EResult,
    E2ERun,
    LocalServer,
    SmolCLI,
    e2e_corpus_text,
    kill_live_processes,
    unused_port,
)

# The test models are tiny: extra intra-op threads only add synchronisation, and on a busy
# 2-core machine they make every small op wait for a core (a 100x slowdown was measured).
torch.set_num_threads(1)

# ../shared/data beside the repository: reference corpora that may be absent for users.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# A shell without job control starts background commands with SIGINT ignored, and every
# process the tests start would inherit that: the tests that press Ctrl-C need it delivered.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_configure(config):
    """A file or a test named on the command line runs whether it is slow or not: the default
    selection (-m "not slow", the fast tier) is for runs of the whole suite or a folder."""
    named = any(arg.endswith(".py") or "::" in arg for arg in config.args)
    marker_given = any(arg == "-m" or arg.startswith("-m") for arg in config.invocation_params.args)
    if named and not marker_given:
        config.option.markexpr = ""


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch) -> Path:
    """A fresh SMOLGPT_CACHE_DIR for every test; no network for Gutenberg downloads."""
    cache = tmp_path_factory.mktemp("smolgpt-cache")
    monkeypatch.setenv("SMOLGPT_CACHE_DIR", str(cache))
    # A closed local port: a test that forgets to set a mirror fails fast, offline.
    monkeypatch.setenv("SMOLGPT_GUTENBERG_MIRROR", f"http://127.0.0.1:{unused_port()}")
    # Requests to the local test server must not go through a proxy.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return cache


@pytest.fixture(autouse=True)
def _reap_processes():
    """A test that fails half-way leaves no training process of its own running."""
    yield
    kill_live_processes()


# ------------------------------------------------------------ the precision policies


@pytest.fixture(params=["float32", "bfloat16"])
def cpu_precision(request, monkeypatch) -> CpuPrecision:
    """Runs the test once under each CPU precision policy, whatever this CPU is, so that an
    assumption true of one kind of CPU only fails on every machine (SMOLGPT_CPU_BF16 forces
    the policy in this process and in the processes it starts). bf16 on a CPU without it is
    emulated and slow: use it at toy sizes."""
    monkeypatch.setenv(hardware.CPU_BF16_ENV, "1" if request.param == "bfloat16" else "0")
    return CpuPrecision(request.param, LOSS_TOLERANCE[request.param])


@pytest.fixture
def closed_url() -> str:
    """http://127.0.0.1:PORT where nothing listens: a server that is down."""
    return f"http://127.0.0.1:{unused_port()}"


@pytest.fixture
def shared_data() -> Path:
    """The reference corpora folder; skips the test when it (or sherlock.txt) is absent."""
    if not (SHARED_DATA / "sherlock.txt").is_file():
        pytest.skip(f"reference corpora not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def sherlock_text(shared_data) -> str:
    return (shared_data / "sherlock.txt").read_text(encoding="utf-8")


@pytest.fixture
def http_server():
    """A running :class:`e2e.LocalServer`; add content with ``server.routes[path] = bytes``."""
    server = LocalServer()
    yield server
    server.stop()


@pytest.fixture(params=["rope", "learned"])
def tiny_config(request) -> ModelConfig:
    """A model shape small enough that a forward pass costs well under a millisecond; every
    test that uses it runs once with rotary and once with learned positions."""
    return ModelConfig(
        vocab_size=23,
        block_size=16,
        n_layer=2,
        n_head=2,
        n_embd=16,
        dropout=0.0,
        position=request.param,
    )


@pytest.fixture
def tiny_model(tiny_config) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config).eval()


@pytest.fixture
def write_text(tmp_path):
    """write_text(name, text) -> Path: a UTF-8 file under tmp_path (parents created)."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
        return path

    return write


@pytest.fixture
def make_trainer(tmp_path_factory):
    """make_trainer(level="char", **settings) -> Trainer: a real Trainer (nano's recipe, on
    the CPU) of a tiny model (1 layer, 16 wide, 2 heads, context 16, batches of 4) on a small
    generated text. Its state() is exactly what training writes to a checkpoint, so tests
    build checkpoints from it rather than by hand. Its files are outside the test's tmp_path."""
    base = tmp_path_factory.mktemp("trainer")
    text = base / "corpus.txt"
    text.write_text(e2e_corpus_text(8_000), encoding="utf-8")

    def make(level: str = "char", **settings) -> Trainer:
        tokens = tokencache.prepare(sources.Corpus("tiny", (text,)), level, min_word_freq=1)
        cfg = resolve_train_config(
            {
                "preset": "nano",
                "level": level,
                "n_layer": 1,
                "n_embd": 16,
                "n_head": 2,
                "block_size": 16,
                "batch_size": 4,
                **settings,
            }
        )
        return Trainer(cfg, tokens, base / "run", torch.device("cpu"))

    return make


@pytest.fixture
def cli_main(monkeypatch, capsys):
    """cli_main(argv, cwd=None) -> E2EResult: smolgpt.cli.main(argv) run in this process,
    with stdout and stderr captured (the log handler main() installs writes to sys.stderr
    as it is when a line is logged, so capsys sees it too).

    The environment is the one SmolCLI gives its subprocesses: no proxies, and no SMOLGPT_
    setting but this test's private cache and closed mirror (and a forced precision policy).
    The 'smolgpt' logger, which main() configures, is put back as it was afterwards, so later
    tests see no handler."""
    for name in list(os.environ):
        if name.lower() in PROXY_VARS or (
            name.startswith("SMOLGPT_")
            and name not in ("SMOLGPT_CACHE_DIR", "SMOLGPT_GUTENBERG_MIRROR", "SMOLGPT_CPU_BF16")
        ):
            monkeypatch.delenv(name)
    logger = logging.getLogger("smolgpt")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate

    def run(argv: list, cwd: Optional[Path] = None) -> E2EResult:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        argv = [str(a) for a in argv]
        capsys.readouterr()
        start = time.perf_counter()
        try:
            status = cli.main(argv)
        except SystemExit as exc:  # argparse ends a usage mistake with sys.exit(2)
            status = exc.code
        out, err = capsys.readouterr()
        return E2EResult(["smolgpt", *argv], status, out, err, time.perf_counter() - start)

    yield run
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


# --------------------------------------------------------------- end-to-end (e2e.py)


@pytest.fixture(scope="session")
def smol_cli(tmp_path_factory) -> SmolCLI:
    """A :class:`e2e.SmolCLI` with its own cache and an ~80 KB generated corpus."""
    base = tmp_path_factory.mktemp("e2e")
    corpus = base / "data" / "corpus.txt"
    corpus.parent.mkdir()
    corpus.write_text(e2e_corpus_text(), encoding="utf-8")
    return SmolCLI(base, corpus)


@pytest.fixture(scope="session")
def smol_runs(smol_cli, tmp_path_factory) -> dict:
    """{'char': E2ERun, 'word': E2ERun}: tiny models trained 20 steps (evaluations at 0, 10
    and 20), both levels at once. Read-only: copy one (E2ERun.copy) to change it."""
    base = tmp_path_factory.mktemp("e2e-runs")
    args = {
        level: smol_cli.train_args(level, base / level, "--max_iters", "20")
        for level in ("char", "word")
    }
    results = smol_cli.run_many([("train", args[level]) for level in ("char", "word")])
    runs = {}
    for level, result in zip(("char", "word"), results):
        assert result.returncode == 0, result.describe()
        runs[level] = E2ERun(level, base / level, args[level], result)
    return runs
