"""The "learn" phase of one iteration for each algorithm family, from scored rollouts to a policy update.

Policy gradient (GRPO, Dr. GRPO, RLOO, REINFORCE++, PPO) and online iterative DPO (RLHFlow: pairs from each
prompt's K samples, DPO epochs on the resident learners, no disk round trip).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from actors.learner.advantages import estimate_advantages
from actors.learner.batch import TrainSample
from actors.learner.dpo import PreferencePair, choose_pair
from actors.protocol import ScoredRollout


def learn_policy_gradient(fleet, scored: Sequence[ScoredRollout]) -> tuple[dict, torch.Tensor | None]:
    """Returns metrics and the sequence-level advantages (None where the learner makes them per token)."""
    a, n = fleet.algo, fleet.sampling.n
    rewards = torch.tensor([s.reward.scalar for s in scored])
    if a.name in ("grpo", "rloo"):
        advantages = estimate_advantages(a.name, rewards, n, a.scale_by_std)
        seq_rewards = rewards
    else:  # token-level modes: the learner makes the advantages; REINFORCE++-baseline centres within groups
        seq_rewards = rewards
        if a.name == "reinforce_pp_baseline":
            seq_rewards = (rewards.view(-1, n) - rewards.view(-1, n).mean(1, keepdim=True)).view(-1)
        advantages = torch.zeros_like(rewards)
    samples = [
        TrainSample(
            s.rollout.prompt.token_ids,
            s.rollout.response_ids,
            float(adv),
            s.rollout.logprobs,
            reward=float(r),
            token_rewards=_dense(s),
        )
        for s, adv, r in zip(scored, advantages, seq_rewards, strict=True)
    ]
    stats: dict = {}
    if fleet.critic is not None:
        values = fleet.critic.values(samples)
        samples = [_with_values(s, v) for s, v in zip(samples, values, strict=True)]
    train = fleet.learners.train(samples, kl_coef=fleet.kl.coef)
    returns = train.pop("_returns", None)
    if fleet.critic is not None:
        critic_stats = fleet.critic.train_critic(samples, returns)
        stats.update({f"critic/{k}": v for k, v in critic_stats.items()})
    fleet.kl.update(train.get("kl_seq", float("nan")), len(samples))
    stats.update({f"train/{k}": v for k, v in train.items()})
    return stats, advantages if a.name in ("grpo", "rloo") else None


def learn_dpo(fleet, scored: Sequence[ScoredRollout]) -> tuple[dict, None]:
    a, n = fleet.algo, fleet.sampling.n
    pairs, ties = build_pairs(scored, n, a.pair_strategy, fleet.rng, a.length_penalty)
    world = len(fleet.learners.ranks)
    padded = pad_to_multiple(pairs, world, fleet.rng)
    stats = {"pairs/built": len(pairs), "pairs/skipped_ties": ties, "pairs/padded": len(padded) - len(pairs)}
    if pairs:
        train = fleet.learners.train_dpo(padded)
        stats.update({f"train/{k}": v for k, v in train.items()})
    return stats, None


def build_pairs(
    scored: Sequence[ScoredRollout], n: int, strategy: str, rng: random.Random, length_penalty: float
) -> tuple[list[PreferencePair], int]:
    """One (chosen, rejected) pair per prompt group of `n`; groups without a strict preference are counted."""
    pairs, ties = [], 0
    for lo in range(0, len(scored), n):
        group = scored[lo : lo + n]
        chosen = choose_pair(
            [s.reward.scalar for s in group],
            [len(s.rollout.response_text) for s in group],
            strategy,
            rng,
            length_penalty,
        )
        if (
            chosen is None
            or not group[chosen[0]].rollout.response_ids
            or not group[chosen[1]].rollout.response_ids
        ):
            ties += 1
            continue
        w, lose = group[chosen[0]].rollout, group[chosen[1]].rollout
        pairs.append(PreferencePair(w.prompt.token_ids, w.response_ids, lose.response_ids))
    return pairs, ties


def pad_to_multiple(items: list, multiple: int, rng: random.Random) -> list:
    """Repeat random items so every learner rank gets the same count (their collectives run in lock-step)."""
    short = -len(items) % multiple
    return items + [rng.choice(items) for _ in range(short)] if items else items


def _dense(scored: ScoredRollout) -> torch.Tensor | None:
    dense = scored.reward.token_rewards
    return None if dense is None else torch.as_tensor(dense, dtype=torch.float32)


def _with_values(sample: TrainSample, values: torch.Tensor) -> TrainSample:
    from dataclasses import replace

    return replace(sample, values=values)
