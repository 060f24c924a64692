"""The learning-rate schedule (warm-up, cosine or constant, by steps or by wall time), the
optimisers, and how a time budget is shared between training and the final evaluation."""

import math

import pytest
import torch

from smolgpt import data
from smolgpt.config import resolve_train_config
from smolgpt.model import GPT
from smolgpt.training import BatchedMuon, Trainer, _StepTimer, learning_rate, make_optimizers


def cfg(**overrides):
    base = {"preset": "nano", "level": "char", "learning_rate": 1e-3, "warmup_iters": 10,
            "max_iters": 110}
    return resolve_train_config({**base, **overrides})


def test_warmup_rises_linearly_to_the_peak():
    c = cfg()
    rates = [learning_rate(c, step, 0.0) for step in range(10)]
    assert rates == sorted(rates) and rates[0] > 0
    assert rates[4] == pytest.approx(1e-3 * 5 / 11)
    assert learning_rate(c, 10, 0.0) == pytest.approx(1e-3)


def test_cosine_decays_to_final_lr_at_max_iters():
    c = cfg()
    middle = learning_rate(c, 60, 0.0)  # halfway through the decay phase
    assert middle == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))
    assert learning_rate(c, 110, 0.0) == pytest.approx(1e-4)
    assert learning_rate(cfg(min_lr=0.0), 110, 0.0) == pytest.approx(0.0, abs=1e-12)


def test_constant_schedule_keeps_the_peak_after_warmup():
    c = cfg(lr_schedule="constant")
    assert learning_rate(c, 5, 0.0) < 1e-3
    assert all(learning_rate(c, s, 0.0) == 1e-3 for s in (10, 50, 110))


def test_time_budget_schedule_follows_elapsed_time_not_steps():
    c = cfg(time_budget=100.0)  # warm-up share: 10 / 110 of the budget
    assert learning_rate(c, 0, 50.0) == learning_rate(c, 10_000, 50.0)
    assert learning_rate(c, 0, 100 * 10 / 110) == pytest.approx(1e-3)
    assert learning_rate(c, 0, 100.0) == pytest.approx(1e-4)
    assert learning_rate(c, 0, 1.0) < learning_rate(c, 0, 5.0) < 1e-3
    decay_mid = 100 * (10 / 110 + (1 - 10 / 110) / 2)
    assert learning_rate(c, 0, decay_mid) == pytest.approx(1e-4 + 0.45 * 1e-3 * (1 + math.cos(math.pi / 2)))


def test_time_budget_decay_ends_when_training_time_does():
    c = cfg(time_budget=100.0)
    # 20 s held back for the final evaluation: the decay is complete after 80 s.
    assert learning_rate(c, 0, 80.0, train_seconds=80.0) == pytest.approx(1e-4)
    assert learning_rate(c, 0, 40.0, train_seconds=80.0) == learning_rate(c, 0, 50.0)


def test_step_timer_holds_back_time_for_the_final_evaluation():
    c = cfg(time_budget=60.0, eval_iters=10, gradient_accumulation_steps=2)
    timer = _StepTimer(c)
    assert timer.train_seconds() == 60.0  # nothing measured yet
    timer.add_step(5.0)  # the first step (one-off costs) is not counted
    timer.add_step(0.2)
    timer.add_step(0.2)
    # 2 splits x 10 batches, each a forward pass of one 0.1 s micro-batch (0.2 s / 2).
    expected = 2 * 10 * 0.1 * _StepTimer.FORWARD_SHARE
    assert timer.final_eval_s() == pytest.approx(expected)
    assert timer.train_seconds() == pytest.approx(60.0 - expected)
    timer.eval_s = 3.0  # once an evaluation has been timed, its time is used
    assert timer.train_seconds() == pytest.approx(57.0)


# --------------------------------------------------------------------------- optimisers

def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tiny_model):
    adamw, muon = make_optimizers(tiny_model, cfg(optimizer="muon"), torch.device("cpu"))
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, BatchedMuon)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    adamw_ids = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert muon_ids == {id(p) for p in tiny_model.hidden_matrices()}
    assert not muon_ids & adamw_ids
    assert muon_ids | adamw_ids == {id(p) for p in tiny_model.parameters()}
    (only,) = make_optimizers(tiny_model, cfg(optimizer="adamw"), torch.device("cpu"))
    assert len({id(p) for g in only.param_groups for p in g["params"]}) == len(list(tiny_model.parameters()))


