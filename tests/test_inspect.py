"""A look inside (smolgpt inspect, Model.inspect, smolgpt.inspection): the numbers behind
the pictures are right on models whose answers are known, and the command writes decodable,
non-blank PNGs and a summary for a char model and a word model."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

import smolgpt
from smolgpt import inspection
from smolgpt.config import ModelConfig
from smolgpt.model import GPT
from smolgpt.tokenizer import CharTokenizer

from e2e import e2e_assert_install_advice, without_package

PICTURES = ("attention.png", "embeddings.png", "loss_by_position.png")


def tiny(**changes) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=12, block_size=10, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    return GPT(dataclasses.replace(config, **changes)).eval()


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_attention_weights_are_the_modules_own(position):
    """Rows sum to 1, nothing above the diagonal, and the weighted values through c_proj
    give the block's attention output: the pictured weights are the ones the model uses."""
    model = tiny(position=position)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    weights = inspection.attention_weights(model, ids)
    assert weights.shape == (2, 2, 8, 8)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 8))
    assert torch.all(weights.triu(1) == 0)
    x = model.wte(torch.tensor([ids]))
    if position == "learned":
        x = x + model.wpe(torch.arange(8))
    attn, rotary = model.blocks[0].attn, model.rotary(0, 8)
    h = model.blocks[0].ln_1(x)
    _, _, v = attn.split_heads(attn.c_attn(h), rotary)
    heads = (weights[0].unsqueeze(0) @ v).transpose(1, 2).reshape(1, 8, 16)
    torch.testing.assert_close(attn.c_proj(heads), attn(h, rotary))


def test_without_the_causal_mask_the_weights_reach_ahead():
    weights = inspection.attention_weights(tiny(causal=False), [1, 2, 3, 4])
    assert weights.triu(1).sum() > 0


def test_head_summary_of_known_patterns():
    T = 6
    on_itself = inspection.head_summary(torch.eye(T))
    assert on_itself["self"] == 1.0 and on_itself["distance"] == 0.0
    previous = torch.zeros(T, T)
    previous[0, 0] = 1.0
    previous[torch.arange(1, T), torch.arange(T - 1)] = 1.0
    s = inspection.head_summary(previous)
    assert s["previous"] == 1.0 and s["distance"] == pytest.approx(5 / 6)
    assert (
        inspection.head_summary(torch.zeros(T, T).index_fill(1, torch.tensor([0]), 1.0))["first"]
        == 1.0
    )


def test_embedding_map_and_nearest_neighbours():
    model = tiny()
    with torch.no_grad():  # token 7 made a near copy of token 3
        model.wte.weight[7] = model.wte.weight[3] * 2 + 1e-3
    points = inspection.embedding_map(model)
    assert points.shape == (12, 2)
    near = inspection.nearest(model, 3, k=4)
    assert len(near) == 4 and near[0][0] == 7 and near[0][1] > 0.99
    assert 3 not in [i for i, _ in near]  # not its own neighbour
    assert [s for _, s in near] == sorted((s for _, s in near), reverse=True)


def test_loss_by_position_averages_windows_position_by_position():
    model = tiny()
    tokens = torch.randint(0, 12, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    losses = inspection.loss_by_position(model, tokens, max_windows=7, batch_size=3)
    assert losses.shape == (10,)
    # By hand: the same seven windows, one at a time.
    starts = torch.linspace(0, 200 - 11, 7).long().tolist()
    rows = torch.tensor([tokens[s : s + 11] for s in starts])
    with torch.no_grad():
        logits, _ = model(rows[:, :-1])
    expected = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), rows[:, 1:], reduction="none"
    ).mean(0)
    torch.testing.assert_close(losses, expected)
    with pytest.raises(ValueError):
        inspection.loss_by_position(model, [1])


def test_without_a_text_the_loss_picture_is_skipped_and_the_summary_says_why(tmp_path):
    pytest.importorskip("matplotlib")
    chars = CharTokenizer.train(["abcdefghijkl"])
    result = inspection.inspect_model(
        tiny(), chars, tmp_path / "out", [0, 1, 2, 3], None, "no validation text"
    )
    assert [f.name for f in result.files] == ["attention.png", "embeddings.png", "summary.txt"]
    assert "loss per position: skipped (no validation text)" in result.summary
    assert (tmp_path / "out" / "summary.txt").read_text() == result.summary


