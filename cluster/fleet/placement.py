"""Placement: where each role's actors run.

- Pools (generators, reward shards): Ray's DEFAULT policy or SPREAD over the nodes, plus the custom resources and
  node labels a role asks for (`placement.<role>`). New nodes are used as they join; nothing is pinned.
- Learner ranks: a placement group of one bundle per rank (PACK by default) when GPUs are used, or when the layout
  is colocated (generator i then runs in rank i's bundle). On CPU-only split runs, fractional num_cpus is enough
  (Ray does not pin threads) and no group is reserved, because reserved bundles would starve later actors of CPU.
- Resources no node has: `check_feasible` fails at once on an embedded local Ray (it cannot grow), and after
  `placement.wait_s` on a cluster, naming the role and what it asked for; while it waits it asks the autoscaler
  for the resources (request_resources). Labels are matched by equality (no `in(...)` / `!` selectors).
"""

from __future__ import annotations

import logging
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from troupe.cluster.config.checks import ConfigError
from troupe.cluster.config.schema import RolePlacement

log = logging.getLogger("troupe.placement")


class PlacementError(ConfigError):
    """Resources a role needs that no node of the cluster has."""


class RankPlacement:
    """`extra` (colocated roles) is added to every bundle: {resource: amount} of what shares the rank's bundle."""

    def __init__(
        self,
        world_size: int,
        num_cpus: float,
        num_gpus: float,
        timeout_s: float,
        placement: RolePlacement | None = None,
        reserve: bool = False,
        wait_s: float | None = None,
        may_grow: bool = False,
    ) -> None:
        self.group = None
        p = placement or RolePlacement(strategy="PACK")
        resources, labels = p.needs()
        if num_gpus > 0 or reserve or resources:
            bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {}), **resources}
            bundle = {k: v for k, v in bundle.items() if v}
            check_feasible("learner", bundle, labels, wait_s or timeout_s, may_grow)
            kwargs = {"bundle_label_selector": [labels] * world_size} if labels else {}
            self.group = placement_group([bundle] * world_size, strategy=p.strategy, **kwargs)
            try:
                ray.get(self.group.ready(), timeout=timeout_s)
            except ray.exceptions.GetTimeoutError as e:
                remove_placement_group(self.group)
                raise PlacementError(
                    f"learner: {world_size} bundles of {bundle} ({p.strategy}) were not placed within "
                    f"{timeout_s:.0f}s: the nodes are busy or too few for placement.learner.strategy={p.strategy}"
                ) from e

    def options_for(self, rank: int) -> dict:
        if self.group is None:
            return {}
        return {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=rank
            )
        }

    def release(self) -> None:
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None


def pool_options(
    role: str, p: RolePlacement, demand: dict[str, float], wait_s: float, may_grow: bool
) -> dict:
    """Ray actor options for one member of a pool; fails naming the role when no node could ever host it."""
    if p.strategy not in ("DEFAULT", "SPREAD"):
        raise ConfigError(
            f"placement.{role}.strategy must be DEFAULT or SPREAD for a pool, got {p.strategy!r}"
        )
    resources, labels = p.needs()
    need = {**{k: v for k, v in demand.items() if v}, **resources}
    check_feasible(role, need, labels, wait_s, may_grow)
    options: dict = {}
    if p.strategy == "SPREAD":
        options["scheduling_strategy"] = "SPREAD"
    if resources:
        options["resources"] = resources
    if labels:
        options["label_selector"] = labels
    return options


def check_feasible(
    role: str, need: dict[str, float], labels: dict[str, str], wait_s: float, may_grow: bool
) -> None:
    """Some alive node has (in total, busy or not) every resource in `need` and every label: else wait up to
    `wait_s` for one to join when the cluster `may_grow`, then raise PlacementError naming what is missing."""
    deadline = time.monotonic() + (wait_s if may_grow else 0.0)
    while True:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if any(_fits(n, need, labels) for n in nodes):
            return
        if time.monotonic() >= deadline:
            have = [
                {**{k: v for k, v in n["Resources"].items() if not k.startswith("node:")}, **_user_labels(n)}
                for n in nodes
            ]
            raise PlacementError(
                f"{role}: no node has {need}"
                + (f" with labels {labels}" if labels else "")
                + f" (placement.{role}, {role}.num_cpus/num_gpus); nodes: {have}"
                + (f"; waited {wait_s:.0f}s for one to join" if may_grow else "")
            )
        _ask_autoscaler(
            need
        )  # nothing is pending yet: say what is needed, or min_workers=0 types never start
        log.warning("%s: waiting for a node with %s %s", role, need, labels or "")
        time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))


def _ask_autoscaler(need: dict[str, float]) -> None:
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[need])
    except Exception as e:  # no autoscaler (a fixed cluster): just wait
        log.debug("request_resources: %s", e)


def _fits(node: dict, need: dict[str, float], labels: dict[str, str]) -> bool:
    have = node.get("Resources", {})
    node_labels = node.get("Labels", {}) or {}
    return all(have.get(k, 0.0) + 1e-9 >= v for k, v in need.items()) and all(
        node_labels.get(k) == v for k, v in labels.items()
    )


def _user_labels(node: dict) -> dict:
    return {f"label:{k}": v for k, v in (node.get("Labels") or {}).items() if not k.startswith("ray.io/")}
