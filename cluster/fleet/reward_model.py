"""Builds the configured reward model: shard pools (rules; one per backbone expert) and the aggregation.

The hierarchy's holistic normaliser takes, first to last: configured reward.hierarchy.mean/std; statistics that
the expert bundle serving the holistic objective carries (bundle.json "normalizers"); a warm-up of
reward.hierarchy.warmup_samples samples. A resumed run restores it with `aggregation.load_state_dict(...)`.
"""

from __future__ import annotations

import ray

from troupe.actors.reward.aggregation import WeightedSum
from troupe.actors.reward.alarm import HierarchyAggregation, Normalizer
from troupe.actors.reward.bundle import read_info
from troupe.actors.reward.objective import resolve_target
from troupe.actors.reward.selection import AspectSelection
from troupe.actors.reward.shard import RewardShard, ShardSpec
from troupe.cluster.config.schema import RewardConfig, TroupeConfig
from troupe.cluster.durability.faults import RetryBudget
from troupe.cluster.fleet.judges import build_judge_pool
from troupe.cluster.fleet.placement import pool_options
from troupe.cluster.fleet.pool import Pool
from troupe.cluster.fleet.reward_pools import RewardFleet, shard_pool


def build_reward_fleet(cfg: TroupeConfig, budget: RetryBudget | None = None) -> RewardFleet:
    r, timeout = cfg.reward, cfg.ray.actor_timeout_s
    place = cfg.placement

    def options(role: str, num_cpus: float, num_gpus: float = 0.0) -> dict:
        demand = {"CPU": num_cpus, "GPU": num_gpus}
        return pool_options(role, place.reward, demand, place.wait_s, may_grow=cfg.ray.address is not None)

    pools = {}
    token_values = r.aggregation == "hierarchy" and r.hierarchy.token_level
    rules = rule_objectives(r)
    if rules:
        spec = ShardSpec(
            objectives=rules,
            batch_size=r.batch_size,
            token_values=token_values,
            timeout_s=r.timeout_s,
        )
        remote = ray.remote(RewardShard).options(
            num_cpus=r.num_cpus, max_restarts=0, **options("reward", r.num_cpus)
        )
        pools["rules"] = Pool("reward", lambda i, _slot, s=spec, rm=remote: rm.remote(s, i), timeout, budget)
    for name, judge in r.judges.items():
        pools[f"judge-{name}"] = build_judge_pool(cfg, name, judge, options, budget)
    for name, expert in r.experts.items():
        spec = ShardSpec(
            bundles=(expert.bundle,),
            batch_size=r.batch_size,
            dtype=expert.dtype,
        )
        env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        pools[name] = shard_pool(
            f"reward-{name}",
            RewardShard,
            spec,
            expert.num_cpus,
            expert.num_gpus,
            env,
            options,
            timeout,
            budget,
        )
    if not pools:
        raise ValueError(
            "the reward model has no objectives and no experts (reward.objectives / reward.experts)"
        )
    return RewardFleet(pools)


def reward_replicas(cfg: TroupeConfig) -> dict[str, int]:
    out = {"rules": cfg.reward.shards} if rule_objectives(cfg.reward) else {}
    out.update({name: e.replicas for name, e in cfg.reward.experts.items()})
    out.update({f"judge-{name}": j.replicas for name, j in cfg.reward.judges.items()})
    return out


def rule_objectives(r: RewardConfig) -> dict[str, dict]:
    """The objectives the rule shards host: built-in rules, plug-ins and http objectives (judges have pools)."""
    entries = {k: dict(v or {}) for k, v in r.objectives.items()}
    return {k: v for k, v in entries.items() if v.get("type") != "judge"}


def plugin_files(cfg: TroupeConfig) -> list[str]:
    """Plug-in files named by path (`/dir/file.py:fn`): reward objectives' and the environment's. They travel to
    every node with Ray's job-level runtime environment (py_modules, importable by the file's name: `start_ray`),
    so code outside the repo works on a multi-node cluster; an actor on the driver's machine also finds the file
    at its path."""
    targets = {
        f"reward.objectives.{name}.target": p.get("target") for name, p in rule_objectives(cfg.reward).items()
    }
    if cfg.env.target is not None:
        targets["env.target"] = cfg.env.target
    files = {resolve_target(target, key)[1] for key, target in targets.items()}
    return sorted(f for f in files if f is not None)


def build_aggregation(r: RewardConfig):
    if r.aggregation == "weighted_sum":
        return WeightedSum(dict(r.weights))
    h = r.hierarchy
    normalizer = Normalizer(h.mean, h.std, h.warmup_samples, h.holistic)
    selection = None
    if h.select == "consistency":
        selection = AspectSelection(dict(h.aspects), h.min_agreement, h.warmup_samples)
    agg = HierarchyAggregation(
        h.holistic, dict(h.aspects), h.threshold, h.holistic_weight, normalizer, h.token_level, selection
    )
    carried = _bundle_normalizer(r, h.holistic)
    if carried is not None and not normalizer.fixed:
        agg.load_state_dict({"holistic": h.holistic, "normalizer": carried})
    return agg


def _bundle_normalizer(r: RewardConfig, holistic: str) -> dict | None:
    """Normaliser statistics for `holistic` carried by an expert bundle's bundle.json, if any."""
    for expert in r.experts.values():
        stats = read_info(expert.bundle).normalizers.get(holistic)
        if stats is not None:
            return stats
    return None
