"""Helpers for the tests that run smolgpt as a user does: its real command lines (train.py,
generate.py, python -m smolgpt) in subprocesses, offline, with a private cache, on a
generated English-like corpus and a model small enough to train in a second; a real HTTP
server on 127.0.0.1; and a way to damage a checkpoint's bytes.

A plain module, imported by tests as ``from e2e import ...`` (pytest puts tests/ on sys.path);
the fixtures that build on it (``smol_cli``, ``smol_runs``, ``http_server``) are in conftest.py.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from smolgpt import hardware

E2E_ROOT = Path(__file__).resolve().parents[1]  # the repository: train.py, generate.py

# A model that trains 60 steps in well under a second on one CPU core. Early stopping is
# off whatever the preset's recipe says, so a run's length is exactly --max_iters.
E2E_TINY = (
    "--preset nano --n_layer 1 --n_embd 32 --n_head 2 --block_size 32 --batch_size 8 "
    "--eval_iters 4 --eval_interval 10 --log_interval 10 --early_stop_patience 0 "
    "--no-plot"  # loss.png has tests of its own; here it would only cost time
).split()


def without_package(package: str) -> str:
    """Python code to start a `python -c` program with: the rest runs as if package were not
    installed (every import of it fails as a missing module does)."""
    return f"""
import sys

class Hidden:
    def find_spec(self, name, path=None, target=None):
        if name == {package!r} or name.startswith({package + "."!r}):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Hidden())
