"""wake_all (cluster/sync/sleep.py): generators a weight sync did not reach wake, or refit when sleep freed their
weights, even before anything was trained (RunState.refit sends version 0 then)."""

from types import SimpleNamespace

from troupe.cluster.fleet.pool import Health, Member, Pool
from troupe.cluster.run.loop import RunState
from troupe.cluster.sync import sleep


class Handle:
    def __init__(self, awake: bool):
        self.wake = SimpleNamespace(remote=lambda: awake)  # ray.get is the identity below


def test_a_generator_whose_weights_sleep_freed_is_stale_and_refits_even_at_version_0(monkeypatch):
    monkeypatch.setattr(sleep.ray, "get", lambda value, timeout=None: value)
    pool = Pool("generator", factory=None, timeout_s=1)
    kept, freed = Member(0, Handle(True), Health.HEALTHY), Member(1, Handle(False), Health.HEALTHY)
    pool.members = [kept, freed]

    assert sleep.wake_all(pool, 1) == {"sleep/woke_without_weights": 1}
    assert kept.health is Health.HEALTHY and freed.health is Health.STALE

    exported, refitted = [], []
    learners = SimpleNamespace(export_weights=lambda v, mb: exported.append(v) or SimpleNamespace(version=v))
    run = SimpleNamespace(version=0, last_bundle=None, learners=learners, sync_bucket_mb=1, faults=None)
    monkeypatch.setattr(
        "troupe.cluster.run.loop.refit", lambda m, bundle, s: refitted.append((m.index, bundle))
    )
    RunState.refit(run, freed, deadline_s=1)
    assert exported == [0] and refitted == [(1, run.last_bundle)] and run.last_bundle.version == 0
    assert "weights_lost" not in freed.info  # taken once

    RunState.refit(run, kept, deadline_s=1)  # version 0 and weights kept: what it loaded at start is current
    assert exported == [0] and refitted[-1] == (0, run.last_bundle)  # the bundle above is current: sent as is
