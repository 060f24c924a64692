"""The learning-rate schedule (warm-up, cosine, linear or constant, by steps or by share of a time
budget), the batch-size schedule (--batch_warmup) and the optimisers (AdamW, and BatchedMuon
against torch.optim.Muon)."""

import dataclasses
import json
import math
import time

import pytest
import torch

from smolgpt import sources, tokencache
from smolgpt.config import resolve_train_config
from smolgpt.errors import SmolGPTError
from smolgpt.optim import BatchedMuon, batch_rows, lr_multiplier, make_optimizers, orthogonalise
from smolgpt.training import Trainer


def cfg(**overrides):
    base = {
        "preset": "nano",
        "level": "char",
        "learning_rate": 1e-3,
        "warmup_iters": 10,
        "max_iters": 110,
    }
    return resolve_train_config({**base, **overrides})


def test_warmup_rises_linearly_to_the_peak():
    c = cfg()
    rates = [lr_multiplier(c, step, step / 110) for step in range(10)]
    assert rates == sorted(rates) and rates[0] > 0
    assert rates[4] == pytest.approx(5 / 11)
    assert lr_multiplier(c, 10, 10 / 110) == pytest.approx(1.0)


def test_cosine_decays_to_final_lr_at_the_end():
    c = cfg()
    assert lr_multiplier(c, 60, 60 / 110) == pytest.approx(0.1 + 0.5 * 0.9)  # half-way
    assert lr_multiplier(c, 110, 1.0) == pytest.approx(0.1)
    assert lr_multiplier(cfg(min_lr=0.0), 110, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_linear_decays_evenly_to_final_lr():
    c = cfg(lr_schedule="linear", min_lr=0.0)
    assert lr_multiplier(c, 10, 10 / 110) == pytest.approx(1.0)
    assert lr_multiplier(c, 60, 60 / 110) == pytest.approx(0.5)  # half-way through the decay
    assert lr_multiplier(c, 85, 85 / 110) == pytest.approx(0.25)
    assert lr_multiplier(c, 110, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(cfg(lr_schedule="linear"), 110, 1.0) == pytest.approx(0.1)


def test_constant_schedule_keeps_the_peak_after_warmup():
    c = cfg(lr_schedule="constant")
    assert lr_multiplier(c, 5, 5 / 110) < 1.0
    assert all(lr_multiplier(c, s, s / 110) == 1.0 for s in (10, 50, 110))


def test_time_budget_schedule_follows_the_share_of_time_not_steps():
    c = cfg(time_budget=100.0, warmup_budget_share=0.1)
    assert lr_multiplier(c, 0, 0.5) == lr_multiplier(c, 10_000, 0.5)
    assert lr_multiplier(c, 0, 0.1) == pytest.approx(1.0)  # warm-up is 10% of the budget
    assert lr_multiplier(c, 0, 1.0) == pytest.approx(0.1)
    assert lr_multiplier(c, 0, 0.01) < lr_multiplier(c, 0, 0.05) < 1.0
    assert lr_multiplier(c, 0, 0.55) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))


def test_time_budget_warmup_does_not_depend_on_max_iters():
    for max_iters in (110, 5000, 10):
        c = cfg(time_budget=100.0, max_iters=max_iters)  # warm-up: the default 2% share
        assert lr_multiplier(c, 0, 0.01) == pytest.approx(0.5)
        assert lr_multiplier(c, 0, 0.02) == pytest.approx(1.0)


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
    assert len({id(p) for g in only.param_groups for p in g["params"]}) == len(
        list(tiny_model.parameters())
    )


