"""A GPT-2-style language model, from scratch.

Reads top to bottom like the GPT-2 paper: token embeddings feed a stack of pre-LayerNorm
transformer blocks (causal multi-head self-attention, then a 4x-wide GELU MLP, each wrapped in
a residual connection), a final LayerNorm, and an output head that shares its weights with the
token embedding (unless ``ModelConfig.tie_embeddings`` is off).

Where each token sits is told to the model in one of two ways (``ModelConfig.position``):
GPT-2's learned position embeddings, added to the token embeddings, or rotary embeddings
(RoPE, Su et al. 2021), which rotate each head's queries and keys by an angle proportional to
the position, so that attention scores depend on how far apart two tokens are. Rotary is the
default: a model knows "the previous character" from the first step instead of having to
learn it position by position, and small models train markedly faster with it
(benchmarks/RESULTS.md).

For generation, :class:`KVCache` keeps every layer's keys and values so that each new token
costs one position of work instead of re-running the whole context.

Every computation here is the plain PyTorch expression: ``nn.Dropout``, ``nn.GELU``, attention
written out as softmax(q k^T / sqrt(hs)) v, and ``F.cross_entropy`` of the logits. Faster
versions of some of them live in ``kernels.py``, and ``kernels.use_fast_kernels`` swaps them
into a model once it is built (the trainer and the model loader do); they compute the
same numbers (tests/test_kernels.py), so this file can be read without them.

Shapes in comments: B batch, T time (tokens), C channels (n_embd), nh heads, hs head size.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to block_size.
    It knows its own position: ``length`` advances once the last layer has stored the keys
    and values of new tokens."""

    def __init__(self, config: ModelConfig):
        self.n_layer, self.block_size = config.n_layer, config.block_size
        self.keys: Optional[torch.Tensor] = None  # (n_layer, B, nh, block_size, hs)
        self.values: Optional[torch.Tensor] = None
        self.length = 0  # positions filled; the next token goes at this position

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, nh, T, hs) after the cached ones; return all keys and values so far."""
        if self.keys is None:  # allocate on first use, in the dtype k and v arrive in
            B, nh, _, hs = k.shape
            shape = (self.n_layer, B, nh, self.block_size, hs)
            self.keys = k.new_zeros(shape)
            self.values = v.new_zeros(shape)
        start, end = self.length, self.length + k.size(2)
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        if layer == self.n_layer - 1:  # every layer has seen the new tokens
            self.length = end
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


def rotary_tables(block_size: int, head_size: int, base: float = 10000.0):
    """cos and sin of the rotation angles, each (block_size, head_size).

    Channel i of a head and channel i + head_size/2 form a plane; at position t it turns by
    the angle t * base^(-2i / head_size), fast for the first planes and slow for the last,
    so that near and far offsets are both distinguishable. Both halves of a row hold the
    same angles; sin is negated in the first half, which is what :func:`apply_rotary` needs.
    """
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)
    return torch.cat((angles.cos(), angles.cos()), -1), torch.cat((-angles.sin(), angles.sin()), -1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys (..., hs) by the angles of their positions (cos and sin from
    :func:`rotary_tables`, broadcast against x). Each plane (x1, x2) of channels i and
    i + hs/2 becomes (x1 cos - x2 sin, x2 cos + x1 sin); q.k then depends only on the offset
    between the two positions. Written as x * cos + swap_halves(x) * sin: four operations,
    swapping the halves being a roll by half a head."""
    if cos.dtype != x.dtype:  # half-precision queries and keys (autocast on a GPU)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin


