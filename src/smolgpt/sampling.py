"""Text generation from a trained model: temperature, top-k and top-p (nucleus) sampling.

Generation runs the prompt through the model once, then feeds one token at a time while a
:class:`~smolgpt.model.KVCache` remembers every earlier position's keys and values. The
model's learned position embeddings stop at block_size, so when the context is full the
cache is rebuilt from the most recent half-context and generation goes on from there.
"""

from __future__ import annotations

from typing import Optional

import torch

from .config import SampleConfig
from .model import GPT, KVCache


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top k and outside the top-p probability mass."""
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
    return logits


def next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: Optional[torch.Generator]) -> torch.Tensor:
    """Choose one token per row of logits (B, vocab); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


@torch.no_grad()
def generate(model: GPT, prompt: list[int], settings: Optional[SampleConfig] = None
             ) -> list[list[int]]:
    """Continue the token ids of prompt settings.num_samples times (default settings:
    :class:`~smolgpt.config.SampleConfig`'s, the command line's); return only the new ids of
    each. The same settings, seed included, give the same ids."""
    cfg = settings or SampleConfig()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    block = model.config.block_size
    tokens = torch.tensor([prompt] * cfg.num_samples, dtype=torch.long, device=device)
    out = tokens.new_empty((cfg.num_samples, 0))
    cache: Optional[KVCache] = None
    pending = tokens  # tokens the model has not seen yet
    for _ in range(cfg.max_new_tokens):
        if cache is None or cache.length + pending.size(1) > block:
            # (Re)start from the most recent context: all of it, or half a block once full.
            keep = block if cache is None else max(1, block // 2)  # (block_size 1: keep 1)
            history = torch.cat([tokens, out], dim=1)[:, -keep:]
            cache, pending = KVCache(model.config), history
        logits, _ = model(pending, cache=cache)
        nxt = next_token(logits[:, -1, :], cfg.temperature, cfg.top_k, cfg.top_p, generator)
        out = torch.cat([out, nxt], dim=1)
        pending = nxt
    return out.tolist()
