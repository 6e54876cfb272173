"""The reward model as a set of shard pools (rules, and one pool per backbone expert), scored concurrently and
merged into one {objective: values} map for the aggregation. Each pool is replicable and self-healing (Pool)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from troupe.actors.protocol import Rollout
from troupe.actors.reward.shard import FAILURES_KEY
from troupe.cluster.fleet.pool import Pool

log = logging.getLogger("troupe.reward")


class RewardFleet:
    def __init__(self, pools: dict[str, Pool]) -> None:
        self.pools = pools
        self.reported: set[str] = set()  # objectives whose first failure was logged

    def spawn(self, replicas: dict[str, int]) -> None:
        for name, pool in self.pools.items():
            pool.spawn(replicas[name])

    def score(self, rollouts: Sequence[Rollout], deadline_s: float | None = None) -> dict[str, torch.Tensor]:
        """Every pool scores every rollout (split across its replicas); objective names must not collide. A shard
        that dies or passes `deadline_s` is replaced and its chunk rescored (Pool.map_chunks)."""
        with ThreadPoolExecutor(max_workers=len(self.pools)) as ex:
            futures = {
                name: ex.submit(pool.map_chunks, "score", list(rollouts), deadline_s=deadline_s)
                for name, pool in self.pools.items()
            }
            results = {name: f.result() for name, f in futures.items()}
        merged: dict[str, torch.Tensor] = {}
        for pool_name, parts in results.items():
            for part in parts:
                self._report(part.pop(FAILURES_KEY, {}))
            for key in parts[0]:
                if key in merged:
                    raise ValueError(
                        f"objective {key!r} is produced by two reward pools (second: {pool_name})"
                    )
                merged[key] = torch.cat([p[key] for p in parts])
        return merged

    def _report(self, failures: dict[str, str]) -> None:
        """The first failure of each objective, traceback and sample id, logged once per run."""
        for objective, message in failures.items():
            if objective not in self.reported:
                self.reported.add(objective)
                log.warning("%s\n(later failures of %r are counted, not logged)", message, objective)

    def shutdown(self) -> None:
        for pool in self.pools.values():
            pool.shutdown()


def shard_pool(
    name: str, actor_class, spec, num_cpus: float, num_gpus: float, env: dict, options, timeout_s, budget
) -> Pool:
    """A pool of `actor_class(spec, replica)` reward actors with their resources, environment and placement."""
    import ray

    remote = ray.remote(actor_class).options(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_restarts=0,
        runtime_env={"env_vars": env},
        **options("reward", num_cpus, num_gpus),
    )
    return Pool(name, lambda i, _slot, s=spec, rm=remote: rm.remote(s, i), timeout_s, budget)
