"""The "learn" phase of one iteration, from scored rollouts to a policy update, for the two update kinds:

policy gradient (every estimator: the batch's columns go to the learner ranks, which make the advantages) and
online iterative DPO (RLHFlow: pairs from each prompt's K samples, DPO epochs on the resident learners).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from troupe.actors.learner.batch import from_scored
from troupe.actors.learner.dpo import PreferencePair, choose_pair
from troupe.actors.protocol import ScoredRollout
from troupe.cluster.durability.nonfinite import ADVANTAGE_REASON
from troupe.cluster.run.scoring import drop_rows


def learn_policy_gradient(
    run, scored: Sequence[ScoredRollout]
) -> tuple[dict, list[float], list[ScoredRollout]]:
    """Columns from the scored rollouts, [critic values], the policy update, [the critic update on the returns].
    Returns the metrics, each rollout's advantage (its mean over the response tokens), and the scored rollouts
    with the prompt groups the learners left out for an inf/NaN advantage marked dropped."""
    batch = from_scored(scored, run.pad_id, run.sampling.n)
    stats: dict = {}
    if run.critic is not None:
        batch = batch.with_columns(values=batch.place(run.critic.values(batch)))
    train, rows = run.learners.train(batch, kl_coef=run.kl.coef)
    if any(rows["nonfinite"]):  # no loss for them on the learners, none in the critic's update either
        gone = torch.tensor(rows["nonfinite"])
        batch = batch.with_columns(action_mask=batch.action_mask * ~gone[:, None])
        scored = drop_rows(scored, rows["nonfinite"], ADVANTAGE_REASON)
    if run.critic is not None:
        critic_stats = run.critic.train_critic(batch.with_columns(returns=batch.place(rows["returns"])))
        stats.update({f"critic/{k}": v for k, v in critic_stats.items()})
    run.kl.update(train.get("kl_seq", float("nan")), len(batch))
    stats.update({f"train/{k}": v for k, v in train.items()})
    return stats, rows["advantage"], list(scored)


def learn_dpo(run, scored: Sequence[ScoredRollout]) -> tuple[dict, None, list[ScoredRollout]]:
    a, n = run.algo, run.sampling.n
    pairs, ties = build_pairs(scored, n, a.pair_strategy, run.rng, a.length_penalty)
    world = len(run.learners.ranks)
    padded = pad_to_multiple(pairs, world, run.rng)
    stats = {"pairs/built": len(pairs), "pairs/skipped_ties": ties, "pairs/padded": len(padded) - len(pairs)}
    if pairs:
        train = run.learners.train_dpo(padded)
        stats.update({f"train/{k}": v for k, v in train.items()})
    return stats, None, list(scored)  # DPO has no advantages


def build_pairs(
    scored: Sequence[ScoredRollout], n: int, strategy: str, rng: random.Random, length_penalty: float
) -> tuple[list[PreferencePair], int]:
    """One (chosen, rejected) pair per prompt group of `n`; groups without a strict preference are counted."""
    pairs, ties = [], 0
    for lo in range(0, len(scored), n):
        group = scored[lo : lo + n]
        if any(s.reward.dropped for s in group):  # counted by the score phase, not a tie
            continue
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