def _matrices(seed: int) -> list[torch.nn.Parameter]:
    """Two shapes, tall and wide, several of each (as in a model's blocks)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(24, 8), (8, 24), (24, 8), (16, 16), (8, 24), (24, 8)]
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in shapes]


@pytest.mark.parametrize(
    "nesterov,adjust_lr_fn", [(True, "original"), (False, "original"), (True, "match_rms_adamw")]
)
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
        torch.testing.assert_close(
            batched.state[a]["momentum_buffer"], reference.state[b]["momentum_buffer"]
        )
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
    assert torch.equal(
        batched.state[ours[3]]["momentum_buffer"], reference.state[theirs[3]]["momentum_buffer"]
    )
    batched.step()
    reference.load_state_dict(batched.state_dict())
    reference.step()


# ------------------------------------------------------------- the batch-size schedule


def test_batch_warmup_grows_the_batch_from_a_quarter_to_all_of_it():
    c = cfg(batch_size=16, batch_warmup=0.5)
    assert [batch_rows(c, done) for done in (0.0, 0.25, 0.5, 0.9, 1.0)] == [4, 10, 16, 16, 16]
    assert {batch_rows(cfg(batch_size=16), done) for done in (0.0, 0.5, 1.0)} == {16}
    assert batch_rows(cfg(batch_size=2, batch_warmup=1.0), 0.0) == 1  # one sequence at least
    for bad in (-0.1, 1.5):
        with pytest.raises(SmolGPTError, match="--batch_warmup"):
            cfg(batch_warmup=bad)


def test_a_step_trains_on_the_first_rows_of_its_batch(make_trainer):
    trainer = make_trainer(dropout=0.0)
    stream = trainer.sampler.state_dict()
    x, y = trainer.sampler.next()
    trainer.sampler.load_state_dict(stream)
    with torch.no_grad(), trainer.precision.autocast():
        first_two = trainer.losses.train(x[:2], y[:2])
        whole = trainer.losses.train(x, y)
    loss = trainer.train_step(1.0, rows=2)
    assert loss.item() == pytest.approx(first_two.item(), rel=1e-5)
    assert loss.item() != pytest.approx(whole.item(), rel=1e-5)


def test_batch_warmup_counts_the_tokens_it_trains_on(make_trainer):
    trainer = make_trainer(max_iters=8, eval_interval=4, eval_iters=1, batch_warmup=1.0, plot=False)
    trainer.out_dir.mkdir()
    trainer.run()
    rows = [json.loads(line) for line in (trainer.out_dir / "metrics.jsonl").open()]
    per_step = [batch_rows(trainer.cfg, step / 8) * 16 for step in range(8)]  # context 16
    assert per_step[0] == 16 and per_step[-1] == 64  # a quarter of 4 rows, then all 4
    assert [r["tokens"] for r in rows] == [0, sum(per_step[:4]), sum(per_step)]
    assert trainer.progress.tokens == sum(per_step)
    # A checkpoint from before tokens were counted: every step had whole batches.
    state = trainer.state()
    state.progress.tokens = None  # as Progress.from_dict reads such a checkpoint
    resumed = Trainer(
        trainer.cfg, trainer.data, trainer.out_dir, torch.device("cpu"), resume_from=state
    )
    assert resumed.progress.tokens == 8 * 64


def test_schedule_scales_every_optimiser_alike(write_text, tmp_path):
    corpus = sources.Corpus("t", (write_text("t.txt", "to be or not to be, that is it. " * 200),))
    token_data = tokencache.prepare(corpus, "char")
    c = cfg(
        optimizer="muon",
        learning_rate=4e-3,
        muon_lr=0.04,
        n_layer=1,
        n_embd=16,
        n_head=2,
        block_size=16,
        batch_size=4,
    )
    trainer = Trainer(c, token_data, tmp_path / "run", torch.device("cpu"))
    before = [p.detach().clone() for p in trainer.model.hidden_matrices()]
    loss = trainer.train_step(0.25)  # a quarter of the peak
    adamw, muon = trainer.optimizers
    assert all(g["lr"] == pytest.approx(1e-3) for g in adamw.param_groups)
    assert all(g["lr"] == pytest.approx(0.01) for g in muon.param_groups)
    assert torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, trainer.model.hidden_matrices()))


@pytest.mark.parametrize(
    "dtype, steps", [(torch.bfloat16, 5), (torch.float32, 5), (torch.float32, 3)]
)
def test_orthogonalise_in_the_policys_dtype(dtype, steps):
    g = torch.randn(3, 64, 24, generator=torch.Generator().manual_seed(0))
    ortho = orthogonalise(g, (3.4445, -4.7750, 2.0315), steps, 1e-7, dtype)
    assert ortho.dtype == dtype and ortho.shape == g.shape
    singular = torch.linalg.svdvals(ortho.float())
    # Muon's iteration leaves the singular values near 1 (within about [0.7, 1.2] after
    # five steps), not exactly at it; three steps leave the small ones lower.
    low = 0.6 if steps == 5 else 0.2
    assert singular.min() > low and singular.max() < 1.25, singular


def test_a_resumed_run_uses_its_own_muon_ns_steps(write_text, tmp_path):
    corpus = sources.Corpus("t", (write_text("t.txt", "to be or not to be, that is it. " * 200),))
    token_data = tokencache.prepare(corpus, "char")
    shape = dict(optimizer="muon", n_layer=1, n_embd=16, n_head=2, block_size=16, batch_size=4)
    first = Trainer(cfg(**shape), token_data, tmp_path / "run", torch.device("cpu"))
    first.train_step(0.25)
    state = first.state()
    assert state.optimizer[1]["param_groups"][0]["ns_steps"] == 5
    resumed = Trainer(
        cfg(**shape, muon_ns_steps=3),
        token_data,
        tmp_path / "run",
        torch.device("cpu"),
        resume_from=state,
    )
    assert all(g["ns_steps"] == 3 for g in resumed.optimizers[1].param_groups)


# ------------------------------------------------------------- extending a resumed run


def _resume(trainer, **changes):
    """A real Trainer resumed from trainer's checkpoint, with some settings changed."""
    return Trainer(
        dataclasses.replace(trainer.cfg, **changes),
        trainer.data,
        trainer.out_dir,
        torch.device("cpu"),
        resume_from=trainer.state(),
    )


