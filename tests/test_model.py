"""The GPT network: shapes, causality, the KV cache, weight tying, initialisation and gradient
checkpointing (kernels.py's faster versions of its parts: tests/test_kernels.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from smolgpt import model as model_module
from smolgpt.config import ModelConfig
from smolgpt.errors import SmolGPTError
from smolgpt.model import GPT, KVCache, apply_rotary, rotary_tables

from e2e import names


def ids(config: ModelConfig, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(config.vocab_size, (batch, length), generator=gen)


def test_output_shapes(tiny_model, tiny_config):
    x = ids(tiny_config, 3, 7)
    logits, loss = tiny_model(x)
    assert logits.shape == (3, 7, tiny_config.vocab_size)
    assert loss is None
    targets = ids(tiny_config, 3, 7, seed=1)
    logits_with_loss, loss = tiny_model(x, targets=targets)
    torch.testing.assert_close(logits_with_loss, logits)  # small logits are returned too
    torch.testing.assert_close(
        loss, torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    )
    assert loss.shape == () and loss.dtype == torch.float32


def test_full_block_is_accepted_and_longer_raises(tiny_model, tiny_config):
    block = tiny_config.block_size
    logits, _ = tiny_model(ids(tiny_config, 1, block))
    assert logits.shape[1] == block
    with pytest.raises(ValueError, match="block_size"):
        tiny_model(ids(tiny_config, 1, block + 1))


def test_cache_beyond_block_size_raises(tiny_model, tiny_config):
    cache = KVCache(tiny_config)
    tiny_model(ids(tiny_config, 1, tiny_config.block_size - 2), cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        tiny_model(ids(tiny_config, 1, 3), cache=cache)


@pytest.mark.parametrize("changed", [0, 5, 11])
def test_causal_future_tokens_do_not_change_earlier_logits(tiny_model, tiny_config, changed):
    x = ids(tiny_config, 2, 12)
    y = x.clone()
    y[:, changed] = (y[:, changed] + 1) % tiny_config.vocab_size
    with torch.no_grad():
        a, _ = tiny_model(x)
        b, _ = tiny_model(y)
    torch.testing.assert_close(a[:, :changed], b[:, :changed], rtol=0, atol=0)
    # ... and it does change the changed position itself (so the test can fail).
    assert not torch.allclose(a[:, changed], b[:, changed])


def test_without_the_causal_mask_every_position_sees_the_last_token(tiny_config):
    """--no-causal (an exercise): changing the last token changes the first one's logits; a
    cached continuation still runs, each new token seeing all before it."""
    model = GPT(dataclasses.replace(tiny_config, causal=False)).eval()
    x = ids(tiny_config, 2, 12)
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % tiny_config.vocab_size
    with torch.no_grad():
        assert not torch.allclose(model(x)[0][:, 0], model(y)[0][:, 0])
        cache = KVCache(model.config)
        model(x[:, :6], cache=cache)
        logits, _ = model(x[:, 6:9], cache=cache)
    assert logits.shape == (2, 3, tiny_config.vocab_size) and cache.length == 9


def test_kv_cache_single_steps_equal_full_recompute(tiny_model, tiny_config):
    x = ids(tiny_config, 2, tiny_config.block_size)
    with torch.no_grad():
        full, _ = tiny_model(x)
        cache = KVCache(tiny_config)
        prefix = 5
        pre, _ = tiny_model(x[:, :prefix], cache=cache)
        torch.testing.assert_close(pre, full[:, :prefix], rtol=0, atol=1e-5)
        assert cache.length == prefix
        for t in range(prefix, tiny_config.block_size):
            step, _ = tiny_model(x[:, t : t + 1], cache=cache)
            torch.testing.assert_close(step[:, 0], full[:, t], rtol=0, atol=1e-5)
        assert cache.length == tiny_config.block_size


def test_kv_cache_multi_token_chunk_after_prefix(tiny_model, tiny_config):
    x = ids(tiny_config, 2, 14, seed=3)
    with torch.no_grad():
        full, _ = tiny_model(x)
        cache = KVCache(tiny_config)
        tiny_model(x[:, :4], cache=cache)
        chunk, _ = tiny_model(x[:, 4:9], cache=cache)  # five new tokens at once
        torch.testing.assert_close(chunk, full[:, 4:9], rtol=0, atol=1e-5)
        step, _ = tiny_model(x[:, 9:10], cache=cache)
        torch.testing.assert_close(step[:, 0], full[:, 9], rtol=0, atol=1e-5)
        rest, _ = tiny_model(x[:, 10:], cache=cache)
        torch.testing.assert_close(rest, full[:, 10:], rtol=0, atol=1e-5)


def test_lm_head_is_tied_to_token_embedding(tiny_model):
    assert tiny_model.lm_head.weight is tiny_model.wte.weight


def test_num_parameters_counts_tied_matrix_once(tiny_config):
    model = GPT(tiny_config)
    position = tiny_config.position
    V, C, T, L = (
        tiny_config.vocab_size,
        tiny_config.n_embd,
        tiny_config.block_size,
        tiny_config.n_layer,
    )
    per_block = (
        2 * 2 * C  # two LayerNorms, weight and bias
        + C * 3 * C
        + 3 * C  # c_attn
        + C * C
        + C  # attention c_proj
        + C * 4 * C
        + 4 * C  # c_fc
        + 4 * C * C
        + C  # MLP c_proj
    )
    positions = T * C if position == "learned" else 0  # rotary tables are not parameters
    expected = V * C + positions + L * per_block + 2 * C  # + final LayerNorm
    assert model.num_parameters() == expected


def test_num_parameters_without_bias():
    config = ModelConfig(
        vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8, bias=False, position="learned"
    )
    C = 8
    expected = 10 * C + 8 * C + (2 * C + 3 * C * C + C * C + 4 * C * C + 4 * C * C) + C
    assert GPT(config).num_parameters() == expected


def test_an_untied_head_is_its_own_matrix_and_learns_apart(tiny_config):
    """--no-tie_embeddings: vocab_size * n_embd more parameters, and the head's gradient no
    longer reaches the embedding."""
    untied = GPT(dataclasses.replace(tiny_config, tie_embeddings=False))
    V, C = tiny_config.vocab_size, tiny_config.n_embd
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_parameters() == GPT(tiny_config).num_parameters() + V * C
    x = ids(tiny_config, 2, 8)
    _, loss = untied(x, x)
    loss.backward()
    unseen = torch.ones(V, dtype=torch.bool)
    unseen[x.unique()] = False  # tokens never read: only the head's gradient could reach them
    assert untied.lm_head.weight.grad[unseen].abs().sum() > 0
    assert untied.wte.weight.grad[unseen].abs().sum() == 0
    decayed = untied.optimizer_groups(0.1)[0]["params"]
    assert any(p is untied.lm_head.weight for p in decayed)  # AdamW, with weight decay


def test_scaled_init_of_residual_projections():
    torch.manual_seed(0)
    n_layer = 4
    config = ModelConfig(vocab_size=50, block_size=8, n_layer=n_layer, n_head=4, n_embd=64)
    model = GPT(config)
    proj = torch.cat(
        [p.flatten() for n, p in model.named_parameters() if n.endswith("c_proj.weight")]
    )
    other = torch.cat(
        [p.flatten() for n, p in model.named_parameters() if n.endswith("c_fc.weight")]
    )
    expected = 0.02 / math.sqrt(2 * n_layer)
    assert proj.std().item() == pytest.approx(expected, rel=0.05)
    assert other.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.1)
    for name, p in model.named_parameters():
        if name.endswith("bias") and "ln" not in name:
            assert torch.count_nonzero(p) == 0, name


def test_initial_loss_is_about_ln_vocab():
    torch.manual_seed(0)
    vocab = 64
    config = ModelConfig(
        vocab_size=vocab, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0
    )
    model = GPT(config).eval()
    x = ids(config, 8, 16)
    y = ids(config, 8, 16, seed=1)
    with torch.no_grad():
        _, loss = model(x, targets=y)
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(math.log(vocab), abs=0.15)


def test_loss_backward_reaches_every_parameter(tiny_model, tiny_config):
    tiny_model.train()
    _, loss = tiny_model(ids(tiny_config, 2, 8), targets=ids(tiny_config, 2, 8, seed=1))
    loss.backward()
    for name, p in tiny_model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_optimizer_groups_split_matrices_from_vectors(tiny_model):
    decay, no_decay = tiny_model.optimizer_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    assert (
        sum(p.numel() for g in (decay, no_decay) for p in g["params"])
        == tiny_model.num_parameters()
    )


def test_optimizer_groups_can_leave_out_what_another_optimiser_takes(tiny_model):
    hidden = tiny_model.hidden_matrices()
    assert hidden and all(p.dim() == 2 for p in hidden)
    assert id(tiny_model.wte.weight) not in map(id, hidden)  # embedding and tied head: AdamW
    groups = tiny_model.optimizer_groups(0.1, exclude=hidden)
    rest = [p for g in groups for p in g["params"]]
    assert not {id(p) for p in rest} & {id(p) for p in hidden}
    assert sum(p.numel() for p in rest + hidden) == tiny_model.num_parameters()


# ------------------------------------------------------------------ gradient checkpointing


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_config, dropout):
    torch.manual_seed(0)
    config = ModelConfig(**{**vars(tiny_config), "dropout": dropout})
    model = GPT(config).double().train()  # float64: only a real difference shows
    x, y = ids(config, 3, 16), ids(config, 3, 16, seed=1)

    def loss_and_grads(checkpointing: bool):
        model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the same dropout masks in both runs
        _, loss = model(x, targets=y)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, plain_grads = loss_and_grads(False)
    checkpointed, checkpointed_grads = loss_and_grads(True)
    torch.testing.assert_close(checkpointed, plain, rtol=1e-12, atol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(
            checkpointed_grads[name],
            grad,
            rtol=1e-10,
            atol=1e-14,
            msg=lambda m, name=name: f"{name}: {m}",
        )
    if dropout:  # the masks mattered: another seed gives another loss
        torch.manual_seed(8)
        assert not torch.allclose(model(x, targets=y)[1], plain)


def test_gradient_checkpointing_leaves_eval_no_grad_and_generation_alone(tiny_config, monkeypatch):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    x = ids(tiny_config, 2, 12)
    with torch.no_grad():
        expected, _ = model.eval()(x)
    model.gradient_checkpointing = True

    def fail(*args, **kwargs):
        raise AssertionError("checkpointed a forward that has no backward")

    monkeypatch.setattr(model_module, "checkpoint", fail)
    logits, _ = model.eval()(x)  # eval mode, grad enabled
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    with torch.no_grad():  # training mode, no grad (dropout is 0: same values)
        logits, _ = model.train()(x)
        torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    # Generation with a KV cache, even on a model left in training mode.
    cache = KVCache(tiny_config)
    pre, _ = model(x[:, :5], cache=cache)
    step, _ = model(x[:, 5:6], cache=cache)
    torch.testing.assert_close(pre, expected[:, :5], rtol=0, atol=1e-5)
    torch.testing.assert_close(step[:, 0], expected[:, 5], rtol=0, atol=1e-5)


def test_gradient_checkpointing_keeps_several_times_less_for_the_backward():
    """The bytes autograd keeps for the backward pass (counted as they are saved, each
    storage once, parameters left out), plus each block's input, which checkpointing keeps
    to run the block again: several times less than without, at a long-ish context."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=23, block_size=256, n_layer=4, n_head=4, n_embd=64, dropout=0.1)
    model = GPT(config).train()
    x, y = ids(config, 4, 256), ids(config, 4, 256, seed=1)
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

    def kept_bytes(checkpointing: bool) -> int:
        model.gradient_checkpointing = checkpointing
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, loss = model(x, targets=y)
        loss.backward()
        block_inputs = config.n_layer * x.numel() * config.n_embd * 4 if checkpointing else 0
        return sum(storages.values()) + block_inputs

    plain, checkpointed = kept_bytes(False), kept_bytes(True)
    assert plain > 15_000_000  # the activations of 4 x 256 tokens, 4 layers
    assert checkpointed < plain / 4, (checkpointed, plain)