class Attention(nn.Module):
    """softmax(q k^T / sqrt(hs)) v for every head, each token seeing only itself and the
    tokens before it (unless causal is off). No parameters: the weights that make q, k and v
    belong to :class:`CausalSelfAttention`.

    The queries are the last T of the keys' positions: all of them in training, the new
    tokens when keys and values come from a :class:`KVCache`.
    """

    def __init__(self, causal: bool = True):
        super().__init__()
        self.causal = causal

    def weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The attention weights (B, nh, T, Tk) of queries q (B, nh, T, hs) over keys k
        (B, nh, Tk, hs): row i is how much query i takes from each key."""
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, Tk)
        if self.causal:
            T, Tk = q.size(2), k.size(2)
            # Query i sits at position Tk - T + i and may not see the keys after it.
            future = torch.ones(T, Tk, dtype=torch.bool, device=q.device).triu(Tk - T + 1)
            scores = scores.masked_fill(future, float("-inf"))
        return scores.softmax(dim=-1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.weights(q, k) @ v  # (B, nh, T, hs): a weighted average of the values

    def extra_repr(self) -> str:
        return f"causal={self.causal}"


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        # One matrix computes queries, keys and values for all heads at once.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # causal=False only as an exercise (--no-causal).
        # No dropout on the attention weights: it would force the slow unfused path on CPUs,
        # and dropout on the residual branches (below, and in the MLP) regularises enough.
        self.attention = Attention(config.causal)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def split_heads(self, qkv: torch.Tensor, rotary=None):
        """Queries, keys and values (B, T, 3C) as three (B, nh, T, hs) tensors, queries and
        keys rotated to their positions when rotary is given."""
        B, T, C3 = qkv.shape
        C = C3 // 3
        # split, not indexing: the backward of a split joins the gradients in one pass, where
        # that of an index first fills a zero tensor the size of qkv.
        qk, v = qkv.split([2 * C, C], dim=-1)
        qk = qk.view(B, T, 2, self.n_head, C // self.n_head)
        if rotary is not None:  # before caching: cached keys keep their own positions' angles
            qk = apply_rotary(qk, *rotary)  # queries and keys in one go
        q, k = qk.unbind(2)
        # (B, T, nh, hs) -> (B, nh, T, hs): each head attends independently.
        return tuple(t.transpose(1, 2) for t in (q, k, v.view(B, T, self.n_head, C // self.n_head)))

    def attention_weights(self, x: torch.Tensor, rotary=None) -> torch.Tensor:
        """Every head's attention weights (B, nh, T, T) for x (the block's normalised input),
        in float32: what forward averages the values with, to look inside a model (smolgpt
        inspect, docs/tour.md)."""
        q, k, _ = self.split_heads(self.c_attn(x).float(), rotary)
        return self.attention.weights(q, k)

    def forward(
        self, x: torch.Tensor, rotary=None, cache: Optional[KVCache] = None, layer: int = 0
    ):
        """rotary: the (cos, sin) rows of this chunk's positions, or None (learned positions)."""
        B, T, C = x.shape
        q, k, v = self.split_heads(self.c_attn(x), rotary)  # each (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, past + T, hs)
        y = self.attention(q, k, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # Exact (erf) GELU by default: GPT-2 used a tanh approximation, which costs twice as
        # much in bf16 on CPUs (benchmarks/step_profile.py --kernels); a model started from
        # GPT-2's weights keeps it (activation "gelu_tanh"), since they were trained with it.
        self.gelu = nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm block: normalise, transform, add back to the residual stream."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rotary=None, cache: Optional[KVCache] = None, layer: int = 0):
        x = x + self.attn(self.ln_1(x), rotary, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    # Gradient checkpointing (--gradient_checkpointing) trades compute for memory. When on,
    # a training forward keeps only each block's input for the backward pass, not the
    # activations inside the block (attention, the 4x-wide MLP, dropout masks); the backward
    # pass runs each block's forward again, one block at a time, to get them back. The
    # activations held at once shrink from every block's to one block's, for about a third
    # more compute per step. Losses and gradients are the same (dropout redraws its masks
    # from the same random state).
    gradient_checkpointing = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding
        if config.position == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)  # position embedding
        else:  # rotary: fixed tables, rebuilt from the config (not saved in checkpoints)
            cos, sin = rotary_tables(config.block_size, config.n_embd // config.n_head)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: reading a token in and writing it out use the same vectors, which
        # saves vocab_size * n_embd parameters and tends to help small models.
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

        self.apply(self._init_weights)
        # GPT-2: every block adds two projections onto the residual stream, so the stream's
        # variance grows with depth; shrinking those projections' init by 1/sqrt(2 * n_layer)
        # keeps it roughly constant at the start of training.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Trainable parameters, counting a tied embedding/head matrix once."""
        return sum(p.numel() for p in self.parameters())

    def rotary(self, start: int, T: int):
        """The (cos, sin) rows of positions start .. start + T - 1, shaped (T, 1, 1, hs) to
        broadcast over the (B, T, 2, nh, hs) queries and keys; None with learned positions."""
        if self.config.position == "learned":
            return None
        return tuple(
            t[start : start + T].view(T, 1, 1, -1) for t in (self.rotary_cos, self.rotary_sin)
        )

    def forward(
        self,
        idx: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
    ):
        """(logits, loss) for token ids idx (B, T).

        logits (B, T, vocab) are the next-token scores at every position; loss is the mean
        cross-entropy against targets (B, T), or None without targets. With a cache, idx
        continues the cached tokens.
        """
        logits = self.lm_head(self.hidden_states(idx, cache))  # (B, T, vocab)
        if targets is None:
            return logits, None
        # (Under autocast, cross_entropy runs in float32: a bf16 log-softmax loses digits.)
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def hidden_states(self, idx: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        """The final hidden states (B, T, C) for token ids idx (B, T), after the last
        LayerNorm: what the output head turns into logits. With ``gradient_checkpointing``
        on, a training forward under autograd returns the same values and gradients, keeping
        less memory until the backward."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}"
            )
        x = self.wte(idx)  # (B, T, C)
        if self.config.position == "learned":
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        rotary = self.rotary(start, T)
        x = self.drop(x)
        # Only a forward that autograd records for a backward has activations to drop; a
        # cache means generation, whose forward never runs backward.
        checkpointing = (
            self.gradient_checkpointing
            and self.training
            and cache is None
            and torch.is_grad_enabled()
        )
        for i, block in enumerate(self.blocks):
            if checkpointing:  # the same RNG state on the rerun: the same dropout masks
                x = checkpoint(block, x, rotary, None, i, use_reentrant=False)
            else:
                x = block(x, rotary, cache, i)
        return self.ln_f(x)

    def optimizer_groups(self, weight_decay: float, exclude=()) -> list[dict]:
        """AdamW parameter groups: decay matrices (weights, embeddings), not biases or norms;
        parameters in ``exclude`` (those another optimiser takes care of) are left out."""
        skip = {id(p) for p in exclude}
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in skip]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The blocks' weight matrices: what Muon optimises (not embeddings, head or vectors)."""
        return [p for p in self.blocks.parameters() if p.dim() == 2 and p.requires_grad]

    def estimate_flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 L T C."""
        c = self.config
        n = self.num_parameters()
        if c.position == "learned":  # a lookup, not a matrix product
            n -= self.wpe.weight.numel()
        return 6 * n + 12 * c.n_layer * c.block_size * c.n_embd
