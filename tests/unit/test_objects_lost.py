"""A finished chunk whose result is lost with its node is done again and counted; a lost rank answer is RankLost."""

from types import SimpleNamespace

import pytest
from ray.exceptions import ObjectLostError, OwnerDiedError

from troupe.cluster.durability import faults
from troupe.cluster.durability.faults import RankLost, RetryBudget
from troupe.cluster.fleet import pool as pool_module
from troupe.cluster.fleet.pool import Health, Member, Pool


class Handle:
    """An actor handle whose `generate.remote(chunk)` returns a ref naming its call."""

    def __init__(self, name: str) -> None:
        self.name, self.calls = name, []
        self.generate = SimpleNamespace(remote=self._call)

    def _call(self, chunk, *_args):
        self.calls.append(list(chunk))
        return (self.name, len(self.calls), tuple(chunk))


def _lost(ref) -> ObjectLostError:
    return ObjectLostError(f"{ref[0]}-{ref[1]}", None, "")


def _collect(monkeypatch, lose: set, retries: int = 0):
    """Two members, one chunk each; the refs in `lose` raise ObjectLostError when fetched."""
    budget = RetryBudget({"generator": retries})
    pool = Pool("generator", factory=None, timeout_s=5.0, budget=budget)
    handles = [Handle("a"), Handle("b")]
    pool.members = [Member(i, handle=h, health=Health.HEALTHY) for i, h in enumerate(handles)]

    def get(ref, timeout=None):
        if ref in lose:
            raise _lost(ref)
        return [f"{ref[0]}:{p}" for p in ref[2]]

    monkeypatch.setattr(pool_module.ray, "get", get)
    results = pool.submit_chunks("generate", [1, 2, 3, 4]).collect()
    return pool, budget, handles, results


def test_a_lost_result_is_done_again_on_its_member_and_counted(monkeypatch):
    pool, budget, (a, b), results = _collect(monkeypatch, lose={("b", 1, (3, 4))})
    assert results == [["a:1", "a:2"], ["b:3", "b:4"]]  # every prompt's result, in order
    assert a.calls == [[1, 2]] and b.calls == [[3, 4], [3, 4]]  # redone by the same member
    assert pool.objects_lost == 1 and budget.metrics() == {"faults/objects_lost": 1}  # no retry spent
    assert all(m.in_flight == 0 for m in pool.members)
    restored = RetryBudget({})
    restored.load_state_dict(budget.state_dict())
    assert restored.metrics() == {"faults/objects_lost": 1}


def test_a_result_lost_twice_goes_to_a_replacement(monkeypatch):
    spare = Handle("c")

    def replace(member, cause):
        assert cause == "lost its result"
        return Member(2, handle=spare, health=Health.HEALTHY)

    monkeypatch.setattr(Pool, "replace", lambda self, member, cause="died": replace(member, cause))
    pool, budget, (_a, b), results = _collect(
        monkeypatch, lose={("b", 1, (3, 4)), ("b", 2, (3, 4))}, retries=1
    )
    assert results == [["a:1", "a:2"], ["c:3", "c:4"]]
    assert b.calls == [[3, 4], [3, 4]] and spare.calls == [[3, 4]]
    assert budget.metrics()["faults/objects_lost"] == 2


def test_a_rank_answer_lost_with_its_node_is_rank_lost(monkeypatch):
    monkeypatch.setattr(faults.ray, "wait", lambda pending, num_returns, timeout: (pending[:1], pending[1:]))

    def get(ref):
        raise OwnerDiedError("ff", None, "")

    monkeypatch.setattr(faults.ray, "get", get)
    with pytest.raises(RankLost, match="learner: a rank's answer was lost \\(OwnerDiedError\\)"):
        faults.gather(["r0"], deadline_s=5.0, role="learner")
