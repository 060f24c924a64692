"""Faster ways to compute parts of the model, chosen by measurement on CPUs, and the one
place they go in.

``model.py`` says *what* a GPT computes, in plain PyTorch; this module holds the places where
*how* it is computed matters for speed. :func:`use_fast_kernels` swaps them into a built
model (the trainer, and ``interop.load_source`` for every model ``smolgpt.load`` reads),
and :class:`TrainingLoss` is the training loss without the logits. Each computes what the
plain module it replaces computes (tests/test_kernels.py checks outputs and gradients);
``benchmarks/step_profile.py --kernels`` times each against it, ``benchmarks/generation.py``
the generation step, and docs/performance.md ("What makes the difference on a CPU") gives
the speed-ups:

- :class:`Dropout`: ``nn.Dropout`` with a cheaper random mask on CPUs;
- :class:`GELU`: ``nn.GELU()``, without oneDNN's fixed cost on the small inputs of a
  generation step;
- :class:`FusedAttention`: ``model.Attention`` (softmax(q k^T / sqrt(hs)) v written out) as
  ``F.scaled_dot_product_attention``, a fused kernel that never holds the (T, T) weights;
  under CPU bf16 autocast, written out in bf16 where the weights are small (faster there
  than any fused kernel), else the fused kernel in float32;
- :class:`TrainingLoss`: ``model(idx, targets)[1]``, the head's cross-entropy made a chunk of
  rows at a time when the logits are large (word level), so they are never all held at once.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from .model import GPT, Attention

# Logits per chunk of the head loss: 2^20 float32 = 4 MB, which stays in cache...
LOSS_CHUNK_ELEMENTS = 1 << 20
# ...but no fewer rows than this: every chunk adds a pass over the head's whole gradient
# (vocab x C floats), which at a large vocabulary costs more than the chunk's products (at
# GPT-2's 50,257 tokens, 20 rows a chunk made the loss 4.5x slower than 256; step_profile.py
# --kernels).
LOSS_CHUNK_MIN_ROWS = 256
# On a GPU, where no cache holds a chunk, logits are chunked only to bound the memory they
# take: 2^28 float32 (1 GB) at a time.
GPU_LOSS_CHUNK_ELEMENTS = 1 << 28
# PyTorch's grain size: below this many numbers its elementwise kernels use one thread.
SMALL_ELEMENTS = 32768


class Dropout(nn.Dropout):
    """nn.Dropout, with a faster mask on CPUs.

    PyTorch's CPU dropout draws one random number per element, and drawing is most of its
    cost. Here one 64-bit draw makes four 15-bit numbers, each compared with p * 2^15 to
    decide whether its element is kept. Elsewhere (CUDA) PyTorch's fused kernel is used.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        draws = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_()
        # random_() fills int64 with 63 random bits; masking the top bit of each 16-bit
        # quarter leaves four uniform numbers in [0, 2^15).
        quarters = (draws & 0x7FFF_7FFF_7FFF_7FFF).view(torch.int16)[: x.numel()].view(x.shape)
        keep = quarters >= round(self.p * 2**15)
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))