def test_labels_in_a_dense_cluster_do_not_overlap(tmp_path, monkeypatch):
    """Tokens whose embeddings all but coincide are still drawn, every one, but labelled only
    as far as the labels stay readable: no two label boxes overlap, the prompt's tokens are
    labelled first, and the tokens that stand apart keep theirs."""
    pytest.importorskip("matplotlib")
    chars = CharTokenizer.train(["abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"])
    model = tiny(vocab_size=chars.vocab_size)
    apart = [0, 1, 2, 3]  # the characters 0 to 3: far from each other and from the rest
    with torch.no_grad():
        weights = model.wte.weight
        centre = torch.randn(16, generator=torch.Generator().manual_seed(1))
        weights[:] = centre + 1e-3 * torch.randn(weights.shape)
        for i in apart:
            weights[i] = centre + 3 * torch.eye(16)[i] * (1 if i % 2 else -1)
    drawn = {}
    save = inspection._save

    def keep(fig, canvas, path):
        drawn[path.name] = fig
        return save(fig, canvas, path)

    monkeypatch.setattr(inspection, "_save", keep)
    prompt = [chars.stoi["q"], chars.stoi["Z"]]  # both in the cluster: only q fits
    inspection.inspect_model(model, chars, tmp_path, prompt, None)
    fig = drawn["embeddings.png"]
    (ax,) = fig.axes
    assert len(ax.collections[0].get_offsets()) == chars.vocab_size  # every token a point
    renderer = fig.canvas.get_renderer()
    boxes = {text.get_text(): text.get_window_extent(renderer) for text in ax.texts}
    names = sorted(boxes)
    for i, one in enumerate(names):
        for other in names[i + 1 :]:
            a, b = boxes[one], boxes[other]
            apart_x = a.x1 <= b.x0 or b.x1 <= a.x0
            apart_y = a.y1 <= b.y0 or b.y1 <= a.y0
            assert apart_x or apart_y, f"labels {one!r} and {other!r} overlap"
    # The cluster is one spot: it has room for one name, the prompt's first token's.
    assert set(boxes) == {"q"} | {chars.chars[i] for i in apart}, sorted(boxes)


def assert_picture(path, min_pixels: int = 300) -> None:
    """A PNG that decodes, of a real size, and not blank: many distinct colours."""
    from matplotlib.image import imread

    image = imread(path)
    assert min(image.shape[:2]) >= min_pixels, image.shape
    colours = {tuple(p) for p in image.reshape(-1, image.shape[-1])[::7].tolist()}
    assert len(colours) > 20, f"{path} looks blank"


@pytest.mark.slow
@pytest.mark.parametrize("level", ["char", "word"])
def test_inspect_command_draws_a_char_and_a_word_model(
    smol_cli, smol_runs, cli_main, tmp_path, level
):
    pytest.importorskip("matplotlib")
    run = smol_runs[level].copy(tmp_path / "run")
    done = smol_cli.run("module", "inspect", run)
    assert done.returncode == 0, done.describe()
    folder = run / "inspect"  # the default: inside the run directory
    for name in PICTURES:
        assert_picture(folder / name)
    assert str(folder / "attention.png") in done.stderr  # where the pictures went
    summary = (folder / "summary.txt").read_text(encoding="utf-8")
    assert done.stdout == summary
    assert "layer 0 head 0:" in summary and "nearest neighbours" in summary
    assert "loss per position (nats), by tokens of context seen: 1: " in summary

    # --out and --prompt; a prompt longer than the context is one line, status 2. (In this
    # process: the real one above has shown the command works as a user runs it.)
    prompt = "the of and" if level == "word" else "the "
    checkpoint = run / "best_model.pth"
    done = cli_main(["inspect", checkpoint, "--out", tmp_path / "mine", "--prompt", prompt])
    assert done.returncode == 0, done.describe()
    assert_picture(tmp_path / "mine" / "attention.png")
    too_long = cli_main(
        ["inspect", checkpoint, "--out", tmp_path / "long", "--prompt", prompt * 40]
    )
    # The prompt's length in tokens, and the model's block_size (32) it is more than.
    tokens = len(smolgpt.load(checkpoint).tokenizer.encode(prompt * 40))
    smol_cli.assert_one_line_error(too_long, "prompt", str(tokens), "block_size", "32")
    assert not (tmp_path / "long").exists()


@pytest.mark.slow
def test_without_matplotlib_inspect_says_what_to_install(smol_cli, smol_runs, tmp_path):
    run = smol_runs["char"].copy(tmp_path / "run")
    program = without_package("matplotlib") + (
        "from smolgpt.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program, "inspect", str(run)],
        capture_output=True,
        text=True,
        env=smol_cli.env(),
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr  # one line
    e2e_assert_install_advice(done.stderr, "plot")
    assert not (run / "inspect").exists()
