"""Multi-node, simulated: a 3-node `ray.cluster_utils.Cluster` (head + 2 workers, separate raylets) runs the
tiny-model loop with learner ranks pinned to the head by a custom resource, generators spread one per worker by
another, and reward shards spread. Mid-run a node joins and the generator pool grows onto it (`troupe fleet`
request); then a worker is removed and its actors are replaced elsewhere. Every iteration completes and every
prompt is accounted for.

The cluster runs in a child process: the rest of the suite shares one local Ray in this one.
"""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ITERATIONS = 6


def child(out: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from tests.integration.conftest import tiny_config
    from troupe.actors.models import resolve_model
    from troupe.cluster.fleet.requests import request_resize
    from troupe.cluster.run.driver import build_fleet
    from troupe.cluster.run.loop import run_iteration
    from troupe.cluster.run.runtime import start_ray

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"trainer": 4}, "include_dashboard": False},
    )
    workers = [cluster.add_node(num_cpus=1, resources={"rollout": 1}) for _ in range(2)]
    cfg = tiny_config(
        f"ray.address={cluster.address}",
        "ray.actor_timeout_s=240",
        f"run.output_dir={out}",
        f"run.iterations={ITERATIONS}",
        "generator.replicas=2",
        "generator.num_cpus=0.25",
        "placement.generator.strategy=SPREAD",
        "placement.generator.resources={rollout: 1}",
        "placement.learner.resources={trainer: 1}",
        "placement.reward.strategy=SPREAD",
        "placement.wait_s=5",
        "reward.shards=2",
        "reward.num_cpus=0.1",  # SPREAD places actors that ask for resources; zero-CPU ones may share a node
    )
    start_ray(cfg.ray)
    run = build_fleet(cfg, resolve_model(cfg.model.policy))
    facts: dict = {"rows": [], "worker_nodes": [w.node_id for w in workers]}

    def nodes(pool):
        return sorted(m.info["node"] for m in pool.healthy())

    try:
        facts["learner_nodes"] = sorted({i["node"] for i in run.learners.info})
        facts["head_node"] = ray.get_runtime_context().get_node_id()
        facts["generator_nodes_start"] = nodes(run.generators)
        facts["reward_nodes_start"] = nodes(run.rewards.pools["rules"])
        for iteration in range(ITERATIONS):
            if iteration == 2:  # a node joins; the pool grows onto it
                joined = cluster.add_node(num_cpus=1, resources={"rollout": 2})
                facts["joined_node"] = joined.node_id
                request_resize(out, {"generators": 3})
            if iteration == 4:  # a worker leaves with its generator (and any shard on it)
                cluster.remove_node(workers[0])
                facts["removed_node"] = workers[0].node_id
            facts["rows"].append(run_iteration(run, iteration))
            facts[f"generator_nodes_{iteration}"] = nodes(run.generators)
        facts["generator_replacements"] = run.generators.replacements
        facts["reward_replacements"] = run.rewards.pools["rules"].replacements
    finally:
        run.shutdown()
        ray.shutdown()
        cluster.shutdown()
    keep = ("iteration", "samples", "fleet/generators", "fleet/added", "weight_version", "accounting/")
    facts["rows"] = [{k: v for k, v in r.items() if k.startswith(keep)} for r in facts["rows"]]
    (__import__("pathlib").Path(out) / "facts.json").write_text(json.dumps(facts))


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    out = tmp_path_factory.mktemp("multinode")
    code = f"from tests.integration.test_multinode import child; child({str(out)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads((out / "facts.json").read_text())


def test_roles_are_placed_by_their_resources_and_spread(facts):
    assert facts["learner_nodes"] == [facts["head_node"]]  # the trainer resource is on the head only
    assert facts["generator_nodes_start"] == sorted(facts["worker_nodes"])  # one per worker
    assert len(set(facts["reward_nodes_start"])) == 2  # SPREAD: two nodes


def test_a_joining_node_takes_the_grown_generator(facts):
    grown = facts["rows"][2]
    assert grown["fleet/generators"] == 3 and grown["fleet/added"] == 1
    assert facts["joined_node"] in facts["generator_nodes_2"]
    assert len(set(facts["generator_nodes_2"])) == 3


def test_a_leaving_node_has_its_generator_replaced_elsewhere(facts):
    assert facts["removed_node"] not in facts["generator_nodes_4"]
    assert facts["generator_replacements"] == 1
    assert len(facts["generator_nodes_4"]) == 3
    assert facts["generator_nodes_4"].count(facts["joined_node"]) == 2  # where the rollout resource was left


def test_every_iteration_completes_and_the_accounting_adds_up(facts):
    rows = facts["rows"]
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS))
    assert all(r["samples"] == 16 for r in rows)
    assert rows[-1]["weight_version"] == ITERATIONS
    last = rows[-1]
    assert last["accounting/lost"] == 0 and last["accounting/in_flight"] == 0
    assert last["accounting/entered"] == last["accounting/trained"] == 4 * ITERATIONS
