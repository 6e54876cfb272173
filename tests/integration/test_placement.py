"""Placement on the local Ray: resources no node has fail at once naming the role (or after placement.wait_s on
a cluster that may grow), pool options per strategy, and the colocated layout (generator i in learner rank i's
placement bundle) on a running tiny-model fleet."""

import time

import pytest
import ray

from tests.integration.conftest import running_fleet, tiny_config
from troupe.cluster.config.checks import ConfigError, validate
from troupe.cluster.config.schema import RolePlacement
from troupe.cluster.fleet.placement import PlacementError, check_feasible, pool_options
from troupe.cluster.run.loop import run_iteration

pytestmark = pytest.mark.integration


def test_resources_no_node_has_fail_at_once_naming_the_role(ray_session):
    check_feasible("generator", {"CPU": 1}, {}, wait_s=0, may_grow=False)
    start = time.monotonic()
    with pytest.raises(
        PlacementError, match=r"generator: no node has \{'CPU': 0.5, 'rollout': 1.0\}.*nodes: \["
    ):
        pool_options("generator", RolePlacement(resources={"rollout": 1}), {"CPU": 0.5}, 60, may_grow=False)
    assert time.monotonic() - start < 5  # an embedded Ray cannot grow: no waiting
    with pytest.raises(PlacementError, match="with labels {'zone': 'b'}.*waited 1s"):
        check_feasible("reward", {"CPU": 0.1}, {"zone": "b"}, wait_s=1, may_grow=True)


def test_pool_options_per_strategy(ray_session):
    assert pool_options("reward", RolePlacement(), {"CPU": 0.0}, 1, False) == {}
    spread = pool_options("generator", RolePlacement(strategy="SPREAD", labels={}), {"CPU": 0.5}, 1, False)
    assert spread == {"scheduling_strategy": "SPREAD"}
    with pytest.raises(ConfigError, match="placement.generator.strategy must be DEFAULT or SPREAD"):
        pool_options("generator", RolePlacement(strategy="PACK"), {"CPU": 0.5}, 1, False)


def test_colocated_layout_needs_one_generator_per_rank():
    with pytest.raises(ConfigError, match=r"generator.replicas \(1\) must equal learner.world_size \(2\)"):
        validate(tiny_config("placement.layout=colocated", "generator.replicas=1"))


def test_colocated_generators_run_in_the_learner_ranks_bundles(ray_session, tiny_model_path):
    cfg = tiny_config("placement.layout=colocated", "generator.replicas=2", "generator.num_cpus=0.25")
    with running_fleet(cfg, tiny_model_path) as fleet:
        group = fleet.learners.placement.group
        assert group is not None, "a colocated layout reserves one bundle per rank, on CPU too"
        assert group.bundle_specs == [{"CPU": 0.75}, {"CPU": 0.75}]
        ids = {m.info["placement_group"] for m in fleet.generators.healthy()}
        assert ids == {group.id.hex()}
        assert sorted(m.slot for m in fleet.generators.healthy()) == [0, 1]
        record = run_iteration(fleet, 0)
        assert record["samples"] == 16 and record["sync/generators_synced"] == 2
        # a replacement takes the dead member's bundle
        victim = fleet.generators.healthy()[1]
        ray.kill(victim.handle)
        record = run_iteration(fleet, 1)
        assert record["samples"] == 16
        new = max(fleet.generators.members, key=lambda m: m.index)
        assert new.slot == victim.slot and new.info["placement_group"] == group.id.hex()
