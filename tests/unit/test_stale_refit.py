"""Generators that missed a weight sync are refitted before they generate (Pool.refit_stale, RunState.refit_stale),
so a run whose only generator missed one goes on instead of failing with "no healthy members". The whole path
(a real generator failing a sync) is the chaos integration test's ground, not run here."""

from types import SimpleNamespace

import pytest
from ray.exceptions import GetTimeoutError

from troupe.actors.weight_buckets import WeightTransferError
from troupe.cluster.config.schema import FaultsConfig
from troupe.cluster.fleet.pool import Health, Member, Pool
from troupe.cluster.run import loop
from troupe.cluster.run.pipeline import RolloutPipeline


def _pool(*health):
    pool = Pool("generator", factory=None, timeout_s=1)
    pool.members = [Member(i, handle=None, health=h) for i, h in enumerate(health)]
    return pool


def test_only_stale_members_are_refitted_and_then_serve():
    pool = _pool(Health.HEALTHY, Health.STALE, Health.STALE)
    refitted = []
    assert pool.refit_stale(lambda m: refitted.append(m.index)) == {"refit": 2, "replaced": 0}
    assert refitted == [1, 2] and len(pool.healthy()) == 3


@pytest.mark.parametrize("error", [WeightTransferError("checksum"), GetTimeoutError("slow")])
def test_a_member_that_fails_its_refit_is_replaced(error):
    pool = _pool(Health.STALE, Health.STALE)
    replaced = []

    def replace(member, cause):  # the real one spends faults.retries.generator and joins through on_join
        replaced.append((member.index, cause))
        pool.members.remove(member)
        pool.members.append(Member(9, handle=None, health=Health.HEALTHY))

    pool.replace = replace

    def refit(member):
        if member.index == 0:
            raise error

    assert pool.refit_stale(refit) == {"refit": 1, "replaced": 1}
    assert replaced == [(0, f"could not take the current weights ({type(error).__name__})")]
    assert sorted(m.index for m in pool.healthy()) == [1, 9]


def test_other_errors_are_not_taken_for_a_missed_sync():
    pool = _pool(Health.STALE)

    def refit(member):
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        pool.refit_stale(refit)


def test_the_only_generator_stale_is_refitted_with_the_current_weights(monkeypatch):
    """The default fleet has one generator: after it misses a sync, the next generate finds it serving."""
    calls = []
    monkeypatch.setattr(loop, "refit", lambda member, bundle, deadline_s: calls.append((bundle, deadline_s)))
    generators = _pool(Health.STALE)
    with pytest.raises(RuntimeError, match="no healthy members"):
        generators.submit_chunks("generate", [1, 2])
    bundle = SimpleNamespace(version=3)
    pipeline = RolloutPipeline(1, 1)
    pipeline.queue.append(object())  # one batch in flight (async): the refit waits behind it
    run = SimpleNamespace(
        generators=generators,
        version=3,
        last_bundle=bundle,
        faults=FaultsConfig(sync_s=10.0, generate_s=100.0),
        pipeline=pipeline,
    )
    run.refit = lambda member, deadline_s=None: loop.RunState.refit(run, member, deadline_s)
    assert loop.RunState.refit_stale(run) == {"fleet/stale_refit": 1, "fleet/stale_replaced": 0}
    assert calls == [(bundle, 110.0)] and generators.healthy() == generators.members
