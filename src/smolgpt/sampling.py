"""Text generation from a trained model: the sampling filters, the token loop, and text that
streams out as it is made.

The token loop (:func:`sample`) runs the prompt through the model once, then feeds one token at
a time while a :class:`~smolgpt.model.KVCache` remembers every earlier position's keys and
values. Once the context is full (block_size tokens), each new token is predicted from the
most recent block_size tokens, recomputed without the cache: a sliding window that shows the
model exactly what it saw in training, a full window, at every step past the boundary. (A
cache cannot slide: every cached key was computed from tokens that have since left the
window.) Past the boundary a token therefore costs one forward pass over the window.

:class:`TextStream` turns the tokens into text: it decodes them as they come, holds back text
that might be the start of a stop string, and ends a sample at its first stop string. The
pieces it gives out join into exactly the final text.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from .config import SampleConfig
from .logprobs import TokenLogprob, score
from .model import GPT, KVCache
from .tokenizer import Tokenizer


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019), as transformers applies it: the score of
    every token already in the text (seen, a bool mask like logits) is divided by penalty if
    positive and multiplied by it if negative, so that penalty > 1 always makes it less likely."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_logits(
    logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> torch.Tensor:
    """Set to -inf every logit outside the top k, outside the top-p probability mass, and of
    probability below min_p times the most likely token's. The most likely token always stays."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token if the tokens more likely than it already reach top_p.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[..., 0] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if min_p > 0.0:
        # p < min_p * p_max  <=>  logit < logit_max + log(min_p): no softmax needed.
        threshold = logits.max(dim=-1, keepdim=True).values + torch.log(torch.tensor(min_p))
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor,
    settings: SampleConfig,
    generator: Optional[torch.Generator] = None,
    seen: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One token per row of logits (B, vocab), as a (B,) tensor: the repetition penalty (on the
    tokens marked in seen), then greedy at temperature 0, else a draw after the filters."""
    logits = logits.float()
    if seen is not None:
        logits = penalize_repetition(logits, seen, settings.repetition_penalty)
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(
        logits / settings.temperature, settings.top_k, settings.top_p, settings.min_p
    )
    probs = torch.softmax(logits, dim=-1)
    # A draw from probs: the argmax of p / E with E ~ Exponential(1) picks token i with
    # probability p_i (the "exponential race"). It is what torch.multinomial(probs, 1) does
    # inside, and gives the same tokens for the same generator, without multinomial's
    # checks of its input, which wait for the values (half the cost of a step's sampling).
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


@torch.inference_mode()
def sample(
    model: GPT, prompt: list[int], settings: SampleConfig
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield settings.max_new_tokens tokens continuing prompt, one (num_samples,) tensor per
    step as soon as each is chosen, with the logits (num_samples, vocab) it was drawn from
    (before the sampling filters); stop iterating to stop generating. The same settings,
    seed included, give the same tokens."""
    if settings.max_new_tokens == 0:
        return  # not even the prompt's forward pass
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    block = model.config.block_size
    rows = settings.num_samples
    context = prompt[-block:]
    # The recent tokens, in a buffer of two windows: when it fills up, its second half
    # moves to the front, so keeping the last block_size tokens costs no copy per step.
    recent = torch.empty(rows, 2 * block, dtype=torch.long, device=device)
    recent[:, : len(context)] = torch.tensor(context, dtype=torch.long, device=device)
    end = len(context)
    seen = None  # which tokens are in each row's text, for the repetition penalty
    if settings.repetition_penalty != 1.0:
        seen = torch.zeros(rows, model.config.vocab_size, dtype=torch.bool, device=device)
        seen[:, prompt] = True
    cache = KVCache(model.config)
    logits, _ = model(recent[:, :end], cache=cache)
    for step in range(settings.max_new_tokens):
        token = next_token(logits[:, -1, :], settings, generator, seen)
        yield token, logits[:, -1, :]
        if step + 1 == settings.max_new_tokens:
            break  # no forward pass for a token nobody will see
        if seen is not None:
            seen[torch.arange(rows, device=device), token] = True
        if end == 2 * block:
            recent[:, :block] = recent[:, block:].clone()
            end = block
        recent[:, end] = token
        end += 1
        if cache.length < block:
            logits, _ = model(token[:, None], cache=cache)
        else:  # the context is full: slide the window, recomputed (see the module docstring)
            logits, _ = model(recent[:, end - block : end])


def generate(
    model: GPT, prompt: list[int], settings: Optional[SampleConfig] = None
) -> list[list[int]]:
    """Continue the token ids of prompt settings.num_samples times (default settings:
    :class:`~smolgpt.config.SampleConfig`'s, the command line's); return only the new ids of
    each. The same settings, seed included, give the same ids."""
    settings = settings or SampleConfig()
    steps = [token for token, _ in sample(model, prompt, settings)]
    if not steps:
        return [[] for _ in range(settings.num_samples)]
    return torch.stack(steps, dim=1).tolist()


