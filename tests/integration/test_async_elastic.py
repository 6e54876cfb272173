"""Async mode and elastic fleets on a running tiny-model fleet: rollouts one weight version behind with truncated
importance weights, groups past the staleness bound sampled again, and a generator pool grown and shrunk by a
`troupe fleet` request between iterations, its new member serving only with the current weights."""

import pytest
import ray

from tests.integration.conftest import running_fleet, tiny_config
from troupe.cluster.fleet.pool import Health
from troupe.cluster.fleet.requests import request_resize
from troupe.cluster.run.loop import run_iteration

pytestmark = pytest.mark.integration


@pytest.fixture  # each test its own fleet: the tests step it, and each assumes where the run stands
def async_fleet(ray_session, tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("async")
    cfg = tiny_config(
        "run.mode=async",
        "run.max_staleness=1",
        "run.iterations=50",
        f"run.output_dir={out}",
        "generator.num_cpus=0.25",  # room for a second generator on the 2-CPU local Ray
    )
    with running_fleet(cfg, tiny_model_path) as f:
        f.iteration = 0
        yield f


def _step(fleet) -> dict:
    record = run_iteration(fleet, fleet.iteration)
    fleet.iteration += 1
    return record


def test_async_rollouts_are_one_version_behind_and_importance_corrected(async_fleet):
    first = _step(async_fleet)
    assert first["staleness/max"] == 0  # the first batch had nothing to overlap with
    assert async_fleet.pipeline.queue, "the next batch should be in flight while the learners train"
    in_flight = async_fleet.pipeline.queue[0]
    assert async_fleet.pipeline.cursor_state(async_fleet.prompts) == in_flight.cursor_before
    assert async_fleet.prompts.state_dict() != in_flight.cursor_before  # the cursor itself is ahead
    for _ in range(2):
        record = _step(async_fleet)
        assert record["staleness/max"] == 1 and record["staleness/frac_1"] == 1.0
        assert record["behaviour_version/min"] == record["weight_version"] - 2  # sampled before the last sync
        assert record["train/stale_rows_frac"] == 1.0
        assert record["train/old_logprobs_forward"] == 1.0  # off-policy: pi_old is computed, not assumed
        assert 0 < record["train/tis/weight_mean"] <= async_fleet.algo.tis_cap
        assert record["rollouts/regenerated"] == 0
        assert record["accounting/lost"] == 0 and record["accounting/in_flight"] == 0


def test_groups_past_the_staleness_bound_are_sampled_again(async_fleet):
    """Two batches in flight with a bound of one: the second is two versions old when its turn comes."""
    async_fleet.pipeline.depth = 2
    try:
        records = [_step(async_fleet) for _ in range(3)]
    finally:
        async_fleet.pipeline.depth = 1
    assert max(r["staleness/max"] for r in records) <= 1
    assert sum(r["rollouts/regenerated"] for r in records) > 0
    assert all(r["samples"] == 16 and r["accounting/lost"] == 0 for r in records)


def test_a_fleet_request_grows_and_shrinks_the_generators_between_iterations(async_fleet):
    pool = async_fleet.generators
    assert len(pool.live()) == 1
    _step(async_fleet)  # past the initial weights: a new member must load the latest export
    request_resize(async_fleet.fleet.run_dir, {"generators": 2})
    grown = _step(async_fleet)
    assert grown["fleet/generators"] == 2 and grown["fleet/added"] == 1
    new = max(pool.members, key=lambda m: m.index)
    # It joined with the weights of the version before this iteration's sync, then took that sync too.
    assert ray.get(new.handle.get_stats.remote(), timeout=60)["version"] == async_fleet.version
    assert ray.get(new.handle.get_stats.remote(), timeout=60)["weight_loads"] == 2
    assert grown["samples"] == 16 and grown["accounting/lost"] == 0
    served = _step(async_fleet)  # the new member has a chunk of this batch
    assert ray.get(new.handle.get_stats.remote(), timeout=60)["prompts"] > 0
    assert served["staleness/max"] <= 1

    request_resize(async_fleet.fleet.run_dir, {"generators": 1})
    assert new.in_flight == 1  # its chunk of the next batch is in flight
    redone = pool.redone_chunks
    shrunk = _step(async_fleet)
    assert shrunk["fleet/generators"] == 1 and shrunk["fleet/retired"] == 1
    # It was drained, not killed: its chunk was answered by it, and nothing was redone elsewhere.
    assert pool.redone_chunks == redone and new.health is Health.DEAD and new not in pool.members
    after = _step(async_fleet)
    assert after["samples"] == 16 and after["accounting/lost"] == 0
    assert after["accounting/entered"] == after["accounting/trained"] + after["accounting/retried"]
