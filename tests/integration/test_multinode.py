"""Multi-node, simulated: a 3-node `ray.cluster_utils.Cluster` (head + 2 workers, separate raylets) runs the
tiny-model loop with learner ranks pinned to the head by a custom resource, generators spread one per worker by
another, and reward shards spread. Mid-run a node joins and the generator pool grows onto it (`troupe fleet`
request); then a worker is removed while it holds finished rollouts (its generator's chunk is done, the result sits
in that node's object store, uncollected): the result is lost with the node, the chunk is done again and the
generator replaced elsewhere. Every iteration completes and every prompt is accounted for.

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
    from troupe.cluster.fleet.pool import PendingChunks
    from troupe.cluster.fleet.requests import request_resize
    from troupe.cluster.run.driver import build_fleet
    from troupe.cluster.run.loop import run_iteration
    from troupe.cluster.run.runtime import _follow_cluster_token, start_ray

    _follow_cluster_token()  # the cluster takes the same decision as its driver, as `ray start` and troupe do
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "resources": {"trainer": 4},
            "include_dashboard": False,
            # every result in the object store of the node that made it, as a real model's rollouts are (Ray
            # returns results under 100 KiB inline, to the caller): a lost node takes its results with it
            "_system_config": {"max_direct_call_object_size": 1024},
        },
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

    collect, lose_node = PendingChunks.collect, []

    def collect_after_node_loss(self, deadline_s=None):
        if lose_node and self.method == "generate":  # every chunk finished, none fetched: then the node goes
            worker = lose_node.pop()
            ray.wait(list(self.refs), num_returns=len(self.refs), fetch_local=False)
            facts["finished_on"] = sorted(m.info["node"] for m in self.members)
            cluster.remove_node(worker)
            facts["removed_node"] = worker.node_id
        return collect(self, deadline_s)

    PendingChunks.collect = collect_after_node_loss

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
            if iteration == 4:  # a worker leaves with its generator's finished chunk (and any shard on it)
                lose_node.append(workers[0])
            facts["rows"].append(run_iteration(run, iteration))
            facts[f"generator_nodes_{iteration}"] = nodes(run.generators)
        facts["generator_replacements"] = run.generators.replacements
        facts["reward_replacements"] = run.rewards.pools["rules"].replacements
        facts["generator_objects_lost"] = run.generators.objects_lost
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


def test_a_node_lost_with_finished_rollouts_has_the_chunk_redone_and_its_generator_replaced(facts):
    assert facts["removed_node"] in facts["finished_on"]  # it held a finished chunk when it went
    assert facts["generator_objects_lost"] == 1  # that result was lost and the chunk done again
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