def _multipliers(trainer, steps):
    """The multiplier each of these steps would train at, as Trainer._step computes it."""
    return [lr_multiplier(trainer.cfg, s, trainer.budget.done(s)) for s in steps]


def _assert_decays_smoothly(before: float, after: list):
    """No jump at the resume point, and a monotone decay from there."""
    assert after[0] <= before + 1e-9 and after[0] == pytest.approx(before, abs=0.02)
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:])), after


@pytest.mark.parametrize("stop_at", [20, 12])  # a finished run, and one stopped mid-decay
def test_extending_a_run_counted_in_steps_continues_its_decay(make_trainer, stop_at):
    first = make_trainer(max_iters=20, warmup_iters=5)
    first.progress.iter = stop_at
    before = _multipliers(first, range(stop_at + 1))
    second = _resume(first, max_iters=40)
    after = _multipliers(second, range(stop_at, 40))
    _assert_decays_smoothly(before[-1], after)
    floor = second.cfg.final_lr / second.cfg.learning_rate
    assert after[-1] == pytest.approx(floor, abs=0.01)  # and the decay ends with training
    if stop_at == 20:  # a finished run goes on at final_lr
        assert after == pytest.approx([floor] * 20)
    # A further resume, with nothing changed, keeps the extended schedule.
    second.progress.iter = 30
    third = _resume(second)
    assert _multipliers(third, range(30, 40)) == _multipliers(second, range(30, 40))


def test_extending_a_time_budgeted_run_continues_its_decay(make_trainer):
    first = make_trainer(time_budget=10.0)
    first.budget.clock_start, first.budget.elapsed_before = time.perf_counter(), 6.0
    first.progress.iter, first.progress.elapsed_s = 30, 6.0
    before = _multipliers(first, [30])[0]
    second = _resume(first, time_budget=20.0)
    after = []
    for elapsed in range(6, 21):  # the extended run, second by second
        second.budget.clock_start, second.budget.elapsed_before = time.perf_counter(), elapsed
        after += _multipliers(second, [30 + elapsed])
    _assert_decays_smoothly(before, after)
    assert after[-1] == pytest.approx(second.cfg.final_lr / second.cfg.learning_rate, abs=1e-3)


def test_a_run_resumed_during_warm_up_keeps_warming_up(make_trainer):
    first = make_trainer(max_iters=20, warmup_iters=10)
    first.progress.iter = 4
    second = _resume(first, max_iters=40)
    assert second.progress.extended_at is None
    assert _multipliers(second, range(4, 10)) == _multipliers(first, range(4, 10))


def test_an_unchanged_resume_keeps_the_schedule_exactly(make_trainer):
    first = make_trainer(max_iters=20, warmup_iters=5)
    first.progress.iter = 12
    second = _resume(first)
    assert second.progress.extended_at is None
    assert _multipliers(second, range(12, 20)) == _multipliers(first, range(12, 20))
