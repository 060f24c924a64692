"""Faster ways to compute four parts of the model, chosen by measurement on CPUs.

``model.py`` says *what* a GPT computes; this module holds the places where *how* it is
computed matters for speed, each a drop-in for the plain PyTorch expression named in its
docstring (``benchmarks/step_profile.py --kernels`` times each against it, and
``benchmarks/generation.py`` the generation step):

- :class:`Dropout`: ``nn.Dropout`` with a cheaper random mask on CPUs;
- :class:`GELU`: ``nn.GELU()``, without oneDNN's fixed cost on the small inputs of a
  generation step;
- :func:`attention_input` and :func:`attention`: ``F.scaled_dot_product_attention``, run in
  float32 on a CPU under bf16 autocast, where the fused kernel is fast only in float32;
- :func:`head_loss`: ``F.cross_entropy(x @ weight.T, targets)``, made a chunk of rows at a time
  when the logits are large (word level), so they are never all held at once.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F

# Logits per chunk of the head loss: 2^20 float32 = 4 MB, which stays in cache.
LOSS_CHUNK_ELEMENTS = 1 << 20
# PyTorch's grain size: below this many numbers its elementwise kernels use one thread.
SMALL_ELEMENTS = 32768


class Dropout(nn.Module):
    """nn.Dropout, with a faster mask on CPUs.

    PyTorch's CPU dropout draws one random number per element, and drawing is most of its
    cost. Here one 64-bit draw makes four 15-bit numbers, each compared with p * 2^15 to
    decide whether its element is kept. Elsewhere (CUDA) PyTorch's fused kernel is used.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

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

    def extra_repr(self) -> str:
        return f"p={self.p}"


class GELU(nn.Module):
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


def attention_input(qkv: torch.Tensor) -> torch.Tensor:
    """The queries, keys and values (one tensor) in the dtype attention should run in.

    On a CPU the fused attention kernel is fast only in float32 (in bf16 it is 2-4x slower
    at these sizes), so under CPU autocast they are converted to float32, once for all three;
    the rotation of rotary positions then runs in float32 too."""
    on_cpu_bf16 = qkv.device.type == "cpu" and qkv.dtype == torch.bfloat16
    return qkv.float() if on_cpu_bf16 else qkv


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], causal: bool
) -> torch.Tensor:
    """F.scaled_dot_product_attention (fused flash / memory-efficient kernels where the
    hardware has them), kept in the inputs' dtype: float32 inputs on a CPU are not cast back
    to bf16 by autocast (see :func:`attention_input`)."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    # No context manager otherwise: entering even a null one costs a few microseconds per
    # layer, which a generation step at batch 1 notices.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


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
) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(logits, mean cross-entropy) of the output head x @ weight.T (x: (N, C) final hidden
    states) against targets (N,). When the logits would hold more than chunk_elements
    numbers, the loss is made by :class:`ChunkedHeadLoss` and logits is None."""
    rows = max(1, chunk_elements // weight.size(0))
    if x.size(0) <= rows:  # the logits are small: the ordinary path is faster
        logits = F.linear(x, weight)
        # In float32 at least, even under autocast: a bf16 log-softmax loses digits.
        return logits, F.cross_entropy(
            logits.to(torch.promote_types(logits.dtype, torch.float32)), targets
        )
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    return None, ChunkedHeadLoss.apply(x, weight, targets, dtype, rows, torch.is_grad_enabled())
