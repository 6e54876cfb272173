"""An unexpected error ends the run with a checkpoint of the last whole state, then the original error."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from troupe.cluster.durability import run_checkpoints
from troupe.cluster.durability.accounting import Ledger
from troupe.cluster.durability.checkpoint import checkpoints_root, complete, verify
from troupe.cluster.durability.run_checkpoints import RunCheckpoints
from troupe.cluster.run import loop

PROMPTS = 4


class Learners:
    """Writes a checkpoint's parts as the learner group would; `broken`: the ranks are gone."""

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken

    def save_hf(self, folder: str, _tokenizer: str) -> None:
        Path(folder).mkdir(parents=True)
        (Path(folder) / "model.safetensors").write_bytes(b"weights")
        if self.broken:
            raise RuntimeError("learner rank 0 is gone")

    def save_state(self, folder: str) -> None:
        Path(folder).mkdir(parents=True)
        (Path(folder) / "rank0.safetensors").write_bytes(b"state")


def _driver_state(run, iteration: int) -> dict:
    return {"iteration": iteration, "weight_version": run.version, "ledger": run.ledger.state_dict()}


def _train(monkeypatch, tmp_path, fail_at: int, phase: str, every: int = 0, learners=None):
    """Iterations of a fake run; iteration `fail_at` raises ValueError in `phase` (score: before the learners
    are called; learn: after they stepped; record: after its row is recorded)."""
    monkeypatch.setattr(loop, "driver_state", _driver_state)
    monkeypatch.setattr(run_checkpoints, "driver_state", _driver_state)
    rows = []

    def run_iteration(run, iteration):
        run.ledger.enter(PROMPTS)
        if iteration == fail_at and phase == "score":
            raise ValueError("shard 2: objective bug")
        run.learning = True
        run.version += 1
        if iteration == fail_at and phase == "learn":
            raise ValueError("sync: bucket checksum")
        return {"iteration": iteration, **run.ledger.settle()}

    def record_samples(_samples):
        if rows[-1]["iteration"] == fail_at and phase == "record":
            raise OSError("No space left on device: rollouts.jsonl")

    monkeypatch.setattr(loop, "run_iteration", run_iteration)
    run = SimpleNamespace(
        iterations=5,
        budget=loop.RetryBudget({}),
        last_samples=[],
        faults=loop.FaultsConfig(),
        learners=learners or Learners(),
        critic=None,
        ledger=Ledger(),
        version=0,
        learning=False,
    )
    job = SimpleNamespace(record=rows.append, record_samples=record_samples)
    checkpoints = RunCheckpoints(tmp_path, every=every, keep=3, tokenizer_path="tok")
    with pytest.raises((ValueError, OSError)) as raised:
        loop.train(run, job, checkpoints)
    return run, rows, raised.value, complete(checkpoints_root(tmp_path))


def test_an_error_before_learning_checkpoints_the_iteration_before_and_reraises(monkeypatch, tmp_path):
    run, rows, error, done = _train(monkeypatch, tmp_path, fail_at=2, phase="score")
    assert str(error) == "shard 2: objective bug" and len(rows) == 2
    assert [p.name for p in done] == ["iter-000001"]
    state = verify(done[0])
    assert state["iteration"] == 1 and state["weight_version"] == 2
    # the failed iteration's prompts are retried by the resume, not lost
    assert state["ledger"]["retried"] == PROMPTS and state["ledger"]["trained"] == 2 * PROMPTS
    assert run.ledger.totals()["accounting/lost"] == 0


def test_an_error_after_the_learners_stepped_keeps_the_newest_checkpoint(monkeypatch, tmp_path):
    run, rows, error, done = _train(monkeypatch, tmp_path, fail_at=2, phase="learn", every=2)
    assert str(error) == "sync: bucket checksum" and len(rows) == 2
    # the learners hold iteration 2's update, which no row records: iteration 1 (due) stays the newest
    assert [p.name for p in done] == ["iter-000001"] and verify(done[0])["weight_version"] == 2
    assert run.ledger.retried == PROMPTS and run.ledger.totals()["accounting/lost"] == 0


def test_an_error_after_the_row_is_recorded_checkpoints_that_iteration(monkeypatch, tmp_path):
    _run, rows, error, done = _train(monkeypatch, tmp_path, fail_at=1, phase="record")
    assert isinstance(error, OSError) and len(rows) == 2
    assert [p.name for p in done] == ["iter-000001"] and verify(done[0])["weight_version"] == 2


def test_an_error_in_the_first_iteration_writes_nothing(monkeypatch, tmp_path):
    _run, rows, error, done = _train(monkeypatch, tmp_path, fail_at=0, phase="score")
    assert str(error) == "shard 2: objective bug" and rows == [] and done == []


def test_a_failing_save_logs_and_reraises_the_original_leaving_no_folder(monkeypatch, tmp_path, caplog):
    learners = Learners(broken=True)
    _run, _rows, error, done = _train(monkeypatch, tmp_path, fail_at=2, phase="score", learners=learners)
    assert str(error) == "shard 2: objective bug"  # not the save's RuntimeError
    assert done == [] and list(checkpoints_root(tmp_path).iterdir()) == []  # no partial folder either
    assert "failed too (RuntimeError: learner rank 0 is gone)" in caplog.text
    assert "ValueError: shard 2: objective bug" in caplog.text
