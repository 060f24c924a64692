"""Log-probabilities of tokens under a model, in the shape of OpenAI's (legacy) completions API.

A token's log-probability is of the model's own distribution: the log_softmax of its logits,
before any sampling filter (repetition penalty, temperature, top-k, top-p, min-p). With it
come the ``top`` most likely tokens at that position, and the token itself where it is not
among them, as OpenAI does ("up to logprobs + 1 elements").

A prompt is scored in :func:`smolgpt.evaluate.evaluate_text`'s windows: block_size + 1 tokens
starting every block_size tokens, each token predicted from the tokens of its window before
it; the first token is predicted by nothing (log-probability None). Generated tokens are
scored by :mod:`smolgpt.sampling` from the logits each was drawn from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch

from .evaluate import window_starts
from .model import GPT
from .tokenizer import Tokenizer


@dataclass
class TokenLogprob:
    """One token of a text, where its text begins, and what the model gave it."""

    token: int
    offset: int  # where the token's text begins in the text
    logprob: Optional[float]  # None where nothing predicts it (a prompt's first token)
    top: Optional[list[tuple[int, float]]]  # (id, log-probability), most likely first


def score(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[tuple[float, list]]:
    """(log-probability of tokens[i], its top list) for each row i of logits (N, vocab): the
    top most likely (id, log-probability), most likely first, then tokens[i] if not among
    them."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens.view(-1, 1).to(logp.device))[:, 0].tolist()
    values, ids = logp.topk(min(top, logp.size(-1)), dim=-1)
    out = []
    for token, lp, row_ids, row_values in zip(
        tokens.tolist(), chosen, ids.tolist(), values.tolist()
    ):
        best = list(zip(row_ids, row_values))
        out.append((lp, best if token in row_ids else [*best, (token, lp)]))
    return out


def text_offsets(tokenizer: Tokenizer, ids: Sequence[int]) -> list[int]:
    """Where each token's text begins in the text of ids, decoded as a stream decodes them (a
    token that ends inside a character begins where that character does)."""
    decoder, at, out = tokenizer.decoder(), 0, []
    for token in ids:
        out.append(at)
        at += len(decoder.add([token]))
    return out


@torch.inference_mode()
def prompt_logprobs(
    module: GPT, tokenizer: Tokenizer, ids: Sequence[int], top: int
) -> Iterator[list[TokenLogprob]]:
    """The tokens of a prompt, scored (see the module docstring), one window at a time so
    that a caller can take turns between them: first the first token, unscored, then each
    window's predicted tokens. module is in eval mode."""
    offsets = text_offsets(tokenizer, ids)
    yield [TokenLogprob(ids[0], 0, None, None)]
    block = module.config.block_size
    device = next(module.parameters()).device
    for start in window_starts(len(ids), block):
        window = torch.tensor(ids[start : start + block + 1], dtype=torch.long, device=device)
        logits, _ = module(window[None, :-1])
        scored = score(logits[0], window[1:], top)
        yield [
            TokenLogprob(token, offsets[i], lp, best)
            for i, token, (lp, best) in zip(
                range(start + 1, start + len(window)), window[1:].tolist(), scored
            )
        ]


def report(
    tokenizer: Tokenizer, entries: Sequence[TokenLogprob], shift: int = 0
) -> dict[str, list[Any]]:
    """entries in OpenAI's shape: tokens (each token's text alone, tokenizer.decode([id]); a
    byte-level token inside a character reads U+FFFD), token_logprobs, top_logprobs ({text:
    log-probability}, most likely first; of tokens of the same text, the likelier) and
    text_offset (each offset plus shift)."""
    return {
        "tokens": [tokenizer.decode([e.token]) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [None if e.top is None else _by_text(tokenizer, e.top) for e in entries],
        "text_offset": [e.offset + shift for e in entries],
    }


def _by_text(tokenizer: Tokenizer, top: list[tuple[int, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for token, lp in top:
        out.setdefault(tokenizer.decode([token]), lp)
    return out
