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

import math
from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F

from .errors import SmolGPTError
from .model import GPT
from .tokenizer import Tokenizer, WordTokenizer

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
    ids = tokenizer.encode(text)  # names any characters outside the vocabulary
    n = len(ids)
    if n < 2:
        raise SmolGPTError(
            f"text too short to evaluate: {n} token(s); at least 2 are needed "
            "(the first is only context for the rest)"
        )
    unk_tokens, unk_nats = 0, 0.0
    if isinstance(tokenizer, WordTokenizer):
        # encode maps each word of split() to one id, so the two lists line up.
        words = WordTokenizer.split(tokenizer.read(text))
        unk_tokens = sum(i == WordTokenizer.UNK_ID for i in ids)
        unk_bytes = sum(len(words[j].encode("utf-8"))
                        for j in range(1, n) if ids[j] == WordTokenizer.UNK_ID)
        unk_nats = unk_bytes * NATS_PER_BYTE  # t_0 is never predicted, so never charged

    nats = _model_nats(module, torch.tensor(ids), batch_size)
    loss = nats / (n - 1)
    return Evaluation(
        loss=loss,
        perplexity=math.exp(loss),
        bits_per_char=(nats + unk_nats) / (math.log(2) * len(text)),
        tokens=n,
        chars=len(text),
        unk_tokens=unk_tokens,
    )


def _model_nats(module: GPT, ids: torch.Tensor, batch_size: int) -> float:
    """Sum of -log p(t_j | its window) over j = 1 .. n-1, windowed as evaluate_text says."""
    block = module.config.block_size
    ids = ids.to(next(module.parameters()).device)
    n = ids.numel()
    full = (n - 1) // block  # windows with all block_size predictions
    # Window k reads t_{kB} .. t_{kB+B-1} and predicts t_{kB+1} .. t_{kB+B}.
    inputs = ids[:full * block].view(full, block)
    targets = ids[1:full * block + 1].view(full, block)
    batches = [(inputs[k:k + batch_size], targets[k:k + batch_size])
               for k in range(0, full, batch_size)]
    if full * block < n - 1:  # a shorter last window, on its own: no padding reaches the model
        batches.append((ids[full * block:n - 1][None], ids[full * block + 1:][None]))

    was_training = module.training
    module.eval()  # no dropout
    try:
        total = 0.0
        with torch.inference_mode():
            for x, y in batches:
                logits, _ = module(x)
                # float64: a float32 sum over a long text would lose digits.
                total += F.cross_entropy(logits.flatten(0, 1).double(), y.flatten(),
                                         reduction="sum").item()
        return total
    finally:
        module.train(was_training)
