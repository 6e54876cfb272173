"""Evaluation during training: the current policy answers held-out prompts (greedy and/or sampled), the reward
fleet scores the answers, and the metrics go out under `eval/<mode>/`.

Scoring uses a copy of the aggregation, so an ALaRM normaliser's warm-up only ever sees training samples (before
the first iteration the copy fits its statistics on the eval answers themselves; after the warm-up it is frozen
and eval rewards are on the training scale).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch

from troupe.actors.generator.sampling import Sampling
from troupe.actors.protocol import Prompt, ScoredRollout
from troupe.cluster.config.schema import EvalConfig
from troupe.cluster.run.scoring import score_batch

EVAL_SEED_OFFSET = 1_000_003  # evaluation's sampling seeds, apart from the training batches' (seed + batch)


def eval_modes(cfg: EvalConfig, sampling: Sampling) -> dict[str, Sampling]:
    modes = {}
    if cfg.greedy:
        modes["greedy"] = Sampling(n=1, temperature=0.0, top_p=1.0, max_new_tokens=sampling.max_new_tokens)
    if cfg.samples:
        modes["sampled"] = Sampling(
            n=cfg.samples,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_new_tokens=sampling.max_new_tokens,
        )
    return modes


def evaluate(run, prompts: list[Prompt], cfg: EvalConfig) -> dict:
    """eval/<mode>/{accuracy, reward/mean, objective/<name>, response_tokens/mean, ...} for the current weights."""

    out: dict = {}
    for mode, sampling in eval_modes(cfg, run.sampling).items():
        if run.seed is not None:  # deterministic runs: evaluation draws from its own seeded streams
            sampling = replace(sampling, seed=run.seed + EVAL_SEED_OFFSET + run.version)
        chunks = run.generators.map_chunks("generate", prompts, sampling, deadline_s=run.faults.generate_s)
        rollouts = [r for chunk in chunks for r in chunk]
        values = run.rewards.score(rollouts, deadline_s=run.faults.score_s)
        result = score_batch(rollouts, values, copy.deepcopy(run.aggregation), run.on_error, sampling.n)
        stats = batch_stats(result.kept) if result.kept else {}
        stats.update(result.metrics())
        stats.update(env_stats(rollouts))
        if f"objective/{cfg.accuracy_objective}" in stats:
            stats["accuracy"] = stats[f"objective/{cfg.accuracy_objective}"]
        out.update({f"eval/{mode}/{k}": v for k, v in stats.items()})
    return out


def batch_stats(scored: list[ScoredRollout]) -> dict:
    """Reward, objectives, branch rates, length and the reward-length correlation of one scored batch."""
    n = len(scored)
    rewards = torch.tensor([s.reward.scalar for s in scored], dtype=torch.float64)
    # the tokens the policy wrote (a multi-turn trajectory's observations are not its reply's length)
    lengths = torch.tensor([s.rollout.trained_tokens for s in scored], dtype=torch.float64)
    out = {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if n > 1 else 0.0,
        "response_tokens/mean": float(lengths.mean()),
        "truncated/frac": sum(s.rollout.finish_reason == "length" for s in scored) / n,
        "reward/length_corr": pearson(rewards, lengths),
    }
    for name in scored[0].reward.objectives:
        out[f"objective/{name}"] = sum(s.reward.objectives[name] for s in scored) / n
    branches = sorted({s.reward.branch for s in scored})
    if len(branches) > 1 or branches != ["weighted_sum"]:
        for b in branches:
            out[f"branch/{b}"] = sum(s.reward.branch == b for s in scored) / n
    return out


def env_stats(rollouts, version: int | None = None) -> dict:
    """Multi-turn trajectories over every rollout (failed ones too): turns, tool calls and errors per trajectory,
    the share that called a tool, and why they ended (env/ended/<reason>); with the learner's `version`, the
    staleness of each generated token's span (env/token_lag: versions behind, on average) and the share of
    trajectories sampled with more than one version (partial rollouts). Empty for single-turn rollouts."""
    counts = [dict(r.env_counts) for r in rollouts if r.env_counts]
    if not counts:
        return {}
    n = len(counts)
    out = {
        "env/turns": sum(c.get("turns", 0) for c in counts) / n,
        "env/tool_calls": sum(c.get("tool_calls", 0) for c in counts) / n,
        "env/tool_call_rate": sum(c.get("tool_calls", 0) > 0 for c in counts) / n,
        "env/tool_errors": sum(c.get("tool_errors", 0) for c in counts) / n,
    }
    ends = sorted({k for c in counts for k in c if k.startswith("ended/")})
    out.update({f"env/{k}": sum(c.get(k, 0) for c in counts) / n for k in ends})
    spans = [[v for v, m in zip(r.versions, r.loss_mask, strict=True) if m] for r in rollouts if r.versions]
    tokens = [v for s in spans for v in s]
    if version is not None and tokens:
        out["env/token_lag"] = sum(version - v for v in tokens) / len(tokens)
        out["env/partial_frac"] = sum(len(set(s)) > 1 for s in spans) / len(spans)
    return out


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation; NaN when either side is constant (no evidence either way)."""
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((xc * xc).sum()) * float((yc * yc).sum()))
    return float((xc * yc).sum()) / denom if denom > 0 else float("nan")
