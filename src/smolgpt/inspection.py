"""A look inside a trained model (``smolgpt inspect``, :meth:`smolgpt.Model.inspect`).

Three pictures and a text summary, each answering one question a learner asks:

- ``attention.png``: where does each head look? Every head's attention weights for a prompt,
  one square per head (row i: how much token i takes from each earlier token).
- ``embeddings.png``: what has the model learned about its tokens? The token embeddings
  projected onto their two principal directions, and in the summary the nearest neighbours
  (by cosine similarity) of the prompt's first tokens.
- ``loss_by_position.png``: how much does context help? The mean loss of the prediction at
  each position of a window: the first token is guessed from nothing before it, the last
  from block_size - 1 tokens.

The computations (:func:`attention_weights`, :func:`embedding_map`, :func:`nearest`,
:func:`loss_by_position`) need only torch; drawing needs matplotlib (the plot extra).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .files import atomic_write_text
from .model import GPT
from .plots import _figure_classes, _save
from .tokenizer import Tokenizer

SUMMARY = "summary.txt"
ATTENTION, EMBEDDINGS, LOSS = "attention.png", "embeddings.png", "loss_by_position.png"
PROMPT_TOKENS = 24  # a default prompt's length: enough to see patterns, few enough to label
NEIGHBOURS_OF = 6  # tokens whose nearest neighbours the summary lists
LABELLED = 80  # tokens a word model's embedding picture may name (beyond the prompt's)
MAX_WINDOWS = 256  # windows the loss per position averages over


@dataclass
class Inspection:
    """What :func:`inspect_model` wrote: the PNGs and summary.txt in ``out_dir``, and the
    summary's text."""

    out_dir: Path
    files: list[Path] = field(default_factory=list)
    summary: str = ""


def token_label(tokenizer: Tokenizer, token_id: int) -> str:
    """A token as a short printable label: spaces and line breaks made visible."""
    text = tokenizer.decode([token_id])
    return text.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t") or "∅"


@torch.no_grad()
def attention_weights(module: GPT, ids: Sequence[int]) -> torch.Tensor:
    """The attention weights of every head for one sequence: (n_layer, n_head, T, T), each
    row summing to 1. The sequence runs through the blocks as in the model's forward; at each
    block, :meth:`~smolgpt.model.CausalSelfAttention.attention_weights` spells out what the
    fused kernel computes."""
    device = next(module.parameters()).device
    idx = torch.tensor([list(ids)], device=device)
    T = idx.size(1)
    if T > module.config.block_size:
        raise ValueError(f"{T} tokens exceed block_size {module.config.block_size}")
    x = module.wte(idx)
    if module.config.position == "learned":
        x = x + module.wpe(torch.arange(T, device=device))
    rotary = module.rotary(0, T)
    maps = []
    for block in module.blocks:
        maps.append(block.attn.attention_weights(block.ln_1(x), rotary)[0])
        x = block(x, rotary)
    return torch.stack(maps).float().cpu()


def embedding_map(module: GPT) -> torch.Tensor:
    """Every token's embedding projected onto the two directions along which the embeddings
    vary most (principal component analysis): (vocab_size, 2)."""
    weights = module.wte.weight.detach().float().cpu()
    centred = weights - weights.mean(dim=0)
    _, _, directions = torch.linalg.svd(centred, full_matrices=False)
    return centred @ directions[:2].T


def nearest(module: GPT, token_id: int, k: int = 5) -> list[tuple[int, float]]:
    """The k tokens whose embeddings point most nearly the same way as token_id's, with their
    cosine similarity, most similar first."""
    weights = F.normalize(module.wte.weight.detach().float().cpu(), dim=-1)
    similarity = weights @ weights[token_id]
    similarity[token_id] = -math.inf
    values, ids = similarity.topk(min(k, len(similarity) - 1))
    return list(zip(ids.tolist(), values.tolist()))