class GELU(nn.GELU):
    """nn.GELU(): x * Phi(x), exact (with erf), by PyTorch's own kernel on small CPU inputs.

    On a CPU, F.gelu hands every float32 tensor to oneDNN, whose fixed cost (some 50 us a
    call on a 2-core development machine, and a wake-up of every thread, which waits for a
    free core on a busy machine) is nothing next to a training batch but a large part of a
    generation step, where a layer has a few hundred numbers per sequence. Below
    SMALL_ELEMENTS numbers, oneDNN is switched off for the call, and F.gelu runs PyTorch's
    own vectorised kernel (the same function, to float rounding) on the calling thread.
    (The switch is process-wide: an op that another thread runs at that moment takes
    PyTorch's own kernels too, as correct.)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small_on_cpu = x.device.type == "cpu" and x.numel() < SMALL_ELEMENTS
        # (Flags frozen by torch.backends.disable_global_flags() cannot be switched.)
        if not small_on_cpu or not torch.backends.mkldnn.enabled or torch.backends.flags_frozen():
            return F.gelu(x)
        torch.backends.mkldnn.enabled = False
        try:
            return F.gelu(x)
        finally:
            torch.backends.mkldnn.enabled = True


class FusedAttention(Attention):
    """model.Attention by the fastest CPU kernel measured for its size.

    - float32 (and on GPUs): F.scaled_dot_product_attention, one fused kernel (flash or
      memory-efficient where the hardware has them) that never holds the (T, T) weights.
    - Under CPU bf16 autocast, PyTorch's fused kernel is 2-3x slower in bf16 than in float32
      at contexts of 64-128. Where the weights are small (``small_elements``, ``small_keys``),
      the plain expression in bf16 beats even the float32 fused kernel, by 1.4-2.2x forward
      and backward at nano to tiny shapes (``benchmarks/step_profile.py --kernels``): two
      batched matrix products and a softmax, the mask added inside the first. Longer
      contexts convert q, k and v to float32 for the fused kernel (which skips the masked
      half of the weights) and the result back.
    """

    # The largest attention weights (batch x heads x queries x keys) written out in bf16, and
    # the most keys: 2^25 numbers are 64 MB per layer, kept for the backward pass; past 512
    # keys the fused kernel's skipping of the masked half wins (at 1024: 1.04-1.13x faster).
    small_elements = 1 << 25
    small_keys = 512

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        T, Tk = q.size(2), k.size(2)
        if not self.causal or T == 1:  # one new token may see everything before it
            mask, causal = None, False
        elif T == Tk:  # no cache: the kernel's own causal mask, its fastest path
            mask, causal = None, True
        else:  # new token i sits at position Tk - T + i and may see keys 0 .. Tk - T + i
            mask, causal = self.visible(T, Tk, q.device), False
        if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            dtype, reduced = q.dtype, torch.get_autocast_dtype("cpu")
            with torch.autocast("cpu", enabled=False):
                if self.is_small(q, k):
                    visible = self.visible(T, Tk, q.device) if causal else mask
                    y = self.small(*(t.to(reduced) for t in (q, k, v)), visible)
                else:
                    q, k, v = (t.float() for t in (q, k, v))
                    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            return y.to(dtype)
        # No context manager otherwise: entering even a null one costs a few microseconds per
        # layer, which a generation step at batch 1 notices.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    def is_small(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        """Whether the attention of q over k (B, nh, T|Tk, hs) is written out under CPU
        autocast rather than fused."""
        B, nh, T, _ = q.shape
        Tk = k.size(2)
        return Tk <= self.small_keys and B * nh * T * Tk <= self.small_elements

    @staticmethod
    def visible(T: int, Tk: int, device: torch.device) -> torch.Tensor:
        """(T, Tk) booleans: which keys each of the last T queries may see."""
        rows = torch.arange(T, device=device).unsqueeze(1) + (Tk - T)
        return torch.arange(Tk, device=device) <= rows

    @staticmethod
    def small(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible=None) -> torch.Tensor:
        """softmax(q k^T / sqrt(hs)) v written out, in the dtype of q, k, v (B, nh, T|Tk, hs);
        visible: the (T, Tk) booleans of :meth:`visible`, or None where every key is seen."""
        B, nh, T, hs = q.shape
        q, k, v = (t.reshape(B * nh, -1, hs) for t in (q, k, v))
        scale = 1.0 / math.sqrt(hs)
        if visible is not None:  # -inf where a key is hidden, added to the scores
            hidden = torch.zeros(visible.shape, dtype=q.dtype, device=q.device)
            hidden.masked_fill_(~visible, float("-inf"))
            scores = torch.baddbmm(hidden, q, k.transpose(1, 2), alpha=scale)
        else:
            scores = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
        return torch.bmm(scores.softmax(dim=-1), v).view(B, nh, T, hs)


class ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ weight.T (N x vocab) against targets (N), made a
    chunk of rows at a time without ever holding all the logits.

    At word level the logits are large (4096 tokens x 3171 words = 52 MB in float32), and the
    ordinary path makes several passes over them (cast, log-softmax, its gradient, cast back),
    each from main memory. Here each chunk is turned into logits, loss and gradient while it
    is in cache. The gradient of the mean loss with respect to a row of logits is
    (softmax(row) - onehot(target)) / N, known as soon as the loss is, so the gradients of x
    and weight are computed in the forward pass and backward only scales them.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, dtype: torch.dtype, rows: int, grad_enabled: bool):
        """x (N, C), weight (vocab, C), targets (N,); the matrix products run in dtype.
        grad_enabled: torch.is_grad_enabled() of the caller (inside forward it is off)."""
        n = x.size(0)
        need_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        xs, w = x.to(dtype), weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if need_grad else None
        grad_w = torch.zeros_like(weight) if need_grad else None  # summed over chunks
        for start in range(0, n, rows):
            xc, tc = xs[start : start + rows], targets[start : start + rows, None]
            logits = (xc @ w.t()).float()  # (rows, vocab), in float32: a bf16 softmax loses digits
            log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
            loss += (log_norm - logits.gather(1, tc)).sum()  # -log softmax at the targets
            if need_grad:
                probs = logits.sub_(log_norm).exp_()  # softmax, in place of the logits
                probs.scatter_add_(1, tc, probs.new_full(tc.shape, -1.0))  # minus onehot
                grad = probs.to(dtype)
                grad_x[start : start + rows] = grad @ w
                grad_w += grad.t() @ xc
        if need_grad:
            ctx.save_for_backward(grad_x, grad_w)
        ctx.n = n
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        scale = grad_loss / ctx.n
        return grad_x * scale, grad_w * scale, None, None, None, None


def head_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_elements: int = LOSS_CHUNK_ELEMENTS,
    min_rows: int = LOSS_CHUNK_MIN_ROWS,
) -> torch.Tensor:
    """Mean cross-entropy of the output head's logits x @ weight.T (x: (N, C) final hidden
    states) against targets (N,): ``F.cross_entropy(F.linear(x, weight), targets)``, by
    :class:`ChunkedHeadLoss` when the logits would hold more than chunk_elements numbers
    (on a GPU, GPU_LOSS_CHUNK_ELEMENTS at least), in chunks of min_rows rows at least."""
    if x.device.type != "cpu":
        chunk_elements = max(chunk_elements, GPU_LOSS_CHUNK_ELEMENTS)
    rows = max(1, min_rows, chunk_elements // weight.size(0))
    if x.size(0) <= rows:  # the logits are small: the ordinary path is faster
        return F.cross_entropy(F.linear(x, weight), targets)  # float32 under autocast
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    return ChunkedHeadLoss.apply(x, weight, targets, dtype, rows, torch.is_grad_enabled())


@torch.no_grad()
def rows_loss(
    x: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_elements: int
) -> torch.Tensor:
    """Mean cross-entropy of head(x) (x: (N, C)) against targets (N,), made a chunk of rows at
    a time, so that the logits are never all held at once; no gradient. For a head without a
    float matrix to multiply by, such as an int8 one (quantize.py)."""
    rows = max(1, chunk_elements // head.out_features)
    total = sum(
        F.cross_entropy(head(x[i : i + rows]).float(), targets[i : i + rows], reduction="sum")
        for i in range(0, x.size(0), rows)
    )
    return total / x.size(0)


class TrainingLoss(nn.Module):
    """model(idx, targets)[1], the mean loss, with the head's loss by :func:`head_loss` (by
    :func:`rows_loss` for an int8 head, which only scores): at word level the logits of a
    training batch are never all held at once.

    A module of its own rather than a method of the model, so that what wraps it for
    training (DistributedDataParallel, torch.compile) sees an ordinary forward; its
    parameters are the model's."""

    # The largest logits the loss is made from in one piece, and the fewest rows of a chunk.
    chunk_elements = LOSS_CHUNK_ELEMENTS
    min_chunk_rows = LOSS_CHUNK_MIN_ROWS

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.model.hidden_states(idx).flatten(0, 1)
        head = self.model.lm_head
        if not isinstance(head.weight, torch.Tensor):  # int8 (quantize.py): no float matrix
            return rows_loss(x, head, targets.flatten(), self.chunk_elements)
        return head_loss(
            x, head.weight, targets.flatten(), self.chunk_elements, self.min_chunk_rows
        )


def use_fast_kernels(model: nn.Module) -> nn.Module:
    """Swap this module's faster versions into model, in place, and return it: every
    nn.Dropout becomes a :class:`Dropout`, every exact nn.GELU a :class:`GELU`, every
    model.Attention a :class:`FusedAttention`. No parameters or buffers change: the state
    dict, and what it computes, stay the same."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                fast = Dropout(child.p)
            elif type(child) is nn.GELU and child.approximate == "none":
                fast = GELU()
            elif type(child) is Attention:
                fast = FusedAttention(child.causal)
            else:
                continue
            setattr(parent, name, fast.train(child.training))
    return model