"""


def smolgpt_without(package: str, *args, settings: dict = None) -> subprocess.CompletedProcess:
    """Run `smolgpt ARGS` (plus settings as flags: {"max_iters": 4, "plot": False} gives
    --max_iters 4 --no-plot) in a process where package is not installed."""
    for key, value in (settings or {}).items():
        if isinstance(value, bool):
            args += (f"--{key}" if value else f"--no-{key}",)
        else:
            args += (f"--{key}", value)
    program = (
        without_package(package) + "from smolgpt.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", program, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=E2E_ROOT,
        timeout=180,
    )


PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "ftp_proxy")


def unused_port() -> int:
    """A local TCP port nothing listens on (bound, read, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def e2e_corpus_text(target_chars: int = 80_000, seed: int = 2024) -> str:
    """Deterministic English-like prose: sentences from templates and a small word list,
    with capitals, punctuation, quotes, apostrophes, wrapped lines and paragraphs."""
    rng = random.Random(seed)
    names = ["Holmes", "Watson", "Mary", "Lestrade", "Irene", "Hudson", "Moriarty", "Toby"]
    adjs = [
        "old",
        "quiet",
        "bright",
        "dark",
        "narrow",
        "cold",
        "strange",
        "little",
        "grey",
        "heavy",
        "curious",
        "silent",
        "broken",
        "yellow",
        "long",
    ]
    nouns = [
        "house",
        "river",
        "letter",
        "window",
        "door",
        "garden",
        "road",
        "lamp",
        "key",
        "stone",
        "city",
        "train",
        "clock",
        "hat",
        "stair",
        "fire",
        "box",
        "ship",
    ]
    verbs = [
        "opened",
        "closed",
        "found",
        "watched",
        "carried",
        "followed",
        "left",
        "took",
        "heard",
        "saw",
        "kept",
        "lost",
        "crossed",
        "painted",
    ]
    advs = ["slowly", "quickly", "again", "at once", "in silence", "without a word", "twice"]
    templates = [
        "{N} {v} the {a} {n}.",
        "The {a} {n} was {a2}, and {N} {v} it {adv}.",
        '"Did you see the {n}?" asked {N}.',
        '"{A}!" said {N}; "the {n} is {a}."',
        "It was {a}, and the {n} by the {n2} was {a2}.",
        "{N}'s {n} wasn't {a}, but the {n2} was.",
        "Why had {N} {v} the {n} {adv}?",
        "Then {N} and {N2} {v} the {a} {n}: one, two, three.",
        "We {v} the {n} at {d} o'clock, {adv}.",
        "Nobody {v} the {a} {n} -- not even {N}.",
    ]
    paragraphs, size = [], 0
    while size < target_chars:
        sentences = []
        for _ in range(rng.randint(3, 7)):
            words = dict(
                N=rng.choice(names),
                N2=rng.choice(names),
                a=rng.choice(adjs),
                a2=rng.choice(adjs),
                n=rng.choice(nouns),
                n2=rng.choice(nouns),
                v=rng.choice(verbs),
                adv=rng.choice(advs),
                d=rng.randint(1, 12),
            )
            words["A"] = words["a"].capitalize()
            sentence = rng.choice(templates).format(**words)
            sentences.append(sentence[0].upper() + sentence[1:])
        lines, line = [], ""
        for word in " ".join(sentences).split(" "):
            if line and len(line) + 1 + len(word) > 70:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
        paragraph = "\n".join(lines)
        paragraphs.append(paragraph)
        size += len(paragraph) + 2
    return "\n\n".join(paragraphs) + "\n"


# ------------------------------------------------------------ the precision policies

# How far apart two computations of one mean loss over the same windows may land when they
# group the products differently (another batch size, another order of accumulation).
# float32 agrees to its rounding; bf16 autocast rounds every product's inputs to 8 bits of
# mantissa, and gaps of 2e-5 to 6e-5 were measured on a loss near 4.7 (AMD EPYC, AVX-512
# BF16): 1e-3 is well above that and still far below what another set of windows gives.
LOSS_TOLERANCE = {"float32": 2e-6, "bfloat16": 1e-3}


@dataclasses.dataclass(frozen=True)
class CpuPrecision:
    """One of the CPU's two precision policies, as a test runs under it."""

    name: str  # "float32" or "bfloat16"
    loss_tolerance: float


def loss_tolerance() -> float:
    """The tolerance between two computations of one loss under the policy this process
    (and the processes it starts) computes in now: the CPU's, or SMOLGPT_CPU_BF16's."""
    policy = hardware.precision_policy(torch.device("cpu"))
    return LOSS_TOLERANCE["float32" if policy.reduced is None else "bfloat16"]


# ----------------------------------------------------------------------- what a run left


def e2e_metrics(run_dir: Path) -> list:
    """The rows of run_dir/metrics.jsonl ([] while it does not exist)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line being written right now
                break
    return rows


def e2e_snapshot(path: Path) -> dict:
    """{relative path: bytes (None for a directory)} of everything under path, except the
    run lock (which a refused run may rewrite); {} when path does not exist."""
    path = Path(path)
    if path.is_file():
        return {".": path.read_bytes()}
    if not path.exists():
        return {}
    out = {}
    for p in sorted(path.rglob("*")):
        if p.name == ".lock":
            continue
        out[str(p.relative_to(path))] = None if p.is_dir() else p.read_bytes()
    return out


def flip_bit_in_tensor_data(path: Path) -> str:
    """Flip one bit in the middle of the largest tensor stored in a torch.save file (a zip
    archive), found through the zip directory; return the archive entry's name."""
    with zipfile.ZipFile(path) as archive:
        info = max(
            (i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size
        )
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        header = f.read(30)  # the local file header; its name and extra field follow
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        where = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(where)
        byte = f.read(1)[0]
        f.seek(where)
        f.write(bytes([byte ^ 0x10]))
    return info.filename


# ------------------------------------------------------------------------------ commands


@dataclasses.dataclass
class E2EResult:
    """What a finished command did (run in a subprocess, or in-process by cli.main)."""

    args: list
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def describe(self) -> str:
        return (
            f"$ {' '.join(map(str, self.args))}\nexit {self.returncode} after "
            f"{self.seconds:.1f}s\n--- stdout ---\n{self.stdout[-3000:]}\n"
            f"--- stderr ---\n{self.stderr[-3000:]}"
        )


def names(*needles: str) -> str:
    """A pytest.raises match= pattern: the message names every needle (a flag, a path, a
    value), in any order and any case; the wording around them is free to change."""
    return "(?is)" + "".join(f"(?=.*{re.escape(needle)})" for needle in needles)


def e2e_assert_one_line_error(result: E2EResult, *needles: str, status: int = 2) -> str:
    """Exit status 2, one line on stderr (no traceback), naming each needle; returns it."""
    lines = result.stderr.strip("\n").splitlines()
    assert result.returncode == status, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    assert len(lines) == 1, f"expected exactly one line on stderr\n{result.describe()}"
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (
            f"{needle!r} not in the error\n{result.describe()}"
        )
    return lines[0]


def e2e_wait_for(
    condition,
    timeout: float = 120,
    process: "E2EProcess" = None,
    interval: float = 0.01,
    what: str = "condition",
):
    """Poll condition() until truthy; fail on timeout or if process ends first."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            result = process.wait()
            raise AssertionError(f"process ended before {what}:\n{result.describe()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


_LIVE: set = set()  # E2EProcesses not waited for yet


def kill_live_processes() -> None:
    """Kill and reap every E2EProcess not waited for (a test that failed half-way)."""
    for process in list(_LIVE):
        process.kill()
        process.wait(timeout=60)


class E2EProcess:
    """A command running in the background; its output goes to files (no pipe can fill)."""

    def __init__(self, args: list, logs: Path, **kwargs):
        self.args = args
        logs.mkdir(parents=True, exist_ok=True)
        self._out = open(logs / "stdout", "w+", encoding="utf-8")
        self._err = open(logs / "stderr", "w+", encoding="utf-8")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err, **kwargs
        )
        _LIVE.add(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self):
        return self.proc.poll()

    def send_signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def outlive_tests(self) -> "E2EProcess":
        """Not killed after each test (a server a module fixture starts, and ends itself)."""
        _LIVE.discard(self)
        return self

    def stderr_so_far(self) -> str:
        return Path(self._err.name).read_text(encoding="utf-8")

    def wait(self, timeout: float = 180) -> E2EResult:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.args} did not finish within {timeout}s") from None
        _LIVE.discard(self)
        seconds = time.monotonic() - self.started
        texts = []
        for f in (self._out, self._err):
            f.flush()
            f.seek(0)
            texts.append(f.read())
            f.close()
        return E2EResult(self.args, self.proc.returncode, texts[0], texts[1], seconds)


class SmolCLI:
    """Runs smolgpt's real command lines in subprocesses.

    Every process gets SMOLGPT_CACHE_DIR (and XDG_CACHE_HOME) in a temporary directory, no
    proxy settings, and a Gutenberg mirror on a closed local port, so nothing reaches the
    network or the user's cache. OMP_NUM_THREADS=1: several runs at once on a small
    machine, and a thread count that never varies between runs compared bit for bit.
    """

    root = E2E_ROOT
    tiny = E2E_TINY

    # The helpers above, reachable from a test through the smol_cli fixture too.
    metrics = staticmethod(e2e_metrics)
    snapshot = staticmethod(e2e_snapshot)
    wait_for = staticmethod(e2e_wait_for)
    assert_one_line_error = staticmethod(e2e_assert_one_line_error)

    def __init__(self, base: Path, corpus: Path):
        self.base, self.corpus = base, corpus
        self.cache = base / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.closed_port = unused_port()
        self._logs = 0
        self._logs_lock = threading.Lock()  # popen is called from several threads

    def env(self, **extra: str) -> dict:
        # SMOLGPT_CPU_BF16 stays: a test (or a developer) forcing a precision policy forces
        # it in the processes too.
        env = {
            k: v
            for k, v in os.environ.items()
            if k.lower() not in PROXY_VARS
            and (not k.startswith("SMOLGPT_") or k == "SMOLGPT_CPU_BF16")
        }
        env.update(
            SMOLGPT_CACHE_DIR=str(self.cache),
            XDG_CACHE_HOME=str(self.base / "xdg-cache"),
            SMOLGPT_GUTENBERG_MIRROR=f"http://127.0.0.1:{self.closed_port}",
            NO_PROXY="*",
            no_proxy="*",
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            PYTHONDONTWRITEBYTECODE="1",
        )
        env.pop("PYTHONPATH", None)
        env.update(extra)
        return env

    def argv(self, command: str, *args) -> list:
        """command: 'train' / 'generate' (the root scripts) or 'module' (python -m smolgpt)."""
        if command == "module":
            head = [sys.executable, "-m", "smolgpt"]
        else:
            head = [sys.executable, str(self.root / f"{command}.py")]
        return head + [str(a) for a in args]

    def popen(
        self, command: str, *args, env: dict = None, cwd: Path = None, **kwargs
    ) -> E2EProcess:
        with self._logs_lock:
            self._logs += 1
            logs = self.base / "logs" / str(self._logs)
        return E2EProcess(
            self.argv(command, *args),
            logs,
            env=env or self.env(),
            cwd=str(cwd or self.base),
            **kwargs,
        )

    def run(self, command: str, *args, timeout: float = 180, **kwargs) -> E2EResult:
        return self.popen(command, *args, **kwargs).wait(timeout)

    def run_many(self, calls: list, workers: int = 3) -> list:
        """Run (command, args, kwargs) calls concurrently; results in the same order."""
        with ThreadPoolExecutor(workers) as pool:
            futures = [
                pool.submit(self.run, c[0], *c[1], **(c[2] if len(c) > 2 else {})) for c in calls
            ]
            return [f.result() for f in futures]

    def server_url(self, process: "E2EProcess", timeout: float = 120) -> str:
        """The base URL (http://127.0.0.1:PORT/) a `smolgpt serve` process says it listens at,
        once it does."""
        found = self.wait_for(
            lambda: re.search(r"serving .* at (http://\S+/) ", process.stderr_so_far()),
            timeout=timeout,
            process=process,
            what="the server to listen",
        )
        return found.group(1).replace("0.0.0.0", "127.0.0.1")

    def train_args(self, level: str, out_dir: Path, *extra) -> list:
        return ["--level", level, "--data", self.corpus, *self.tiny, "--out_dir", out_dir, *extra]


@dataclasses.dataclass
class E2ERun:
    """A finished training run made once per session; tests copy it before changing it."""

    level: str
    out_dir: Path
    args: list  # the train.py arguments that made it
    result: E2EResult

    def copy(self, dest: Path) -> Path:
        shutil.copytree(self.out_dir, dest, ignore=shutil.ignore_patterns(".lock"))
        return dest


def e2e_assert_install_advice(text: str, extra: str, cwd: Path = None) -> None:
    """Assert that text advises the command that installs `extra` from this clone, and
    that it would: pip install -e of the repository (as seen from cwd, None: any folder)
    with an extra that pyproject.toml defines. `pip install 'smolgpt[...]'` would fail:
    smolgpt is not on PyPI."""
    import tomllib

    found = re.search(r'pip install -e "([^"\[]+)\[([\w-]+)\]"', text)
    assert found, f"no pip install -e advice in {text!r}"
    path, named = found.groups()
    assert named == extra, f"advises the {named} extra, not {extra}: {text!r}"
    where = Path(path) if cwd is None or Path(path).is_absolute() else Path(cwd) / path
    assert where.resolve() == E2E_ROOT, f"{path} is not the clone ({E2E_ROOT}): {text!r}"
    defined = tomllib.loads((E2E_ROOT / "pyproject.toml").read_text())["project"]
    assert extra in defined["optional-dependencies"], f"no {extra} extra in pyproject.toml"


# ----------------------------------------------------------------------------- a server


class LocalServer:
    """A real HTTP server on 127.0.0.1 in a thread, serving ``routes`` (path -> bytes)."""

    def __init__(self) -> None:
        self.routes: dict[str, bytes] = {}
        self.requests: list[str] = []
        routes, requests = self.routes, self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                requests.append(self.path)
                body = routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()
        self.running = True

    def stop(self) -> None:
        if self.running:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self.running = False


def e2e_sharp_model(
    vocab_size: int,
    position: str,
    n_embd: int = 32,
    block_size: int = 64,
    scale: float = 8.0,
    **config,
):
    """A tiny GPT (2 layers, n_embd wide) in eval mode, its matrices scaled up from their
    initialisation so that logits differ clearly between tokens and greedy
    decoding is not decided by rounding."""
    import torch

    from smolgpt.config import ModelConfig
    from smolgpt.model import GPT

    torch.manual_seed(0)
    model = GPT(
        ModelConfig(
            vocab_size=vocab_size,
            block_size=block_size,
            n_layer=2,
            n_head=2,
            n_embd=n_embd,
            dropout=0.0,
            position=position,
            **config,
        )
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
            else:  # LayerNorm weights and biases: away from 1 and 0
                p.add_(0.5 * torch.randn_like(p))
    return model.eval()
