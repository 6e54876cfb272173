"""Run checkpoints (atomic write, manifest, refusal of partial or corrupt ones, pruning, resume=latest), the
accounting ledger, retry budgets, metrics rewind and the driver state's round trip."""

import json
import random

import pytest

from troupe.cluster.durability.accounting import Ledger
from troupe.cluster.durability.checkpoint import (
    CheckpointError,
    complete,
    find_checkpoint,
    set_aside_after,
    verify,
    write_checkpoint,
)
from troupe.cluster.durability.faults import RetriesExhausted, RetryBudget, is_collective_failure
from troupe.cluster.durability.run_checkpoints import _jsonable, _tuples
from troupe.cluster.observe.metrics import MetricsWriter


def _parts(payload: bytes):
    def write(tmp):
        (tmp / "policy").mkdir()
        (tmp / "policy" / "model.safetensors").write_bytes(payload)
        (tmp / "policy-ds").mkdir()
        (tmp / "policy-ds" / "rank0.safetensors").write_bytes(payload[::-1])

    return write


def test_checkpoint_is_written_whole_verified_and_pruned(tmp_path):
    for it in range(4):
        folder, stats = write_checkpoint(tmp_path, it, _parts(bytes([it]) * 100), {"iteration": it}, keep=2)
        assert folder.name == f"iter-{it:06d}" and stats["bytes"] > 200
    kept = complete(tmp_path / "checkpoints")
    assert [p.name for p in kept] == ["iter-000002", "iter-000003"]  # the newest two
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert verify(kept[-1])["iteration"] == 3
    manifest = json.loads((kept[-1] / "manifest.json").read_text())
    assert set(manifest["files"]) == {"policy/model.safetensors", "policy-ds/rank0.safetensors", "state.json"}
    assert find_checkpoint(tmp_path, "latest") == kept[-1]
    assert find_checkpoint(tmp_path, str(kept[0])) == kept[0].resolve()


def test_partial_and_corrupt_checkpoints_are_refused_naming_the_file(tmp_path):
    folder, _ = write_checkpoint(tmp_path, 0, _parts(b"x" * 64), {"iteration": 0}, keep=3)
    # an interrupted write leaves a .tmp folder without a manifest: never a resume candidate
    partial = tmp_path / "checkpoints" / "iter-000001.tmp"
    partial.mkdir()
    (partial / "state.json").write_text("{}")
    assert find_checkpoint(tmp_path, "latest") == folder
    with pytest.raises(CheckpointError, match=r"iter-000001\.tmp is partial: .*manifest\.json is missing"):
        verify(partial)
    # a flipped byte in a weight file
    weights = folder / "policy" / "model.safetensors"
    weights.write_bytes(b"y" + weights.read_bytes()[1:])
    with pytest.raises(CheckpointError, match=r"policy/model\.safetensors is corrupt"):
        verify(folder)
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"policy/model\.safetensors is missing"):
        verify(folder)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        find_checkpoint(tmp_path / "elsewhere", "latest")


def test_rewriting_an_iteration_replaces_its_checkpoint(tmp_path):
    """After a rollback the same iteration is checkpointed again: the new one replaces the old."""
    write_checkpoint(tmp_path, 1, _parts(b"a" * 10), {"iteration": 1, "v": "old"}, keep=3)
    folder, _ = write_checkpoint(tmp_path, 1, _parts(b"b" * 10), {"iteration": 1, "v": "new"}, keep=3)
    assert verify(folder)["v"] == "new" and len(complete(tmp_path / "checkpoints")) == 1


def test_resuming_an_older_checkpoint_sets_the_newer_timeline_aside(tmp_path):
    """resume=<iter 1> while iter 3 exists: iter 3 belongs to an abandoned timeline; it must not be pruned in
    place of this run's checkpoints, nor be what resume=latest picks later."""
    for it in (1, 3):
        write_checkpoint(tmp_path, it, _parts(b"z" * 8), {"iteration": it}, keep=3)
    root = tmp_path / "checkpoints"
    moved = set_aside_after(root, root / "iter-000001")
    assert [p.name for p in moved] == ["iter-000003.abandoned"]
    folder, _ = write_checkpoint(tmp_path, 2, _parts(b"w" * 8), {"iteration": 2}, keep=1)
    assert [p.name for p in complete(root)] == ["iter-000002"] == [find_checkpoint(tmp_path, "latest").name]
    assert (root / "iter-000003.abandoned" / "manifest.json").is_file()  # kept for the user, never resumed


def test_ledger_accounts_for_every_prompt_through_rollback_and_resume():
    ledger = Ledger()
    rows = []
    for dropped in ({}, {"tie": 2}, {}):
        ledger.enter(8)
        rows.append(ledger.settle(dropped))
    assert rows[1]["prompts/trained"] == 6 and rows[1]["prompts/dropped/tie"] == 2
    assert ledger.totals()["accounting/lost"] == 0 and ledger.trained == 22
    ledger.enter(8)  # iteration 3 in flight when a rank dies; roll back to the checkpoint after iteration 0
    moved = ledger.roll_back(rows[1:])
    assert moved == 8 + 8 + 8
    t = ledger.totals()
    assert (t["accounting/entered"], t["accounting/trained"], t["accounting/retried"]) == (32, 8, 24)
    assert t["accounting/dropped"] == 0 and t["accounting/lost"] == 0
    # a resume: the restored ledger, plus the rows the stopped run wrote after the checkpoint
    saved = Ledger()
    saved.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    saved.resumed([{"prompts/entered": 8}, {"prompts/entered": 8}])
    assert saved.totals()["accounting/lost"] == 0 and saved.retried == 40
    with pytest.raises(ValueError, match="3 prompts dropped of 2"):
        saved.enter(2)
        saved.settle({"tie": 3})


def test_retry_budget_names_the_role_when_spent():
    budget = RetryBudget({"generator": 1, "learner": 0})
    budget.spend("generator", "member 0 died")
    assert budget.metrics() == {"faults/lost/generator": 1, "faults/window/generator": 1}
    with pytest.raises(
        RetriesExhausted, match=r"generator: lost 2 time\(s\), more than faults\.retries\.generator=1"
    ):
        budget.spend("generator", "member 1 died")
    with pytest.raises(RetriesExhausted, match="faults.retries.learner=0"):
        budget.spend("learner", "rank 1 died")


def test_collective_failures_are_told_from_other_errors():
    assert is_collective_failure(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    assert is_collective_failure(RuntimeError("NCCL error in: ProcessGroupNCCL.cpp, unhandled system error"))
    assert not is_collective_failure(ValueError("shape mismatch: [4, 8] vs [4, 9]"))


def test_metrics_rewind_keeps_rows_up_to_the_iteration_and_drops_a_torn_line(tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    for it in (-1, 0, 1, 2):
        writer.write({"iteration": it, "prompts/entered": 4})
    writer._file.write('{"iteration": 3, "trunc')  # killed mid-write
    writer._file.flush()
    removed = writer.rewind(0)
    assert [r["iteration"] for r in removed] == [1, 2]
    writer.write({"iteration": 1})
    writer.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [-1, 0, 1]


def test_driver_rng_state_survives_json():
    rng = random.Random(7)
    rng.random()
    state = json.loads(json.dumps(_jsonable(rng.getstate())))
    other = random.Random(0)
    other.setstate(_tuples(state))
    assert other.random() == rng.random()