# --------------------------------------------------------------------------- rotary


def test_rotary_scores_depend_only_on_the_offset():
    torch.manual_seed(0)
    cos, sin = rotary_tables(block_size=64, head_size=8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m: int, n: int) -> float:
        qm = apply_rotary(q, cos[m : m + 1], sin[m : m + 1])
        kn = apply_rotary(k, cos[n : n + 1], sin[n : n + 1])
        return float((qm * kn).sum())

    assert score(10, 7) == pytest.approx(score(50, 47), abs=1e-5)
    assert score(3, 3) == pytest.approx(float((q * k).sum()), abs=1e-5)  # offset 0: plain q.k
    assert score(10, 7) != pytest.approx(score(10, 2), abs=1e-3)  # other offsets differ


def test_rotary_keeps_lengths_and_dtype():
    cos, sin = rotary_tables(block_size=16, head_size=8)
    x = torch.randn(2, 3, 16, 8, dtype=torch.bfloat16)
    y = apply_rotary(x, cos, sin)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float().norm(dim=-1), x.float().norm(dim=-1), rtol=1e-2, atol=1e-2)


def test_rotary_model_sees_positions():
    # Without any position signal a causal model would give a repeated token the same
    # logits wherever it stands (after the same history). Rotary breaks that symmetry.
    torch.manual_seed(0)
    model = GPT(
        ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.0)
    ).eval()
    logits, _ = model(torch.tensor([[3, 5, 3, 5, 3]]))
    assert not torch.allclose(logits[0, 1], logits[0, 3])
    assert not hasattr(model, "wpe") and "rotary_cos" not in model.state_dict()


def test_rotary_needs_an_even_head_size():
    # The head size it got (12 / 4), and the two ways out.
    with pytest.raises(SmolGPTError, match=names("3", "--n_embd", "--position learned")):
        ModelConfig(vocab_size=10, n_head=4, n_embd=12)
    ModelConfig(vocab_size=10, n_head=4, n_embd=12, position="learned")  # fine without rotary
