"""One readable RLHF iteration: generate -> score -> learn -> sync, each phase timed.

Read top to bottom to see the whole algorithm. The fleets and groups hide Ray; this file holds the order.
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import ray
import torch

from actors.generator.sampling import Sampling
from actors.learner.config import AlgoConfig
from actors.learner.ppo import AdaptiveKL
from actors.protocol import ScoredRollout
from actors.reward.aggregation import Aggregation, score_rollouts
from cluster.data.prompts import PromptSource
from cluster.fleet import Pool
from cluster.learn import learn_dpo, learn_policy_gradient
from cluster.learner_group import LearnerGroup
from cluster.reward_fleet import RewardFleet
from cluster.sync import push_weights


@dataclass
class RunState:
    """Everything one run's iterations share: the actor pools and groups, and the state carried between them."""

    generators: Pool
    rewards: RewardFleet
    learners: LearnerGroup
    aggregation: Aggregation
    prompts: PromptSource
    sampling: Sampling
    pad_id: int = 0
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    critic: LearnerGroup | None = None  # PPO only
    kl: AdaptiveKL = field(default_factory=lambda: AdaptiveKL(0.0))
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    version: int = 0
    last_bundle: ray.ObjectRef | None = None

    def shutdown(self) -> None:
        self.learners.shutdown()
        if self.critic is not None:
            self.critic.shutdown()
        self.generators.shutdown()
        self.rewards.shutdown()


@contextmanager
def timed(timings: dict, phase: str):
    start = time.perf_counter()
    yield
    timings[f"time/{phase}"] = time.perf_counter() - start


def run_iteration(run: RunState, iteration: int) -> dict:
    timings: dict[str, float] = {}

    # 1. Generate: each generator samples n completions for its contiguous share of the prompts.
    with timed(timings, "generate"):
        batch = run.prompts.batch(iteration)
        chunks = run.generators.map_chunks("generate", batch.prompts, run.sampling, on_replace=_catch_up(run))
        rollouts = [r for chunk in chunks for r in chunk]
    _check_groups(rollouts, len(batch), run.sampling.n)

    # 2. Score: reward shards return per-objective values; the aggregation makes the scalar.
    with timed(timings, "score"):
        values = run.rewards.score(rollouts)
        scored = score_rollouts(rollouts, values, run.aggregation)

    # 3. Learn: policy gradient (advantages, [critic values], clipped update, [critic update]) or DPO on pairs.
    with timed(timings, "learn"):
        learn = learn_dpo if run.algo.update == "dpo" else learn_policy_gradient
        learn_stats = learn(run, scored)

    # 4. Sync: the new weights go to every generator, tagged with the next version (skipped if nothing trained).
    sync_stats: dict = {}
    with timed(timings, "sync"):
        if learn_stats.get("pairs/built", 1):
            run.version += 1
            run.last_bundle = run.learners.export_weights(run.version)
            sync_stats = push_weights(run.generators, run.last_bundle, run.version)

    record = _metrics(iteration, run.version, scored, learn_stats, sync_stats, timings)
    record["algo"] = run.algo.name
    return record


def _catch_up(run: RunState):
    """A replacement generator starts from the initial weights: give it the latest bundle before it works."""

    def load_latest(member) -> None:
        if run.last_bundle is not None:
            ray.get(member.handle.update_weights.remote(run.last_bundle), timeout=run.generators.timeout_s)

    return load_latest


def _check_groups(rollouts, num_prompts: int, n: int) -> None:
    if len(rollouts) != num_prompts * n:
        raise RuntimeError(f"expected {num_prompts} x {n} rollouts, got {len(rollouts)}")
    for i in range(0, len(rollouts), n):
        uids = {r.prompt.uid for r in rollouts[i : i + n]}
        if len(uids) != 1:
            raise RuntimeError(
                f"rollouts {i}..{i + n - 1} mix prompts {sorted(uids)}: groups must be contiguous"
            )


def _metrics(iteration, version, scored: list[ScoredRollout], learn_stats, sync_stats, timings) -> dict:
    n = len(scored)
    lengths = [len(s.rollout.response_ids) for s in scored]
    record = {
        "iteration": iteration,
        "weight_version": version,
        "samples": n,
        "reward/mean": sum(s.reward.scalar for s in scored) / n,
        "reward/std": float(torch.tensor([s.reward.scalar for s in scored]).std()),
        "response_tokens/mean": sum(lengths) / n,
        "truncated/frac": sum(s.rollout.finish_reason == "length" for s in scored) / n,
        "behaviour_version/min": min(s.rollout.weight_version for s in scored),
    }
    for name in scored[0].reward.objectives:
        record[f"objective/{name}"] = sum(s.reward.objectives[name] for s in scored) / n
    record.update(learn_stats)
    record.update({f"sync/{k}": v for k, v in sync_stats.items()})
    record.update(timings)
    record["time/iteration"] = sum(timings.values())
    record["example"] = {
        "prompt": scored[0].rollout.prompt.text,
        "response": scored[0].rollout.response_text[:400],
        "reward": scored[0].reward.scalar,
    }
    return record
