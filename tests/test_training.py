"""The time budget: when a run is finished, and the share of training done that the
learning-rate schedule follows."""

import time

import pytest

from smolgpt.config import resolve_train_config
from smolgpt.training import Budget


def cfg(**overrides):
    return resolve_train_config({"preset": "nano", "level": "char", "max_iters": 110, **overrides})


def test_a_budget_of_steps_finishes_at_max_iters():
    b = Budget(cfg(), clock_start=time.perf_counter())
    assert not b.finished(109) and b.finished(110)
    assert b.done(55) == pytest.approx(0.5) and b.done(500) == 1.0


def test_a_time_budget_counts_earlier_processes_and_makes_one_step_at_least():
    b = Budget(cfg(time_budget=10.0), clock_start=time.perf_counter(), elapsed_before=12.0)
    assert b.elapsed() >= 12.0
    assert not b.finished(0)  # even with the budget spent, one step first
    assert b.finished(1) and b.done(1) == 1.0
    fresh = Budget(cfg(time_budget=1000.0), clock_start=time.perf_counter())
    assert not fresh.finished(5) and 0 <= fresh.done(5) < 0.01


def test_budget_holds_back_time_for_the_final_evaluation():
    c = cfg(time_budget=60.0, eval_iters=10, gradient_accumulation_steps=2)
    timer = Budget(c, clock_start=time.perf_counter())
    assert timer.train_seconds() == 60.0  # nothing measured yet
    timer.add_step(5.0)  # the first step (one-off costs) is not counted
    timer.add_step(0.2)
    timer.add_step(0.2)
    # 2 splits x 10 batches, each a forward pass of one 0.1 s micro-batch (0.2 s / 2).
    expected = 2 * 10 * 0.1 * Budget.FORWARD_SHARE
    assert timer.final_eval_s() == pytest.approx(expected)
    assert timer.train_seconds() == pytest.approx(60.0 - expected)
    timer.eval_s = 3.0  # once an evaluation has been timed, its time is used
    assert timer.train_seconds() == pytest.approx(57.0)
