"""The time budget: when a run is finished, the share of training done that the
learning-rate schedule follows, the time held back for the final evaluation, and the
projected length of a run."""

import re
import time

import pytest
import torch

from smolgpt.config import resolve_train_config
from smolgpt.distributed import Group, PeerLost
from smolgpt.optim import Budget
from smolgpt.runlog import projection

from e2e import names


def cfg(**overrides):
    return resolve_train_config({"preset": "nano", "level": "char", "max_iters": 110, **overrides})


def budgeted(**overrides):
    """A time-budgeted config whose max_iters is left at its default."""
    return resolve_train_config({"preset": "nano", "level": "char", **overrides})


def test_a_budget_of_steps_finishes_at_max_iters():
    b = Budget(cfg(), clock_start=time.perf_counter())
    assert not b.finished(109) and b.finished(110)
    assert b.done(55) == pytest.approx(0.5) and b.done(500) == 1.0


def test_a_time_budget_counts_earlier_processes_and_makes_one_step_at_least():
    b = Budget(budgeted(time_budget=10.0), clock_start=time.perf_counter(), elapsed_before=12.0)
    assert b.elapsed() >= 12.0
    assert not b.finished(0)  # even with the budget spent, one step first
    assert b.finished(1) and b.done(1) == 1.0
    fresh = Budget(budgeted(time_budget=1000.0), clock_start=time.perf_counter())
    assert not fresh.finished(5) and 0 <= fresh.done(5) < 0.01


def test_max_iters_left_at_its_default_does_not_cap_a_time_budget():
    b = Budget(budgeted(time_budget=1000.0), clock_start=time.perf_counter())
    assert b.max_iters is None and not b.finished(100_000) and b.done(100_000) < 0.01


def test_max_iters_given_with_a_time_budget_caps_the_steps():
    """Whichever limit comes first ends training, and the schedule's decay with it."""
    b = Budget(cfg(time_budget=1000.0, max_iters=50), clock_start=time.perf_counter())
    assert not b.finished(49) and b.finished(50)
    assert b.done(25) == pytest.approx(0.5, abs=0.01) and b.done(50) == 1.0
    short = Budget(
        cfg(time_budget=10.0, max_iters=50), clock_start=time.perf_counter(), elapsed_before=10.0
    )
    assert short.finished(3) and short.done(3) == 1.0  # the time ran out first


def test_the_final_evaluation_is_estimated_from_evaluation_batches_not_steps():
    c = cfg(time_budget=60.0, eval_iters=10)
    timer = Budget(c, clock_start=time.perf_counter())
    assert timer.train_seconds() == 60.0  # nothing measured yet
    timer.add_step(5.0)  # the first step (one-off costs) is not counted
    for _ in range(3):
        timer.add_step(4.0)  # slow steps (an expensive optimiser) ...
    timer.eval_batch_s = 0.1  # ... but cheap forward passes
    assert timer.step_time() == 4.0
    assert timer.final_eval_s() == pytest.approx(2 * 10 * 0.1)  # 2 splits x 10 batches
    assert timer.train_seconds() == pytest.approx(58.0)
    timer.eval_s = 3.0  # once an evaluation has been timed, its time is used
    assert timer.train_seconds() == pytest.approx(57.0)


def test_a_real_run_times_an_evaluation_batch_before_its_first_step(make_trainer):
    trainer = make_trainer(max_iters=3, time_budget=600.0, eval_iters=5)
    trainer.out_dir.mkdir()
    trainer.run()
    b = trainer.budget
    assert b.eval_batch_s is not None and 0 < b.eval_batch_s < b.eval_s
    assert trainer.progress.iter == 3  # max_iters capped the time budget
    assert trainer.progress.eval_batches == 5  # 600 s: room for every batch asked for


def test_evaluations_take_a_tenth_of_a_budget_at_most():
    """Slow evaluation batches: fewer of them, planned for the evaluations expected, the
    first and the last included; one at least, however slow."""
    b = Budget(budgeted(time_budget=60.0, eval_iters=20), clock_start=time.perf_counter())
    # Six evaluations (at the start and five points) x 2 splits, in 6 s: 0.5 s a batch.
    assert b.expected_evaluations(step_s=0.1) == 6
    assert b.plan_eval_batches(batch_s=0.1, step_s=0.3) == 5
    assert b.plan_eval_batches(batch_s=0.001, step_s=0.003) == 20  # all asked for fit
    assert b.plan_eval_batches(batch_s=30.0, step_s=90.0) == 1
    # With --eval_interval, the evaluations every so many steps at the step time expected.
    by_steps = Budget(
        budgeted(time_budget=60.0, eval_interval=100, eval_iters=20),
        clock_start=time.perf_counter(),
    )
    assert by_steps.expected_evaluations(step_s=0.1) == 1 + 6  # 600 steps
    assert by_steps.plan_eval_batches(batch_s=0.1, step_s=0.1) == 4  # 6 s / (7 x 2 x 0.1 s)


