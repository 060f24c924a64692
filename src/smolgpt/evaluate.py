"""How well a model predicts a text: loss, perplexity and bits per character.

:func:`evaluate_text` scores every token of a text after the first, each exactly once, and
reports the average cross-entropy (``loss``, in nats per token), its exponential
(``perplexity``) and the total cost spread over the text's characters (``bits_per_char``).

Loss and perplexity are per token, so they compare models of the same tokenizer only: a
word is a harder guess than a character. Bits per character divides by the characters of
the text as the user wrote it, the same number at every level, so it compares a character
model with a word model on the same text.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Callable, ContextManager, Optional, Sequence

import numpy as np
import torch

from . import kernels
from .distributed import Group
from .errors import SmolGPTError
from .model import GPT
from .tokendata import TokenData
from .tokenizer import Tokenizer

# What spelling one UTF-8 byte costs without a model: 8 bits, in nats.
NATS_PER_BYTE = math.log(256)


@dataclass
class Evaluation:
    """The scores of one text (see :func:`evaluate_text`)."""

    loss: float  # mean cross-entropy of the predicted tokens, in nats
    perplexity: float  # exp(loss)
    bits_per_char: float  # total cost in bits / characters of the text
    tokens: int  # tokens of the encoded text (the first is context only)
    chars: int  # characters of the text as given
    unk_tokens: int  # <UNK> tokens of the encoded text (always 0 at character level)

    def to_dict(self) -> dict:
        """The six scores by name, as plain numbers (for JSON)."""
        return asdict(self)


def evaluate_text(module: GPT, tokenizer: Tokenizer, text: str, batch_size: int = 8) -> Evaluation:
    """Score how well ``module`` predicts ``text``.

    Windowing: the encoded text t_0 .. t_{n-1} is cut into windows of block_size + 1 tokens
    that start every block_size tokens (t_0..t_B, t_B..t_2B, ...), so consecutive windows
    share one token. A window's first token is context only; the model reads the window's
    first block_size tokens and predicts each of its successors. Every token after t_0 is
    predicted exactly once, from the tokens of its own window before it (between 1 and
    block_size of them); t_0 is never predicted. The last window may be shorter.

    loss is the mean cross-entropy of the n - 1 predicted tokens in nats, perplexity is
    exp(loss), and bits_per_char is the total cost in bits over len(text), the characters
    as given (before any normalisation).

    <UNK> rule (word level): an <UNK> costs its probability plus 8 bits per UTF-8 byte of
    the (lowercased) word it stands for, so that a model cannot get an unknown word's
    characters for free. The charge is part of bits_per_char only; loss and perplexity are
    the model's own cross-entropy over its vocabulary.

    The module runs in eval mode (restored afterwards) under torch.inference_mode, on
    ``batch_size`` windows at a time; the sums are kept in float64. Raises SmolGPTError for
    a text of fewer than 2 tokens, or (character level) with characters outside the
    vocabulary, and for a batch_size below 1.
    """
    if batch_size < 1:
        raise SmolGPTError(f"batch_size must be at least 1, not {batch_size}")
    if tokenizer.unk_id is None and tokenizer.unknown(text):  # (only char level has any)
        shown = ", ".join(repr(ch) for ch in tokenizer.unknown(text)[:10])
        raise SmolGPTError(
            f"the text has characters the model does not know: {shown}; a "
            "character-level model can score only the characters of its "
            "training text"
        )
    ids = tokenizer.encode(text)
    n = len(ids)
    if n < 2:
        raise SmolGPTError(
            f"text too short to evaluate: {n} token(s); at least 2 are needed "
            "(the first is only context for the rest)"
        )
    unk_tokens = 0 if tokenizer.unk_id is None else ids.count(tokenizer.unk_id)
    unk_bytes = tokenizer.charged_unk_bytes(text)  # t_0 is never predicted nor charged

    nats = _model_nats(module, ids, batch_size)
    loss = nats / (n - 1)
    return Evaluation(
        loss=loss,
        perplexity=math.exp(loss),
        bits_per_char=bits_per_char(loss, n - 1, unk_bytes, len(text)),
        tokens=n,
        chars=len(text),
        unk_tokens=unk_tokens,
    )


def bits_per_char(loss: float, predicted: int, unk_bytes: int, chars: int) -> float:
    """Bits per character of a text of chars characters whose predicted tokens cost loss
    nats each on average, its <UNK> standing for unk_bytes UTF-8 bytes (8 bits each)."""
    return (loss * predicted + unk_bytes * NATS_PER_BYTE) / (math.log(2) * chars)


def window_starts(n_tokens: int, block_size: int, max_windows: Optional[int] = None) -> list[int]:
    """Where the evaluation windows of n_tokens ids start: every block_size tokens, each
    window block_size + 1 tokens long (the last may be shorter), so that every token after
    the first is predicted exactly once (see :func:`evaluate_text`).

    With max_windows below their number, max_windows full windows instead, spread evenly
    over the ids (the same ones every time): what a training run's evaluations score."""
    count = max(n_tokens - 1 + block_size - 1, 0) // block_size  # ceil((n - 1) / B)
    if max_windows is None or count <= max_windows:
        return [k * block_size for k in range(count)]
    full = (n_tokens - 1) // block_size
    return [k * full // max_windows * block_size for k in range(max_windows)]


def score_windows(
    loss: Callable,
    ids: Sequence[int],
    block_size: int,
    starts: list[int],
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    should_stop: Optional[Callable[[], bool]] = None,
) -> Optional[tuple[float, int]]:
    """(sum of the cross-entropies in nats, tokens predicted) over the windows at starts.

    loss(x, y) -> mean loss is a GPT's (kernels.TrainingLoss, or its compiled form) in eval
    mode; ids a 1-D array or tensor, read a window at a time (a memory-mapped split is never
    loaded whole). Windows of equal length go batch_size at a time; a shorter last one goes alone,
    so no padding ever reaches the model. The sum is kept in float64. should_stop is asked
    after every batch: when it says yes, the scoring is abandoned and None returned."""
    n = len(ids)
    windows = [(s, min(s + block_size + 1, n)) for s in starts]
    batches, i = [], 0
    while i < len(windows):
        length = windows[i][1] - windows[i][0]
        j = i
        while j < len(windows) and j - i < batch_size and windows[j][1] - windows[j][0] == length:
            j += 1
        batches.append(windows[i:j])
        i = j
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            rows = torch.stack(
                [torch.as_tensor(np.asarray(ids[a:b], dtype=np.int64)) for a, b in batch]
            ).to(device)
            x, y = rows[:, :-1], rows[:, 1:]
            with autocast():
                mean = loss(x, y)
            total += mean.double().item() * y.numel()
            count += y.numel()
            if should_stop is not None and should_stop():
                return None
    return total, count


def score_run(
    loss: Callable,
    data: TokenData,
    block_size: int,
    most: int,
    batch_size: int,
    autocast: Callable[[], ContextManager],
    group: Group,
    device: torch.device,
    should_stop: Callable[[], bool],
    report: Optional[Callable[[int, int], None]] = None,
) -> Optional[dict[str, float]]:
    """A training run's evaluation: {"train", "val": mean loss in nats} of loss(x, y) over
    each split's evaluation windows, at most `most` of them spread evenly (a split that small
    is scored whole, as ``smolgpt eval`` scores it), and with the validation text's size
    known, "val_bits_per_char" too. Under distributed training each rank scores its share of
    the windows and the sums are added up. report(batches scored, batches in all) is called
    after each batch; None as soon as should_stop() says so."""
    splits = {"train": data.train, "val": data.val}
    starts = {
        split: window_starts(len(ids), block_size, most)[group.rank :: group.world_size]
        for split, ids in splits.items()
    }
    total = sum(math.ceil(len(s) / batch_size) for s in starts.values())
    scored_batches = 0

    def after_batch() -> bool:
        nonlocal scored_batches
        scored_batches += 1
        if report is not None:
            report(min(scored_batches, total), total)
        return should_stop()

    out = {}
    for split, ids in splits.items():
        scored = score_windows(
            loss, ids, block_size, starts[split], batch_size, device, autocast, after_batch
        )
        if scored is None:
            return None
        nats, count = group.sum(list(scored), device)
        out[split] = nats / count
    if data.val_chars:
        out["val_bits_per_char"] = bits_per_char(
            out["val"], len(data.val) - 1, data.val_unk_bytes, data.val_chars
        )
    return out


def _model_nats(module: GPT, ids: list[int], batch_size: int) -> float:
    """Sum of -log p(t_j | its window) over j = 1 .. n-1, windowed as evaluate_text says."""
    block = module.config.block_size
    was_training = module.training
    module.eval()  # no dropout
    try:
        nats, _ = score_windows(
            kernels.TrainingLoss(module),  # model(x, y)[1] without all the logits at once
            ids,
            block,
            window_starts(len(ids), block),
            batch_size,
            next(module.parameters()).device,
        )
        return nats
    finally:
        module.train(was_training)
