"""Every benchmark script, run at toy size: each must finish and print its table.

The benchmarks in ``benchmarks/`` are scripts, not tests, and nothing else runs them, so a
rename in the package would break one silently. Here each runs as a user runs it
(``python benchmarks/<name>.py`` from the repository root) with flags that make it seconds
of work, in the ``smol_cli`` environment: offline, on a generated corpus, with a private
token cache, one thread per process; its JSON record goes to a temporary folder. The
numbers mean nothing at this size. All the runs start at once, in a fixture; each test
checks one script's.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from e2e import E2EProcess, E2EResult

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# Flags that shrink a train.py run (time_to_loss.py and recipe_sweep.py append them to
# their own) and a step_profile.py step to a model of one small layer. No run's loss.png is
# looked at (drawing it imports matplotlib: half a second a run).
TOY_TRAIN = (
    "--n_layer 1 --n_head 2 --n_embd 32 --block_size 32 --batch_size 4 --eval_iters 2 --no-plot"
)
TOY_STEP = [
    "--batch",
    "2",
    "--block",
    "16",
    "--n_layer",
    "1",
    "--n_head",
    "2",
    "--n_embd",
    "32",
    "--steps",
    "2",
    "--rounds",
    "1",
]
# SMOLGPT_CPU_BF16=1 takes the code paths of a CPU with native bf16 on any CPU (emulated,
# slow, but at this size it costs a second).
BF16 = {"SMOLGPT_CPU_BF16": "1"}


def toy_runs(data: Path, records: Path, no_transformers: Path) -> dict[str, tuple[list, dict]]:
    """name -> (the script and its toy flags, extra environment), longest first. data holds
    the corpora the benchmarks name; JSON records go to records; no_transformers holds a
    transformers module that fails to import."""
    corpus = data / "sherlock.txt"

    def out(name: str) -> list:
        return ["--out", records / f"{name}.json"]

    throughput = ["throughput.py", "--quick"]
    return {
        # Every part of the GPU script at toy size on the CPU: ten processes, ~40 s.
        "gpu": (["gpu.py", "--toy", "--device", "cpu", "--data", data, *out("gpu")], {}),
        "levels": (
            [
                "levels.py",
                "--corpora",
                corpus,
                "--preset",
                "nano",
                "--time-budget",
                "1",
                # Two levels, a training process each: word stands for char (the same path
                # through the script), bpe:N has a path of its own.
                "--levels",
                "word",
                "bpe:300",
                "--samples",
                "5",
                "--extra",
                f"{TOY_TRAIN} --eval_interval 5 --max_iters 10",
                *out("levels"),
            ],
            {},
        ),
        "memory": (["memory.py", "--quick", *out("memory")], {}),
        "frontier": (
            [
                "frontier.py",
                "--data",
                data / "tinyshakespeare.txt",
                # One configuration: each is a train.py and an eval process. nanogpt-cpu is
                # the one of many flags; test_frontier_configs checks the others' flags.
                "--configs",
                "nanogpt-cpu",
                "--budgets",
                "1",
                "--extra",
                f"{TOY_TRAIN} --eval_interval 5",
                "--plot",
                records / "frontier.png",
                *out("frontier"),
            ],
            {},
        ),
        "prepare": (
            [
                "prepare.py",
                "--source",
                corpus,
                "--mb",
                "0.1",
                "--rounds",
                "1",
                "--levels",  # char stands for word too: the same path through the script
                "char",
                "bpe",
                "tokenizers",
                "--vocab-size",
                "300",
                *out("prepare"),
            ],
            {},
        ),
        "serving": (["serving.py", "--quick", *out("serving")], {}),
        "busy_cpu": (
            [
                "busy_cpu.py",
                "--budget",
                "1",
                "--rounds",
                "1",
                "--busy-loops",
                "1",
                "--extra",
                f"{TOY_TRAIN} --data {corpus}",
                *out("busy_cpu"),
            ],
            {},
        ),
        "throughput": ([*throughput, *out("throughput")], {}),
        "generation": (["generation.py", "--quick", *out("generation")], {}),
        "recipe_sweep": (
            [
                "recipe_sweep.py",
                "--only",
                "5",
                "--data-dir",
                data,
                "--extra",
                f"{TOY_TRAIN} --max_iters 4 --eval_interval 4",
                *out("sweep"),
            ],
            {},
        ),
        "time_to_loss": (
            [
                "time_to_loss.py",
                "--scenario",
                "shakespeare-char-micro-20s",
                "--data-dir",
                data,
                "--extra",
                f"{TOY_TRAIN} --time_budget 1",
                *out("time_to_loss"),
            ],
            {},
        ),
        # step_profile.py writes no record. Its modes combine: all of them in one process.
        "step_profile": (
            [
                "step_profile.py",
                *TOY_STEP,
                "--muon",
                "--profile",
                "--kernels",
                "--variants",
                "--muon-cost",
            ],
            BF16,
        ),
        "throughput-without-transformers": (
            [*throughput, *out("throughput-without")],
            {"PYTHONPATH": str(no_transformers)},
        ),
        "integrity": (
            [
                "integrity.py",
                "--source",
                corpus,
                "--mb",
                "0.1",
                "--preset",
                "nano",
                "--repeats",
                "1",
                *out("integrity"),
            ],
            {},
        ),
        "reference_curves": (
            [
                "reference_curves.py",
                "--corpora",
                corpus,
                "--presets",
                "nano",
                "--max_iters",
                "4",
                "--eval_interval",
                "2",
                "--out-runs",
                records / "reference-runs",
                "--extra",
                "--n_layer 1 --n_head 2 --n_embd 32 --block_size 32 --batch_size 4 --eval_iters 2",
                *out("reference"),
            ],
            {},
        ),
        "generation-without-transformers": (
            ["generation.py", "--quick", *out("generation-without")],
            {"PYTHONPATH": str(no_transformers)},
        ),
    }


@pytest.fixture(scope="module")
def runs(smol_cli, tmp_path_factory) -> dict[str, E2EResult]:
    """name (of toy_runs) -> the finished run."""
    base = tmp_path_factory.mktemp("benchmarks")
    data = base / "data"
    data.mkdir()
    for name in ("tinyshakespeare.txt", "sherlock.txt"):  # the files the benchmarks ask for
        shutil.copy(smol_cli.corpus, data / name)
    no_transformers = base / "no-transformers"
    no_transformers.mkdir()
    (no_transformers / "transformers.py").write_text(
        'raise ImportError("hidden by tests/test_benchmarks.py")\n'
    )

    def run(name: str, script: list, env: dict) -> E2EResult:
        args = [sys.executable, f"benchmarks/{script[0]}", *map(str, script[1:])]
        process = E2EProcess(args, base / "logs" / name, env=smol_cli.env(**env), cwd=str(ROOT))
        return process.wait(timeout=300)

    # Three at a time: each process computes with one thread, and the scripts that start
    # processes of their own mostly wait for them (on 2 cores, two at a time took as much CPU
    # time and longer).
    with ThreadPoolExecutor(3) as pool:
        futures = {
            name: pool.submit(run, name, script, env)
            for name, (script, env) in toy_runs(data, base / "records", no_transformers).items()
        }
        return {name: future.result() for name, future in futures.items()}


def check(result: E2EResult, *needles: str) -> dict:
    """Check that the run exited 0 and printed the machine line, each needle and its
    command; return its JSON record ({} where --out asked for none), which must name the
    same machine."""
    assert result.returncode == 0, result.describe()
    machine = ("CPU: ", "smolgpt's precision policy: ")
    for needle in (*machine, *needles, "Command: python benchmarks/"):
        assert needle in result.stdout, f"{needle!r} not printed\n{result.describe()}"
    if "--out" not in result.args:
        return {}
    record = json.loads(Path(result.args[result.args.index("--out") + 1]).read_text())
    assert record["hardware"]["line"] in result.stdout
    return record


def says(text: str, *needles: str) -> bool:
    """Whether one line of text names every needle."""
    return any(all(n in line for n in needles) for line in text.splitlines())


def assert_peer_columns(run, record: dict, header: str) -> None:
    """With transformers installed its columns are in the table and the record; without,
    one line says they were skipped."""
    if importlib.util.find_spec("transformers") is not None:
        assert header in run.stdout
        assert record["transformers"] is not None
    else:
        assert says(run.stdout, "transformers", "skipped", "No module named"), run.describe()


def test_busy_cpu(runs):
    record = check(
        runs["busy_cpu"],
        "| way | busy loops | threads | steps (each round) |",
        "| smolgpt | 0 |",
        "| openmp-default | 1 |",
    )
    assert {(r["way"], r["busy_loops"]) for r in record["results"]} == {
        (way, busy) for way in ("smolgpt", "openmp-default") for busy in (0, 1)
    }


def test_throughput(runs):
    record = check(
        runs["throughput"],
        "| config | smolgpt tok/s | smolgpt + Muon tok/s |",
        "| toy (1L/2H/32, T32, B4, V65) |",
    )
    assert_peer_columns(runs["throughput"], record, "| transformers fp32 tok/s |")


def test_throughput_without_transformers(runs):
    """Without the `bench` extra the peer's columns go, and one line says what to install."""
    run = runs["throughput-without-transformers"]
    record = check(run, "| config | smolgpt tok/s |")
    # Why they were skipped, and what to install.
    assert says(
        run.stdout,
        "skipped",
        "hidden by tests/test_benchmarks.py",
        'pip install "transformers>=4.40"',
    ), run.describe()
    assert "transformers fp32 tok/s" not in run.stdout
    assert record["transformers"] is None


