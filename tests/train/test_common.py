"""StepBudget: fitting a training loop's step count to a wall-clock budget (a fake clock)."""
import pytest

from mvportrait.train import common


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])
    return now


def test_budget_measures_after_warmup_steps_and_refits(clock):
    b = common.StepBudget(10.0, start=0, max_steps=1000)
    for step in range(5):  # the first steps pay one-time costs: not measured
        assert b.fit(step) is None
        clock[0] += 1.0
    assert b.fit(5) is None  # starts the measurement at step 5 (t = 105)
    for step in range(6, 25):
        clock[0] += 0.1
        assert b.fit(step) is None
    clock[0] += 0.1  # step 25 at t = 107: 0.1 s per step, 3 s left -> 30 more steps
    assert b.fit(25) == 55 and b.rate == pytest.approx(0.1)
    clock[0] += 10.0  # past the budget: never below the current step
    for step in range(26, 45):
        assert b.fit(step) is None
    assert b.fit(45) == 45 and b.spent()


def test_budget_never_exceeds_the_configured_steps(clock):
    b = common.StepBudget(1e6, start=10, max_steps=40)
    b.fit(15)
    clock[0] += 0.2
    assert b.fit(35) == 40 and not b.spent()
