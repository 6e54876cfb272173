"""A stop signal (SIGTERM/SIGINT) in the RL loop: the iteration it arrives in ends with a checkpoint of it, even when
it arrives after the loop decided no checkpoint was due, then `Stopped`; one arriving in the last iteration lets
the run finish (its final checkpoint follows)."""

import signal
from types import SimpleNamespace

import pytest

from tests.unit.test_error_checkpoint import Learners, _driver_state
from troupe.cluster.durability import run_checkpoints
from troupe.cluster.durability.accounting import Ledger
from troupe.cluster.durability.checkpoint import checkpoints_root, complete, verify
from troupe.cluster.durability.run_checkpoints import RunCheckpoints
from troupe.cluster.durability.stop_signal import Stopped
from troupe.cluster.run import loop


def _run(monkeypatch, tmp_path, signal_at: int):
    """5 fake iterations without periodic checkpoints; the signal arrives in iteration `signal_at`, just after
    the loop asked whether a checkpoint is due."""
    monkeypatch.setattr(loop, "driver_state", _driver_state)
    monkeypatch.setattr(run_checkpoints, "driver_state", _driver_state)

    def run_iteration(run, iteration):
        run.ledger.enter(4)
        run.version += 1
        return {"iteration": iteration, **run.ledger.settle()}

    monkeypatch.setattr(loop, "run_iteration", run_iteration)
    run = SimpleNamespace(iterations=5, budget=loop.RetryBudget({}), last_samples=[], faults=loop.FaultsConfig(),
                          learners=Learners(), critic=None, ledger=Ledger(), version=0, learning=False)  # fmt: skip
    rows = []
    checkpoints = RunCheckpoints(tmp_path, every=0, keep=3, tokenizer_path="tok")
    due = checkpoints.due

    def due_then_signal(iteration):
        answer = due(iteration)
        if iteration == signal_at:
            checkpoints.stop_signal = signal.SIGTERM
        return answer

    checkpoints.due = due_then_signal
    job = SimpleNamespace(record=rows.append, record_samples=lambda _samples: None)
    return run, rows, checkpoints, job


def test_a_signal_after_the_checkpoint_decision_still_checkpoints_its_iteration(monkeypatch, tmp_path):
    run, rows, checkpoints, job = _run(monkeypatch, tmp_path, signal_at=1)
    with pytest.raises(Stopped) as stopped:
        loop.train(run, job, checkpoints)
    assert [r["iteration"] for r in rows] == [0, 1]
    assert stopped.value.checkpoint.name == "iter-000001" and stopped.value.signum == signal.SIGTERM
    assert verify(stopped.value.checkpoint)["weight_version"] == 2
    assert [p.name for p in complete(checkpoints_root(tmp_path))] == ["iter-000001"]


def test_a_signal_in_the_last_iteration_lets_the_run_finish(monkeypatch, tmp_path):
    run, rows, checkpoints, job = _run(monkeypatch, tmp_path, signal_at=4)
    loop.train(run, job, checkpoints)
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3, 4]
    assert complete(checkpoints_root(tmp_path)) == []  # the driver's final checkpoint follows
