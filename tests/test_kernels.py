"""kernels.py: each faster version computes what the plain module it replaces computes, and
a model with them swapped in (kernels.use_fast_kernels) gives the plain model's outputs and
gradients."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from smolgpt import kernels
from smolgpt.config import ModelConfig
from smolgpt.kernels import GELU, ChunkedHeadLoss, Dropout, TrainingLoss, head_loss
from smolgpt.model import GPT, Attention, KVCache


def ids(config: ModelConfig, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(config.vocab_size, (batch, length), generator=gen)


# ------------------------------------------------------------------------- the swap


def plain_and_fast(config: ModelConfig) -> tuple[GPT, GPT]:
    torch.manual_seed(0)
    plain = GPT(config).train()
    return plain, kernels.use_fast_kernels(copy.deepcopy(plain))


def test_the_swap_changes_modules_not_weights(tiny_config):
    config = dataclasses.replace(tiny_config, dropout=0.2)
    plain, fast = plain_and_fast(config)
    fast.eval()
    kernels.use_fast_kernels(fast)  # a second time: nothing left to swap
    assert fast.state_dict().keys() == plain.state_dict().keys()
    for (name, a), b in zip(plain.state_dict().items(), fast.state_dict().values()):
        assert torch.equal(a, b), name
    swapped = {type(m) for m in fast.modules()}
    assert {Dropout, GELU, kernels.FusedAttention} <= swapped
    assert not swapped & {torch.nn.Dropout, torch.nn.GELU, Attention}
    assert all(m.p == 0.2 for m in fast.modules() if isinstance(m, Dropout))
    assert not any(m.training for m in fast.modules())  # new modules take the model's mode
    assert [n for n, _ in plain.named_modules()] == [n for n, _ in fast.named_modules()]


# Under bf16 autocast the plain model runs attention in bf16, the fused one in float32.
TOLERANCES = {
    "float32": {"rtol": 1e-4, "atol": 1e-5},
    "bf16 autocast": {"rtol": 5e-2, "atol": 2e-2},
}


@pytest.mark.parametrize("precision", TOLERANCES)
def test_fast_kernels_give_the_plain_models_outputs_and_gradients(tiny_config, precision):
    """Dropout 0: the two dropouts draw their masks differently (their keep rate and scaling:
    test_dropout_keeps_1_minus_p_and_rescales)."""
    plain, fast = plain_and_fast(dataclasses.replace(tiny_config, dropout=0.0))
    x, y = ids(tiny_config, 3, 16), ids(tiny_config, 3, 16, seed=1)
    tol = TOLERANCES[precision]

    def run(forward):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "float32"):
            logits, loss = forward(x, y)
        loss.backward()
        return logits, loss

    def grads(model):
        return {n: p.grad for n, p in model.named_parameters()}

    plain_logits, plain_loss = run(plain)
    fast_logits, fast_loss = run(fast)
    torch.testing.assert_close(fast_logits, plain_logits, **tol)
    torch.testing.assert_close(fast_loss, plain_loss, **tol)
    torch.testing.assert_close(grads(fast), grads(plain), **tol)
    # The training loss of the fast model, its head's loss in chunks of 5 rows.
    fast.zero_grad()
    training_loss = TrainingLoss(fast)
    training_loss.chunk_elements = 5 * tiny_config.vocab_size
    training_loss.min_chunk_rows = 1
    _, chunked = run(lambda x, y: (None, training_loss(x, y)))
    torch.testing.assert_close(chunked, plain_loss, **tol)
    torch.testing.assert_close(grads(fast), grads(plain), **tol)


@pytest.mark.parametrize("causal", [True, False])
def test_fast_kernels_give_the_plain_models_logits_from_a_cache(tiny_config, causal):
    """A prompt, a chunk of three tokens (the mask of a chunk after cached ones), then one."""
    plain, fast = plain_and_fast(dataclasses.replace(tiny_config, causal=causal))
    plain.eval(), fast.eval()
    x = ids(tiny_config, 2, 9)
    caches = KVCache(tiny_config), KVCache(tiny_config)
    with torch.no_grad():
        for start, end in ((0, 5), (5, 8), (8, 9)):
            got, want = (m(x[:, start:end], cache=c)[0] for m, c in zip((fast, plain), caches))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast(x)[0], plain(x)[0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- attention


@pytest.mark.parametrize("small_elements", [1 << 25, 0], ids=["written out", "fused in float32"])
@pytest.mark.parametrize(
    "causal, past",
    [(True, 0), (True, 5), (False, 0)],
    ids=["causal", "after a cache", "bidirectional"],
)
def test_attention_under_cpu_autocast_is_softmax_qk_v(small_elements, causal, past):
    """Either path FusedAttention takes under CPU bf16 autocast (written out in bf16 where the
    weights are small, else the fused kernel in float32) gives the plain expression's output
    and gradients, in bf16; with `past` cached keys, the queries are the last T positions."""
    torch.manual_seed(0)
    B, nh, T, hs = 2, 3, 7, 8
    q = torch.randn(B, nh, T, hs).bfloat16().requires_grad_()
    k, v = (torch.randn(B, nh, past + T, hs).bfloat16().requires_grad_() for _ in range(2))
    attention = kernels.FusedAttention(causal)
    attention.small_elements = small_elements
    assert attention.is_small(q, k) == (small_elements > 0)
    grad_out = torch.randn(B, nh, T, hs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention(q, k, v)
    assert got.dtype == torch.bfloat16
    got.float().backward(grad_out)
    got_grads = [t.grad for t in (q, k, v)]
    inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = Attention(causal)(*inputs)  # the model's own expression, in float64
    want.backward(grad_out.double())
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
    for got_grad, t in zip(got_grads, inputs):
        torch.testing.assert_close(got_grad.double(), t.grad, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("small_elements", [1 << 25, 0], ids=["written out", "fused in float32"])
def test_attention_under_cpu_autocast_answers_in_the_dtype_it_was_given(small_elements):
    """float32 queries (from an int8 layer, which autocast leaves alone) get float32 back,
    whichever dtype the attention is computed in: the next int8 layer takes only float32."""
    attention = kernels.FusedAttention()
    attention.small_elements = small_elements
    q = torch.randn(1, 2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention(q, q, q).dtype == torch.float32
        assert attention(q.bfloat16(), q.bfloat16(), q.bfloat16()).dtype == torch.bfloat16


def test_long_attention_under_autocast_is_fused_not_written_out():
    """Past small_keys keys, or small_elements weights, the written-out weights would cost
    more time or memory than the fused kernel."""
    attention = kernels.FusedAttention()
    short = torch.zeros(1, 1, 64, 8)
    long = torch.zeros(1, 1, attention.small_keys + 1, 8)
    assert attention.is_small(short, short) and not attention.is_small(long, long)
    attention.small_elements = 64 * 64 - 1
    assert not attention.is_small(short, short)


# --------------------------------------------------------------------------- head loss


def test_chunked_head_loss_equals_cross_entropy_and_its_gradients():
    torch.manual_seed(0)
    x = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(7, (10,))
    expected = torch.nn.functional.cross_entropy(x @ weight.t(), targets)
    expected_grads = torch.autograd.grad(2 * expected, (x, weight))
    # 3 rows per chunk: the last chunk is a partial one.
    loss = ChunkedHeadLoss.apply(x, weight, targets, torch.float64, 3, True)
    grads = torch.autograd.grad(2 * loss, (x, weight))  # backward scales by the upstream 2
    torch.testing.assert_close(loss, expected.float())
    for got, want in zip(grads, expected_grads):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # softmax in float32


def test_head_loss_chunks_have_min_rows_at_least(monkeypatch):
    """Each chunk adds a pass over the head's whole gradient: a large vocabulary, which
    would leave few rows in chunk_elements, gets min_rows rows a chunk; where min_rows
    covers the batch, the ordinary path."""
    rows_used = []
    chunked = ChunkedHeadLoss.apply
    monkeypatch.setattr(ChunkedHeadLoss, "apply", lambda *a: rows_used.append(a[4]) or chunked(*a))
    torch.manual_seed(0)
    x, weight, targets = torch.randn(40, 8), torch.randn(7, 8), torch.randint(7, (40,))
    expected = torch.nn.functional.cross_entropy(x @ weight.t(), targets)
    torch.testing.assert_close(head_loss(x, weight, targets, 2 * 7, min_rows=16), expected)
    assert rows_used == [16]  # 2 rows by the elements, 16 by the floor
    torch.testing.assert_close(head_loss(x, weight, targets, 2 * 7, min_rows=64), expected)
    assert rows_used == [16]  # 64 rows cover all 40: no chunks


@pytest.mark.parametrize("autocast", [False, True])
def test_training_loss_is_the_models_loss_in_chunks_or_whole(tiny_config, autocast):
    torch.manual_seed(0)
    model = GPT(tiny_config).train()
    x, y = ids(tiny_config, 3, 16), ids(tiny_config, 3, 16, seed=1)
    training_loss = TrainingLoss(model)

    def loss_and_grads(loss_of):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of(x, y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    whole, whole_grads = loss_and_grads(lambda x, y: model(x, y)[1])  # the plain model's
    # 48 rows x 23 logits: one ordinary cross-entropy, as in the model
    same, same_grads = loss_and_grads(training_loss)
    assert torch.equal(same, whole)
    training_loss.chunk_elements = 5 * tiny_config.vocab_size
    training_loss.min_chunk_rows = 1
    chunked, chunked_grads = loss_and_grads(training_loss)  # 5 rows per chunk
    tol = {"rtol": 2e-2, "atol": 2e-3} if autocast else {"rtol": 1e-4, "atol": 1e-6}
    torch.testing.assert_close(chunked, whole, **tol)
    for got, want in zip(chunked_grads, whole_grads):
        torch.testing.assert_close(got, want, **tol)
    with torch.no_grad():  # evaluation: no gradients made
        loss = training_loss(x, y)
    torch.testing.assert_close(loss, whole, rtol=2e-2, atol=2e-3)


# --------------------------------------------------------------------------- dropout


def test_dropout_keeps_1_minus_p_and_rescales():
    torch.manual_seed(0)
    drop = Dropout(0.2).train()
    x = torch.ones(400, 250, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.8, abs=0.005)
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.8))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # gradient flows through kept elements only
    # Each element's draw is independent of its neighbours': no visible pattern in a row.
    assert 0.7 < kept[:, 0].float().mean().item() < 0.9
    assert 0.7 < kept[:, 3].float().mean().item() < 0.9


def test_dropout_is_seeded_odd_sized_and_off_in_eval():
    x = torch.randn(3, 5, 7, dtype=torch.bfloat16)  # 105 elements: not a multiple of four
    drop = Dropout(0.5).train()
    torch.manual_seed(1)
    a = drop(x)
    torch.manual_seed(1)
    assert torch.equal(drop(x), a) and a.dtype == torch.bfloat16 and a.shape == x.shape
    assert not torch.equal(drop(x), a)  # the next draw differs
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)


@pytest.mark.parametrize("shape", [(1, 1, 192), (16, 64, 512)])  # a generation step; a batch
def test_gelu_kernel_is_exact_gelu_and_leaves_onednn_on(shape):
    x = torch.randn(shape) * 3
    torch.testing.assert_close(GELU()(x), torch.nn.functional.gelu(x))
    assert torch.backends.mkldnn.enabled  # switched off for small inputs only while it runs


def test_the_tanh_gelu_is_not_swapped_for_the_exact_one(tiny_config):
    """GPT-2's tanh approximation (activation gelu_tanh) computes other numbers than the
    exact GELU kernel: it stays PyTorch's own module."""
    plain, fast = plain_and_fast(dataclasses.replace(tiny_config, activation="gelu_tanh"))
    gelus = [m for m in fast.modules() if isinstance(m, torch.nn.GELU)]
    assert gelus and all(type(m) is torch.nn.GELU and m.approximate == "tanh" for m in gelus)
    x = ids(tiny_config, 2, 8)
    plain.eval(), fast.eval()
    torch.testing.assert_close(fast(x)[0], plain(x)[0], rtol=1e-4, atol=1e-5)