def test_generation(runs):
    record = check(
        runs["generation"],
        "| model | batch | smolgpt tok/s | smolgpt, no cache",
        "| cache speed-up | smolgpt int8 tok/s |",
        "| past the window: smolgpt tok/s | past the window: smolgpt int8 tok/s |",
        "| nano (3L/3H/48, T128, V65) | 1 |",
        "| nano (3L/3H/48, T128, V65) | 2 |",
    )
    assert_peer_columns(
        runs["generation"],
        record,
        "| transformers tok/s | smolgpt / transformers | smolgpt int8 / transformers |",
    )


def test_generation_without_transformers(runs):
    run = runs["generation-without-transformers"]
    record = check(run, "| model | batch | smolgpt tok/s |", "| smolgpt int8 tok/s |")
    assert says(
        run.stdout,
        "skipped",
        "hidden by tests/test_benchmarks.py",
        'pip install "transformers>=4.40"',
    ), run.describe()
    assert "transformers tok/s" not in run.stdout
    assert record["transformers"] is None


def test_step_profile(runs):
    check(
        runs["step_profile"],
        "tokens/s",
        "Self CPU time total",  # --profile: the step and the profiler's table
        "| op | dtype | variant | ms (fwd+bwd) |",
        "| torch.bfloat16 | smolgpt Dropout |",
        '| variant | tokens/s | speed-up over "both (as 0.2.0)" |',
        "| whole model in bf16, no autocast |",
        "| torch.optim.Muon (0.2.0) |",
        "| step | tokens/s |",
        "| Muon + AdamW |",
        "Muon step / AdamW step: ",
    )