class _SampleText:
    """One sample's text as it grows: the decoded continuation, cut at the first stop string,
    and how much of it has been given out."""

    def __init__(self, tokenizer: Tokenizer, prompt: list[int], stops: tuple[str, ...]):
        self.decoder = tokenizer.decoder()
        self.prompt = self.decoder.add(prompt)
        self.stops = stops
        self.longest_stop = max((len(s) for s in stops), default=0)
        self.text = ""  # the continuation so far
        self.shown = 0  # characters of text given out
        self.tokens = 0  # tokens taken, up to and including the one that reached a stop string
        self.stopped = False
        self.finished = False
        # Scored tokens not given out yet, each with where its text ends.
        self.pending: list[tuple[TokenLogprob, int]] = []

    def add(self, token: int, scored: Optional[tuple[float, list]] = None) -> str:
        """Take one new token (and what the model gave it, to be given out by
        :meth:`scored`); return the text that can now be shown."""
        if self.stopped:
            return ""
        self.tokens += 1
        new_text, start = self.decoder.add([token]), len(self.text)
        if scored is not None:
            self.pending.append((TokenLogprob(token, start, *scored), start + len(new_text)))
        self._extend(new_text)
        return self._show(len(self.text) - (0 if self.stopped else self._held_back()))

    def scored(self) -> list[TokenLogprob]:
        """The scored tokens whose text has all been shown since the last call, as the text
        is; once finished, the rest of those whose text begins in the final text (a stop
        string's tokens are left out with it)."""
        if self.finished:
            given = [t for t, _ in self.pending if t.offset < len(self.text) or not self.stopped]
            self.pending = []
            return given
        shown = len(self.pending)
        shown = next((i for i, (_, end) in enumerate(self.pending) if end > self.shown), shown)
        given, self.pending = self.pending[:shown], self.pending[shown:]
        return [t for t, _ in given]

    def _extend(self, new_text: str) -> None:
        """Add new_text, and cut the text at the first stop string."""
        # A stop string ending in the new text started at most longest-1 characters earlier.
        start = max(0, len(self.text) - self.longest_stop + 1)
        self.text += new_text
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.text, self.stopped = self.text[: min(found)], True

    def _held_back(self) -> int:
        """Length of the longest end of text that may be the start of a stop string."""
        return max(
            (
                n
                for s in self.stops
                for n in range(min(len(s) - 1, len(self.text)), 0, -1)
                if self.text.endswith(s[:n])
            ),
            default=0,
        )

    def finish(self) -> str:
        """The text held back, once no token will follow (and, at bpe level, the bytes of a
        character left incomplete, as U+FFFD)."""
        if not self.stopped:
            self._extend(self.decoder.flush())
        self.finished = True
        return self._show(len(self.text))

    def _show(self, end: int) -> str:
        piece, self.shown = self.text[self.shown : end], max(self.shown, end)
        return piece


class TextStream:
    """The text of settings.num_samples samples as it is generated. Iterating gives, for each
    step, one string per sample: first each sample's prompt, then the new text of each
    (often empty). Joined, a sample's pieces are its final text: the prompt and its
    continuation, cut before the first of settings.stop. ``new_tokens`` counts the tokens
    generated so far (``samples[i].tokens`` those of sample i until it stopped, and
    ``samples[i].stopped`` whether a stop string ended it); iteration ends when every sample
    has stopped or max_new_tokens is reached. Stop iterating (or :meth:`close`) to stop
    generating.

    With logprobs (0 or more), each generated token is scored as :mod:`smolgpt.logprobs` says,
    with the logprobs most likely tokens: after each step, ``scored[i]`` holds sample i's
    tokens whose text that step's piece completed (offsets in the continuation), so that the
    tokens given out cover the text given out."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        prompt: list[int],
        settings: SampleConfig,
        logprobs: Optional[int] = None,
    ):
        self.samples = [
            _SampleText(tokenizer, prompt, settings.stop) for _ in range(settings.num_samples)
        ]
        self.new_tokens = 0
        self.prompt = prompt
        self.prompt_tokens = len(prompt)
        self.logprobs = logprobs
        self.scored: list[list[TokenLogprob]] = [[] for _ in self.samples]
        self._tokens = sample(model, prompt, settings)
        self._pieces = self._generate()

    def _generate(self) -> Iterator[list[str]]:
        yield [s.prompt for s in self.samples]
        for tokens, logits in self._tokens:
            self.new_tokens += 1
            scores = [None] * len(self.samples)
            if self.logprobs is not None:
                scores = score(logits, tokens, self.logprobs)
            pieces = [s.add(t, sc) for s, t, sc in zip(self.samples, tokens.tolist(), scores)]
            self.scored = [s.scored() for s in self.samples]
            yield pieces
            if all(s.stopped for s in self.samples):
                break
        pieces = [s.finish() for s in self.samples]
        self.scored = [s.scored() for s in self.samples]
        yield pieces

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> list[str]:
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating (the model is not run again)."""
        self._pieces.close()
        self._tokens.close()