@torch.no_grad()
def loss_by_position(
    module: GPT, tokens: Sequence[int], max_windows: int = MAX_WINDOWS, batch_size: int = 8
) -> torch.Tensor:
    """The mean cross-entropy (nats) of the prediction at each position of a window, (T,)
    with T = block_size (or fewer when the text is shorter), over up to max_windows
    non-overlapping windows spread evenly across tokens."""
    tokens = torch.as_tensor(list(tokens))
    T = min(module.config.block_size, len(tokens) - 1)
    if T < 1:
        raise ValueError("the text has fewer than two tokens: nothing to predict")
    count = min(max_windows, (len(tokens) - 1) // T)
    starts = torch.linspace(0, len(tokens) - T - 1, count).long()
    device = next(module.parameters()).device
    total = torch.zeros(T)
    for batch in starts.split(batch_size):
        rows = torch.stack([tokens[s : s + T + 1] for s in batch.tolist()]).to(device)
        logits, _ = module(rows[:, :-1])
        losses = F.cross_entropy(logits.float().transpose(1, 2), rows[:, 1:], reduction="none")
        total += losses.sum(dim=0).cpu()
    return total / count


def head_summary(weights: torch.Tensor) -> dict[str, float]:
    """For one head's (T, T) weights: how far back it looks on average (in tokens), and the
    share of its attention on the token itself, the previous token and the first token (the
    last two over the tokens that have one before them: the first token can only look at
    itself)."""
    T = weights.size(0)
    offsets = (torch.arange(T).unsqueeze(1) - torch.arange(T)).clamp(min=0).float()
    rows = torch.arange(1, T)
    later = T > 1
    return {
        "distance": (weights * offsets).sum(-1).mean().item(),
        "self": weights.diagonal().mean().item(),
        "previous": weights[rows, rows - 1].mean().item() if later else 0.0,
        "first": weights[rows, 0].mean().item() if later else 0.0,
    }


def _draw_attention(weights: torch.Tensor, labels: list[str], path: Path) -> Path:
    Figure, Canvas = _figure_classes()
    n_layer, n_head = weights.shape[:2]
    size = 2.4
    fig = Figure(figsize=(size * n_head + 0.6, size * n_layer + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(n_layer, n_head, squeeze=False)
    ticks = range(len(labels))
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            ax.imshow(weights[layer, head].numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            ax.set_xticks(ticks, labels, fontsize=5, rotation=90)
            ax.set_yticks(ticks, labels, fontsize=5)
    fig.suptitle("attention: row = token attending, column = token attended to")
    return _save(fig, Canvas, path)


def _draw_embeddings(points: torch.Tensor, labelled: list[tuple[int, str]], path: Path) -> Path:
    """Every token a point; labelled, (token id, label) most important first, names those
    that fit: a label whose box would touch one already placed is left out (its point
    stays), so a dense cluster shows a readable few of its names rather than a smudge."""
    Figure, Canvas = _figure_classes()
    fig = Figure(figsize=(7, 7), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.scatter(points[:, 0].numpy(), points[:, 1].numpy(), s=6, alpha=0.4)
    ax.set_xlabel("first principal direction")
    ax.set_ylabel("second principal direction")
    ax.set_title(f"token embeddings ({len(points)} tokens), projected to 2-D")
    Canvas(fig)
    fig.draw_without_rendering()  # the layout, which says where each point lands in pixels,
    fig.set_layout_engine("none")  # kept as it is while the labels go in
    renderer = fig.canvas.get_renderer()
    placed = []
    for token_id, label in labelled:
        text = ax.annotate(label, points[token_id].tolist(), fontsize=7)
        box = text.get_window_extent(renderer).padded(1)
        if any(box.overlaps(other) for other in placed):
            text.remove()
        else:
            placed.append(box)
    return _save(fig, Canvas, path)


def _draw_loss(losses: torch.Tensor, path: Path) -> Path:
    Figure, Canvas = _figure_classes()
    fig = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.plot(range(1, len(losses) + 1), losses.numpy())
    ax.set_xlabel("tokens of context seen (position in the window + 1)")
    ax.set_ylabel("mean loss (nats)")
    ax.set_title("loss per position in the context")
    ax.grid(alpha=0.3)
    return _save(fig, Canvas, path)


def inspect_model(
    module: GPT,
    tokenizer: Tokenizer,
    out_dir: Path,
    prompt_ids: Sequence[int],
    text_tokens: Optional[Sequence[int]] = None,
    skipped_why: str = "no text to score",
) -> Inspection:
    """Draw the three pictures of the module's docstring into out_dir (created if needed;
    files there of the same names are replaced) and write summary.txt. prompt_ids (at most
    block_size tokens) is the prompt whose attention is drawn; text_tokens, the text whose
    loss per position is drawn (without it, that picture is skipped and the summary says
    skipped_why)."""
    _figure_classes()  # matplotlib missing: say so before computing anything
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module.eval()
    config = module.config
    result = Inspection(out_dir)
    labels = [token_label(tokenizer, i) for i in prompt_ids]
    lines = [
        f"model: {config.n_layer} layers x {config.n_head} heads, n_embd {config.n_embd}, "
        f"block_size {config.block_size}, {config.position} positions, vocabulary "
        f"{config.vocab_size}, {module.num_parameters():,} parameters",
        f"prompt ({len(labels)} tokens): {' '.join(labels)}",
    ]
    weights = attention_weights(module, prompt_ids)
    lines += _attention_lines(weights)
    result.files.append(_draw_attention(weights, labels, out_dir / ATTENTION))

    distinct = list(dict.fromkeys(prompt_ids))
    lines += _neighbour_lines(module, tokenizer, distinct)
    result.files.append(
        _draw_embeddings(
            embedding_map(module),
            _tokens_to_label(module, tokenizer, distinct, text_tokens),
            out_dir / EMBEDDINGS,
        )
    )

    lines.append("")
    if text_tokens is None:
        lines.append(f"loss per position: skipped ({skipped_why})")
    else:
        losses = loss_by_position(module, text_tokens)
        lines.append(_loss_line(losses))
        result.files.append(_draw_loss(losses, out_dir / LOSS))

    result.summary = "\n".join(lines) + "\n"
    atomic_write_text(out_dir / SUMMARY, result.summary)
    result.files.append(out_dir / SUMMARY)
    return result


def _attention_lines(weights: torch.Tensor) -> list[str]:
    """The summary's attention section: for each head of weights (layer, head, query,
    key), how far back it looks and its share on the token itself, the previous and first."""
    lines = [
        "",
        "attention (mean over the prompt's tokens): how far back each head looks, and "
        "its share on the token itself, the previous one and the first one",
    ]
    n_layer, n_head = weights.shape[:2]
    for layer in range(n_layer):
        for head in range(n_head):
            s = head_summary(weights[layer, head])
            lines.append(
                f"  layer {layer} head {head}: {s['distance']:5.1f} tokens back, "
                f"self {s['self']:4.0%}, previous {s['previous']:4.0%}, "
                f"first {s['first']:4.0%}"
            )
    return lines


def _neighbour_lines(module: GPT, tokenizer: Tokenizer, distinct: list[int]) -> list[str]:
    """The summary's section on the nearest neighbours of the prompt's first tokens."""
    lines = ["", "nearest neighbours in the embedding (cosine similarity)"]
    for token_id in distinct[:NEIGHBOURS_OF]:
        near = ", ".join(
            f"{token_label(tokenizer, i)} {sim:.2f}" for i, sim in nearest(module, token_id)
        )
        lines.append(f"  {token_label(tokenizer, token_id)}: {near}")
    return lines


def _tokens_to_label(
    module: GPT,
    tokenizer: Tokenizer,
    distinct: list[int],
    text_tokens: Optional[Sequence[int]],
) -> list[tuple[int, str]]:
    """(id, label) of the tokens to name in the embedding map, most important first: the
    prompt's, then the text's commonest (without a text, a word model's ids are in order
    of frequency; others' by id)."""
    vocab_size = module.config.vocab_size
    if vocab_size <= 100:
        others = list(range(vocab_size))
    else:
        others = tokenizer.frequent_ids(LABELLED)
    if text_tokens is not None and len(text_tokens):
        counts = torch.bincount(torch.as_tensor(list(text_tokens)), minlength=vocab_size)
        others.sort(key=lambda i: -counts[i].item())  # stable: ties keep their order
    return [(i, token_label(tokenizer, i)) for i in dict.fromkeys(distinct + others)]


def _loss_line(losses: torch.Tensor) -> str:
    """The summary's line on the loss per position, at 1, 2, 4, ... tokens of context."""
    marks = sorted({1, 2, 4, 8, 16, 32, 64, len(losses)} & set(range(1, len(losses) + 1)))
    return "loss per position (nats), by tokens of context seen: " + ", ".join(
        f"{p}: {losses[p - 1]:.3f}" for p in marks
    )
