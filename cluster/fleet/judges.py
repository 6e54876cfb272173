"""LLM-judge pools (reward.judges.<name>): replicas of `JudgeShard`, each a vLLM engine serving every
`type: judge` objective whose `pool` names it. Replicable and elastic like the other reward pools
(`troupe fleet <run dir> reward.judge-<name>=N`)."""

from __future__ import annotations

from troupe.actors.reward.judge import JUDGE_KEYS, JudgeConfig, JudgeShard, JudgeSpec
from troupe.cluster.config.schema import TroupeConfig
from troupe.cluster.fleet.pool import Pool
from troupe.cluster.fleet.reward_pools import shard_pool


def judge_objectives(cfg: TroupeConfig, pool: str) -> dict[str, dict]:
    """{objective: its entry} for the judge objectives served by `pool`."""
    return {
        name: {k: v for k, v in dict(params).items() if k in JUDGE_KEYS}
        for name, params in cfg.reward.objectives.items()
        if (params or {}).get("type") == "judge" and params.get("pool", "judge") == pool
    }


def judge_env(judge: JudgeConfig) -> dict[str, str]:
    return {
        "OMP_NUM_THREADS": str(judge.omp_threads),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine, as the generators
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def build_judge_pool(cfg: TroupeConfig, name: str, judge: JudgeConfig, options, budget) -> Pool:
    objectives = judge_objectives(cfg, name)
    if not objectives:
        raise ValueError(
            f"reward.judges.{name}: no objective uses it (reward.objectives.<x>: {{type: judge, pool: {name}}})"
        )
    spec = JudgeSpec(judge, objectives)
    return shard_pool(
        f"reward-judge-{name}",
        JudgeShard,
        spec,
        judge.num_cpus,
        judge.num_gpus,
        judge_env(judge),
        options,
        cfg.ray.actor_timeout_s,
        budget,
    )