def test_time_to_loss(runs):
    record = check(
        runs["time_to_loss"],
        "| scenario | target val | best val |",
        "| shakespeare-char-micro-20s | 1.8860 |",
    )
    (result,) = record["results"]  # the script reports a failed train.py; it must not fail
    assert result["exit_code"] == 0, result["log_tail"]
    assert result["best_val_loss"] is not None and result["metrics"][-1]["process_s"] > 0


def test_recipe_sweep(runs):
    record = check(
        runs["recipe_sweep"],
        "| # | flags | final val | best val | train loss |",
        "| 5 | `--optimizer muon --learning_rate 1e-2` |",
    )
    (result,) = record["results"]
    assert result["exit_code"] == 0, result["error"]
    assert result["steps"] == 4


def test_prepare(runs):
    check(
        runs["prepare"],
        "| level | corpus MB | tokens | vocab | prepare s | MB/s |",
        "| char | 0.1 |",
        "| bpe | 0.1 |",
        "| tokenizers | 0.1 |",
    )


def test_levels(runs):
    record = check(
        runs["levels"],
        "| corpus | level | vocab | steps | tokens/s | chars/token |",
        "| sherlock | word |",
        "| sherlock | bpe | 300 |",
    )
    scores = [row["held_out"] for row in record["results"]]
    assert len({score["chars"] for score in scores}) == 1  # the same text for every level
    assert all(score["bits_per_char"] > 0 for score in scores)