def test_the_points_of_a_budget_divide_the_time_left_after_the_first_evaluation():
    """Start-up may spend much of a short budget: the five points spread the time left
    after this process's first evaluation, so none is lost."""
    b = Budget(budgeted(time_budget=10.0), clock_start=time.perf_counter(), elapsed_before=4.0)
    assert b.point(0) == 2  # 40% of the budget gone: two fifths of it passed
    b.evaluated(0)  # the first evaluation of this process starts the points
    assert b.point(0) == 0 and b.points_evaluated == 0
    b.elapsed_before = 4.0 + 6.0 / 5 + 0.01  # a fifth of the 6 s left
    assert b.point(0) == 1


def test_the_projection_comes_before_the_first_evaluation_and_long_ones_report(
    make_trainer, monkeypatch, caplog
):
    """A run counted in steps says how long it will take before it evaluates the
    untrained model; an evaluation expected to take long says how far it has got."""
    from smolgpt import runlog, training

    monkeypatch.setattr(training, "EVAL_PROGRESS_S", 0.0)  # every evaluation is long ...
    monkeypatch.setattr(runlog, "EVAL_PROGRESS_S", 0.0)  # ... and reports every batch
    trainer = make_trainer(max_iters=2, eval_interval=2, eval_iters=3, early_stop_patience=0)
    trainer.out_dir.mkdir()
    with caplog.at_level("INFO", logger="smolgpt"):
        trainer.run()
    lines = [r.getMessage() for r in caplog.records]
    first_eval = next(i for i, line in enumerate(lines) if line.startswith("eval @ iter 0"))
    projected = [i for i, line in enumerate(lines) if line.startswith("projected training")]
    assert projected and projected[0] < first_eval, lines
    assert "from one timed forward and backward pass" in lines[projected[0]], lines
    assert "2 evaluations" in lines[projected[0]], lines  # at 0 and at 2
    progress = [line for line in lines[:first_eval] if line.startswith("evaluating at iter 0")]
    assert progress and all(re.search(r"\d+/6 batches, \dm\d\ds left", p) for p in progress)
    # A long run hears before its first evaluation how to make it shorter.
    caplog.clear()
    with caplog.at_level("INFO", logger="smolgpt"):
        long = make_trainer(max_iters=5000)
        runlog.plan(long.budget, long.progress, 0.5, 4.0, long.group, long.device)
    assert "that is long for a CPU" in caplog.text and "5h" in caplog.text, caplog.text


def test_the_projection_counts_the_steps_and_evaluations_left():
    c = cfg(max_iters=1000, eval_interval=100, early_stop_patience=0)
    b = Budget(c, clock_start=time.perf_counter())
    for seconds in (9.0, 0.5, 0.5, 0.5):  # the first is not counted
        b.add_step(seconds)
    b.eval_s = 2.0
    (line,) = projection(b, 4, torch.device("cpu"))
    # 996 steps at 0.5 s, and 10 evaluations (at 100, 200, ... 1000) at 2 s: 518 s.
    assert all(value in line for value in ("8m38s", "996", "0.50 s", "2.0 s")), line


def test_a_long_run_on_a_cpu_suggests_a_shorter_one():
    c = cfg(level="word", max_iters=5000, eval_interval=250)  # early stopping on
    b = Budget(c, clock_start=time.perf_counter())
    for seconds in (9.0, 3.8, 3.8):
        b.add_step(seconds)
    b.eval_batch_s = 0.3
    lines = projection(b, 3, torch.device("cpu"))
    assert "5h" in lines[0] and "early stopping" in lines[0], lines  # it may stop sooner
    assert len(lines) == 2 and "--preset micro" in lines[1] and "--time_budget" in lines[1]
    assert len(projection(b, 3, torch.device("cuda"))) == 1  # the suggestion is for CPUs