def _matrices(seed: int) -> list[torch.nn.Parameter]:
    """Two shapes, tall and wide, several of each (as in a model's blocks)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(24, 8), (8, 24), (24, 8), (16, 16), (8, 24), (24, 8)]
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in shapes]


@pytest.mark.parametrize("nesterov,adjust_lr_fn", [(True, "original"), (False, "original"),
                                                   (True, "match_rms_adamw")])
def test_batched_muon_makes_torch_muons_updates(nesterov, adjust_lr_fn):
    ours, theirs = _matrices(0), _matrices(0)
    kwargs = dict(lr=0.05, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    batched, reference = BatchedMuon(ours, **kwargs), torch.optim.Muon(theirs, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        batched.step()
        reference.step()
    start = _matrices(0)
    for a, b, p0 in zip(ours, theirs, start):
        torch.testing.assert_close(batched.state[a]["momentum_buffer"],
                                   reference.state[b]["momentum_buffer"])
        # Orthogonalised in bf16, batched or one at a time: equal up to bf16 rounding.
        torch.testing.assert_close(a - p0, b - p0, rtol=0, atol=2e-3)
        assert (a - p0).abs().max() > 0.05  # and the parameters did move


def test_batched_muon_and_torch_muon_load_each_others_state():
    ours, theirs = _matrices(0), _matrices(0)
    batched, reference = BatchedMuon(ours, lr=0.05), torch.optim.Muon(theirs, lr=0.05)
    for p in ours + theirs:
        p.grad = torch.ones_like(p)
    reference.step()
    batched.load_state_dict(reference.state_dict())
    assert torch.equal(batched.state[ours[3]]["momentum_buffer"],
                       reference.state[theirs[3]]["momentum_buffer"])
    batched.step()
    reference.load_state_dict(batched.state_dict())
    reference.step()


def test_schedule_scales_every_optimiser_alike(write_text, tmp_path):
    corpus = data.Corpus("t", (write_text("t.txt", "to be or not to be, that is it. " * 200),))
    token_data = data.prepare(corpus, "char")
    c = cfg(optimizer="muon", learning_rate=4e-3, muon_lr=0.04, n_layer=1, n_embd=16,
            n_head=2, block_size=16, batch_size=4)
    trainer = Trainer(c, token_data, tmp_path / "run", torch.device("cpu"))
    before = [p.detach().clone() for p in trainer.model.hidden_matrices()]
    loss = trainer.train_step(lr=1e-3)  # a quarter of the peak
    adamw, muon = trainer.optimizers
    assert all(g["lr"] == pytest.approx(1e-3) for g in adamw.param_groups)
    assert all(g["lr"] == pytest.approx(0.01) for g in muon.param_groups)
    assert torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, trainer.model.hidden_matrices()))


@pytest.mark.parametrize("dtype, steps", [(torch.bfloat16, 5), (torch.float32, 5),
                                          (torch.float32, 3)])
def test_orthogonalise_in_the_policys_dtype(dtype, steps):
    from smolgpt.training import orthogonalise

    g = torch.randn(3, 64, 24, generator=torch.Generator().manual_seed(0))
    ortho = orthogonalise(g, (3.4445, -4.7750, 2.0315), steps, 1e-7, dtype)
    assert ortho.dtype == dtype and ortho.shape == g.shape
    singular = torch.linalg.svdvals(ortho.float())
    # Muon's iteration leaves the singular values near 1 (within about [0.7, 1.2] after
    # five steps), not exactly at it; three steps leave the small ones lower.
    low = 0.6 if steps == 5 else 0.2
    assert singular.min() > low and singular.max() < 1.25, singular


def test_a_resumed_run_uses_its_own_muon_ns_steps(write_text, tmp_path):
    corpus = data.Corpus("t", (write_text("t.txt", "to be or not to be, that is it. " * 200),))
    token_data = data.prepare(corpus, "char")
    shape = dict(optimizer="muon", n_layer=1, n_embd=16, n_head=2, block_size=16, batch_size=4)
    first = Trainer(cfg(**shape), token_data, tmp_path / "run", torch.device("cpu"))
    first.train_step(lr=1e-3)
    state = first.state()
    assert state["optimizer"][1]["param_groups"][0]["ns_steps"] == 5
    resumed = Trainer(cfg(**shape, muon_ns_steps=3), token_data, tmp_path / "run",
                      torch.device("cpu"), resume_from=state)
    assert all(g["ns_steps"] == 3 for g in resumed.optimizers[1].param_groups)