def test_integrity(runs):
    check(
        runs["integrity"],
        "| token cache | first preparation s |",
        "| checkpoint | torch.save s |",
        "| nano checkpoint (",
    )


def test_reference_curves(runs):
    record = check(
        runs["reference_curves"],
        "| corpus | preset | steps | best val loss | best val bits/char |",
        "| sherlock | nano | 4 |",
    )
    (result,) = record["results"]
    assert [r["iter"] for r in result["metrics"]] == [0, 2, 4]
    assert (Path(result["run_dir"]) / "best_model.pth").is_file()


def test_memory(runs):
    record = check(
        runs["memory"],
        "| shape | context | batch | peak MB | with checkpointing MB "
        "| saved | step s | with checkpointing step s |",
        "| toy (1L/2H/32) | 64 | 2 |",
        "largest difference 0.",
    )
    (result,) = record["results"]
    assert result["with"]["losses"] == result["without"]["losses"]  # checkpointing changes nothing
    assert len(result["with"]["step_times_s"]) == 2


def test_serving(runs):
    record = check(
        runs["serving"], "| model | in process tok/s | server tok/s | stream tok/s |", "| nano (0."
    )
    (result,) = record["results"]
    assert result["tokens"] == 8 and result["concurrent"] == 2
    assert result["server_tok_s"] > 0 and result["first_token_ms"] > 0


def test_frontier(runs):
    record = check(
        runs["frontier"],
        "| config | --time_budget s | val loss (whole split) |",
        "| nanogpt-cpu | 1 |",
        "Plot: ",
    )
    (result,) = record["results"]
    assert result["config"] == "nanogpt-cpu" and 0 < result["val_loss"] < 10


def test_gpu(runs):
    record = check(
        runs["gpu"],
        "| nanoGPT's configuration | 20 |",
        "| smolgpt --preset speedrun |",
        "| smolgpt | no |",
        "| a T4's policy (SMOLGPT_CUDA_CAPABILITY=7.5) |",
        "1 rank (Gloo)",
        "| nano | 300 |",
    )
    parts = record["parts"]
    assert list(parts) == ["nanogpt", "fp16", "torchrun", "throughput", "vocab"]
    assert not [p["error"] for p in parts.values() if "error" in p]
    assert [r["steps"] for r in parts["nanogpt"]["runs"]][0] == 20
    assert {r["compiled"] for r in parts["throughput"]["rows"]} == {False}  # --toy: eager
    assert [r["skipped_after_warmup"] for r in parts["fp16"]["runs"]] == [0, 0, 0]
    assert parts["torchrun"]["resumed_on"] == "cpu" and parts["torchrun"]["final_iter"] == 30
    assert [r["vocab_size"] for r in parts["vocab"]["presets"]["nano"]] == [300, 400]


def test_gpu_script_s_nanogpt_configuration_is_nanogpt_s(monkeypatch):
    """The configuration the GPU script races is nanoGPT's published shakespeare_char one,
    in flags that train.py takes (its toy run uses other sizes)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    gpu = importlib.import_module("gpu")
    from smolgpt.cli import build_parser
    from smolgpt.config import resolve_train_config

    flags = ["train", "--level", "char", *gpu.NANOGPT_SHAKESPEARE_CHAR]
    explicit = vars(build_parser().parse_args(flags))
    explicit.pop("command")
    cfg = resolve_train_config(explicit)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.batch_size) == (
        6,
        6,
        384,
        256,
        64,
    )
    assert (cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.max_iters) == (
        1e-3,
        1e-4,
        100,
        5000,
    )
    assert (cfg.dropout, cfg.beta2, cfg.weight_decay, cfg.grad_clip) == (0.2, 0.99, 0.1, 1.0)
    assert (cfg.optimizer, cfg.position, cfg.bias, cfg.compile) == ("adamw", "learned", False, True)
    assert (cfg.eval_interval, cfg.eval_iters, cfg.lr_schedule) == (250, 200, "cosine")


def test_gpu_script_counts_the_steps_the_fp16_scaler_skipped(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    gpu = importlib.import_module("gpu")
    rows = [
        {"iter": 0, "loss_scale": 65536.0},
        {"iter": 50, "loss_scale": 8192.0},  # three skipped during the warm-up: not counted
        {"iter": 150, "loss_scale": 8192.0},
        {"iter": 200, "loss_scale": 2048.0},  # two after it
        {"iter": 250, "loss_scale": 2048.0},
    ]
    assert gpu.skipped_after(rows, warmup=100) == 2
    assert gpu.skipped_after([{"iter": 0, "val_loss": 1.0}], warmup=0) == 0  # no scaler


def test_frontier_configs(monkeypatch):
    """The toy run trains one configuration; every configuration's flags must be flags of
    train.py's, naming settings that exist."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as for a script: common too
    frontier = importlib.import_module("frontier")
    from smolgpt.cli import build_parser
    from smolgpt.config import resolve_train_config

    for flags in frontier.CONFIGS.values():
        explicit = vars(build_parser().parse_args(["train", "--level", "char", *flags]))
        explicit.pop("command")
        resolve_train_config(explicit)