def test_a_repeated_signal_counts_as_a_second_request_only_after_a_grace_period(monkeypatch):
    """Under torchrun one Ctrl-C reaches a rank twice (from the terminal, then forwarded):
    a repeat within REPEAT_GRACE_S is ignored; a later one stops at once."""
    import os
    import signal

    from smolgpt.signals import SignalFlag

    with SignalFlag() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the forwarded copy
        assert flag.signum == signal.SIGINT
        monkeypatch.setattr(SignalFlag, "REPEAT_GRACE_S", 0.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_a_connection_lost_inside_torch_is_the_one_line_peer_lost():
    """DDP averages gradients inside the backward pass: when a rank dies then, the Gloo
    error surfaces there and must end the run as any lost peer does, in one line."""
    two = Group(rank=0, local_rank=0, world_size=2)
    gloo = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
        "[127.0.0.1]:10667: Connection reset by peer. This is typically caused by a remote "
        "worker hanging or bugs in the application.\nCheck the logs of the remote worker"
    )
    with pytest.raises(PeerLost, match=names("rank 0 of 2", "Connection reset by peer")) as err:
        with two.talking_inside_torch():
            raise gloo
    assert "\n" not in str(err.value)
    shapes = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError) as err, two.talking_inside_torch():
        raise shapes
    assert err.value is shapes  # not a connection: as it is
    with pytest.raises(RuntimeError) as err, Group().talking_inside_torch():
        raise gloo
    assert err.value is gloo  # one process has no peers to lose


def test_an_fp16_gradient_scaler_s_factor_is_in_every_metrics_row(make_trainer):
    """Under fp16 (a T4's policy) each evaluation records the gradient scaler's factor, which
    halves at every step skipped for an overflow. A CPU never trains in fp16, so the trainer
    gets torch's own CPU GradScaler here, the object a T4's policy makes on its GPU: at a
    factor of 2^127 the scaled loss overflows float32, each step is skipped and the factor
    halves, until the gradients are finite again."""
    import json

    plain = make_trainer(max_iters=2, eval_interval=2, eval_iters=2)
    plain.out_dir.mkdir(exist_ok=True)
    plain.run()
    rows = [json.loads(line) for line in (plain.out_dir / "metrics.jsonl").open()]
    assert rows and all("loss_scale" not in r for r in rows)

    scaled = make_trainer(max_iters=6, eval_interval=3, eval_iters=2)
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    scaled.run()
    rows = [json.loads(line) for line in (scaled.out_dir / "metrics.jsonl").open()]
    factors = [r["loss_scale"] for r in rows]
    assert [r["iter"] for r in rows] == [0, 3, 6]
    assert factors[0] == 2.0**127 and factors[0] > factors[1] >= factors[2] > 0, factors


def test_a_t4_s_fp16_policy_trains_as_float32_does(make_trainer, monkeypatch):
    """A T4's policy end to end (fp16 autocast, a gradient scaler, Muon's iteration in
    float32), run on the CPU's own fp16 autocast, since no GPU here has the policy: the
    scaler backs off from 2^16 in the first steps at most, skips no step after them, and
    the losses follow a float32 run's."""
    import json

    from smolgpt import hardware

    t4 = hardware.cuda_policy((7, 5))
    policies = {
        "float32": hardware.PrecisionPolicy("cpu", None, "float32"),
        "fp16": hardware.PrecisionPolicy("cpu", t4.reduced, t4.reason),
    }
    rows, trainers = {}, {}
    for name, policy in policies.items():
        monkeypatch.setattr(hardware, "precision_policy", lambda device, amp=True, p=policy: p)
        trainer = make_trainer(max_iters=60, eval_interval=20, eval_iters=4, warmup_iters=10)
        trainer.out_dir.mkdir(exist_ok=True)
        trainer.run()
        rows[name] = [json.loads(line) for line in (trainer.out_dir / "metrics.jsonl").open()]
        trainers[name] = trainer
    fp16 = trainers["fp16"]
    assert trainers["float32"].scaler is None and fp16.scaler is not None
    assert fp16.optimizers[-1].ns_dtype == torch.float32  # Muon: never fp16
    scales = [r["loss_scale"] for r in rows["fp16"]]
    assert scales[1] == scales[2] == scales[3] <= 2.0**16, scales  # none skipped after iter 20
    assert [r["iter"] for r in rows["fp16"]] == [0, 20, 40, 60]
    for a, b in zip(rows["fp16"], rows["float32"]):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=0.02), (a, b)
    assert rows["fp16"][-1]["val_loss"] < rows["fp16"][0]["val_loss"] - 0.3  # it learned
