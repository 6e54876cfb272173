"""Retry budgets that refill: losses older than faults.retry_window_iterations stop counting against
faults.retries; the clocks go in checkpoints, and the older format still loads."""

import json
from types import SimpleNamespace

import pytest

from troupe.cluster.config.checks import ConfigError, validate
from troupe.cluster.config.schema import TroupeConfig
from troupe.cluster.durability.faults import RetriesExhausted, RetryBudget
from troupe.cluster.run import loop


def _ticks(budget: RetryBudget, n: int) -> None:
    for _ in range(n):
        budget.tick()


def test_losses_older_than_the_window_stop_counting():
    budget = RetryBudget({"generator": 1}, window=3)
    budget.spend("generator", "member 0 died")  # clock 0
    _ticks(budget, 2)
    assert budget.metrics() == {"faults/lost/generator": 1, "faults/window/generator": 1}
    with pytest.raises(RetriesExhausted, match=r"lost 2 time\(s\) in the last 3 iterations"):
        budget.spend("generator", "member 1 died")  # clock 2: both in the window
    budget = RetryBudget({"generator": 1}, window=3)
    budget.spend("generator", "member 0 died")
    _ticks(budget, 3)  # the first loss leaves the window
    assert budget.metrics()["faults/window/generator"] == 0
    budget.spend("generator", "member 1 died")
    assert budget.metrics() == {"faults/lost/generator": 2, "faults/window/generator": 1}


def test_window_zero_counts_the_whole_run():
    budget = RetryBudget({"reward": 1}, window=0)
    budget.spend("reward", "shard 0 died")
    _ticks(budget, 1000)
    with pytest.raises(
        RetriesExhausted, match=r"reward: lost 2 time\(s\), more than faults\.retries\.reward=1"
    ):
        budget.spend("reward", "shard 1 died")


def test_clocks_survive_a_checkpoint_and_the_old_format_loads():
    budget = RetryBudget({"learner": 2}, window=10)
    _ticks(budget, 4)
    budget.spend("learner", "rank 1 died")
    state = json.loads(json.dumps(budget.state_dict()))  # what state.json holds
    assert state == {"clock": 4, "lost": {"learner": 1}, "clocks": {"learner": [4]}}
    resumed = RetryBudget({"learner": 2}, window=10)
    resumed.load_state_dict(state)
    _ticks(resumed, 9)
    assert resumed.metrics()["faults/window/learner"] == 1  # clock 13: lost at 4, still in the window
    resumed.tick()
    assert resumed.metrics() == {"faults/lost/learner": 1, "faults/window/learner": 0}
    # an older troupe's checkpoint: {role: losses}; they count for one window from the resume
    old = RetryBudget({"generator": 3, "learner": 2}, window=5)
    old.load_state_dict({"generator": 3, "learner": 1})
    assert old.metrics() == {
        "faults/lost/generator": 3,
        "faults/window/generator": 3,
        "faults/lost/learner": 1,
        "faults/window/learner": 1,
    }
    with pytest.raises(RetriesExhausted, match="faults.retries.generator=3"):
        old.spend("generator", "member 2 died")
    _ticks(old, 5)
    old.spend("learner", "rank 0 died")
    assert old.metrics()["faults/window/learner"] == 1


def test_the_loop_ticks_the_clock_once_per_iteration(monkeypatch):
    rows = []
    monkeypatch.setattr(loop, "driver_state", lambda run, i: {"iteration": i})
    monkeypatch.setattr(loop, "run_iteration", lambda run, i: {"iteration": i, "clock": run.budget.clock})
    budget = RetryBudget({}, window=50)
    run = SimpleNamespace(iterations=4, budget=budget, last_samples=[], faults=TroupeConfig().faults)
    job = SimpleNamespace(record=rows.append, record_samples=lambda samples: None)
    checkpoints = SimpleNamespace(due=lambda i: False, stop_signal=None)
    loop.train(run, job, checkpoints, start=1)
    assert [r["clock"] for r in rows] == [1, 2, 3] and budget.clock == 3


def test_the_window_is_checked_and_defaults_to_50():
    cfg = TroupeConfig()
    assert cfg.faults.retry_window_iterations == 50
    cfg.faults.retry_window_iterations = -1
    with pytest.raises(ConfigError, match="faults.retry_window_iterations=-1: expected an integer >= 0"):
        validate(cfg)