def test_frontier_replot_joins_records(monkeypatch, tmp_path, capsys):
    """--replot draws the plot again from JSON records, training nothing: a configuration
    run on its own (micro, as the performance page's table has it) joins the others' plot."""
    pytest.importorskip("matplotlib")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    frontier = importlib.import_module("frontier")

    def record(name: str, configs: list, cpu: str = "AMD EPYC (x86_64: avx2)") -> Path:
        results = [
            {
                "config": config,
                "budget_s": budget,
                "wall_s": budget + 2.0,
                "val_loss": 2.5 - rank / 10 - budget / 1000,
                "logged_best_val": 2.5 - rank / 10 - budget / 1000,
                "iterations": 10 * budget,
                "flags": [],
            }
            for rank, config in enumerate(configs)
            for budget in (30.0, 60.0)
        ]
        path = tmp_path / name
        record = {"benchmark": "frontier", "hardware": {"cpu": cpu}, "results": results}
        path.write_text(json.dumps(record))
        return path

    both, micro = record("both.json", ["speedrun", "nanogpt-cpu"]), record("m.json", ["micro"])
    png = tmp_path / "frontier.png"
    assert frontier.main(["--replot", str(both), str(micro), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "| micro | 60 | 2.4400 |" in printed and "| speedrun | 30 |" in printed
    assert png.stat().st_size > 0
    results, cpu = frontier.recorded([both, micro])
    (axes,) = frontier.figure(results, cpu).axes
    drawn = {line.get_label(): list(line.get_ydata()) for line in axes.get_lines()}
    assert drawn["micro"] == pytest.approx([2.47, 2.44]) and {"speedrun", "nanogpt-cpu"} <= set(
        drawn
    )
    with pytest.raises(SystemExit, match="different CPUs"):
        frontier.recorded([both, record("other.json", ["micro"], cpu="Intel Xeon")])


def test_the_frontier_plot_draws_every_row_of_the_performance_table(monkeypatch):
    """docs/frontier.png is drawn from benchmarks/records/frontier-zen3-0.10.0.json: its
    numbers are the performance page's table, every row of it (micro too)."""
    import re

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    frontier = importlib.import_module("frontier")
    page = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    head = "| `--time_budget` | 30 s | 60 s | 150 s | 300 s | 600 s |"
    table = page[page.index(head) :].split("\n\n")[0].splitlines()[2:]
    config = {"--preset speedrun": "speedrun", "nanoGPT's CPU": "nanogpt-cpu"}
    config["--preset micro"] = "micro"
    in_table = {}
    for row in table:
        cells = [c.strip() for c in row.strip("|").split("|")]
        (name,) = [v for k, v in config.items() if k in cells[0]]
        in_table[name] = [float(c) for c in cells[1:] if re.fullmatch(r"[\d.]+", c)]
    results, _ = frontier.recorded([ROOT / "benchmarks/records/frontier-zen3-0.10.0.json"])
    recorded = {
        name: [
            r["val_loss"]
            for r in sorted(results, key=lambda r: r["budget_s"])
            if r["config"] == name
        ]
        for name in in_table
    }
    assert recorded == in_table and set(in_table) == {"speedrun", "nanogpt-cpu", "micro"}
