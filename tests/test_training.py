"""The learning-rate schedule: warm-up, cosine or constant, by steps or by wall time."""

import math

import pytest

from smolgpt.config import resolve_train_config
from smolgpt.training import learning_rate


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
