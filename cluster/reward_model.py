"""Builds the configured reward model: shard pools (rules; one per backbone expert) and the aggregation."""

from __future__ import annotations

import ray

from actors.reward.aggregation import WeightedSum
from actors.reward.alarm import HierarchyAggregation, Normalizer
from actors.reward.shard import RewardShard, ShardSpec
from cluster.config import RewardConfig, TroupeConfig
from cluster.fleet import Pool
from cluster.reward_fleet import RewardFleet


def build_reward_fleet(cfg: TroupeConfig) -> RewardFleet:
    r, timeout = cfg.reward, cfg.ray.actor_timeout_s
    pools = {}
    if r.objectives:
        spec = ShardSpec(
            objectives={k: dict(v or {}) for k, v in r.objectives.items()}, batch_size=r.batch_size
        )
        remote = ray.remote(RewardShard).options(num_cpus=r.num_cpus, max_restarts=0)
        pools["rules"] = Pool("reward", lambda i, s=spec, rm=remote: rm.remote(s, i), timeout)
    for name, expert in r.experts.items():
        spec = ShardSpec(bundles=(str(expert["bundle"]),), batch_size=r.batch_size)
        remote = ray.remote(RewardShard).options(
            num_cpus=expert.get("num_cpus", 0.0),
            num_gpus=expert.get("num_gpus", 0.0),
            max_restarts=0,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
        )
        pools[name] = Pool(f"reward-{name}", lambda i, s=spec, rm=remote: rm.remote(s, i), timeout)
    if not pools:
        raise ValueError(
            "the reward model has no objectives and no experts (reward.objectives / reward.experts)"
        )
    return RewardFleet(pools)


def reward_replicas(cfg: TroupeConfig) -> dict[str, int]:
    out = {"rules": cfg.reward.shards} if cfg.reward.objectives else {}
    out.update({name: int(e.get("replicas", 1)) for name, e in cfg.reward.experts.items()})
    return out


def build_aggregation(r: RewardConfig):
    if r.aggregation == "weighted_sum":
        return WeightedSum(dict(r.weights))
    h = r.hierarchy
    normalizer = Normalizer(h.mean, h.std) if h.mean is not None and h.std is not None else Normalizer()
    return HierarchyAggregation(h.holistic, dict(h.aspects), h.threshold, h.holistic_weight, normalizer)
