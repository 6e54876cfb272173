"""Aggregations turn per-objective values into one scalar reward, with weights and the branch taken, and
optionally place the reward on response tokens.

Values come as {objective: tensor [N]} (one value per rollout). An objective may also give per-token values
under `token_key(objective)` ("tokens/<objective>"): one flat float tensor of the values of every response token,
rollouts concatenated in order (length = sum of len(response_ids)); `split_tokens` cuts it back per rollout.

Token-reward contract (`RewardBreakdown.token_rewards`): when not None it holds the COMPLETE reward of the rollout
placed on its response tokens, len == len(rollout.response_ids) and sum == `scalar`; the learner then uses it
instead of putting the scalar on the last token. None: a sequence-level reward (also for an empty response).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from troupe.actors.protocol import RewardBreakdown, Rollout, ScoredRollout

TOKEN_PREFIX = "tokens/"


def token_key(objective: str) -> str:
    """The values key of an objective's per-token channel."""
    return TOKEN_PREFIX + objective


def split_tokens(flat: torch.Tensor, rollouts: Sequence[Rollout]) -> list[torch.Tensor]:
    """A per-token channel [sum of response lengths] -> one tensor per rollout."""
    lengths = [len(r.response_ids) for r in rollouts]
    if flat.shape != (sum(lengths),):
        raise ValueError(
            f"a per-token channel has shape {tuple(flat.shape)} for {sum(lengths)} response tokens"
        )
    return list(flat.split(lengths))


@dataclass
class Aggregated:
    """What an aggregation makes of one batch: scalar [N], per-objective weights {name: [N]}, the branch per
    rollout, and (token-level aggregations) each rollout's reward on its response tokens, summing to its scalar."""

    scalar: torch.Tensor
    weights: dict[str, torch.Tensor]
    branches: list[str]
    token_rewards: list[torch.Tensor] | None = None


class Aggregation(Protocol):
    def combine(self, values: Mapping[str, torch.Tensor], rollouts: Sequence[Rollout]) -> Aggregated:
        """Per-objective values (and per-token channels) of a batch -> its rewards."""
        ...

    def state_dict(self) -> dict:
        """What the aggregation learned from data (JSON-able), saved with the run; {} when nothing."""
        ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class WeightedSum:
    """scalar = sum_k w_k * v_k with fixed weights; objectives without a weight are reported, not summed."""

    weights: Mapping[str, float]

    def state_dict(self) -> dict:
        return {}  # fixed weights: nothing fitted

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"a weighted sum has no fitted state; got {sorted(state)}")

    def combine(self, values, rollouts) -> Aggregated:
        missing = sorted(set(self.weights) - set(values))
        if missing:
            raise KeyError(
                f"aggregation weights name objectives no shard produced: {missing}; produced: {sorted(values)}"
            )
        n = len(rollouts)
        scalar = torch.zeros(n, dtype=torch.float32)
        weights = {}
        for name, w in self.weights.items():
            scalar += w * values[name]
            weights[name] = torch.full((n,), float(w))
        return Aggregated(scalar, weights, ["weighted_sum"] * n)


def score_rollouts(
    rollouts: Sequence[Rollout], values: Mapping[str, torch.Tensor], aggregation: Aggregation
) -> list[ScoredRollout]:
    """Attach the aggregated scalar, the per-objective breakdown and any token placement to each rollout."""
    n_tokens = sum(len(r.response_ids) for r in rollouts)
    for name, v in values.items():
        want = (n_tokens,) if name.startswith(TOKEN_PREFIX) else (len(rollouts),)
        if v.shape != want:
            raise ValueError(f"objective {name!r} returned shape {tuple(v.shape)}, expected {want}")
    out = aggregation.combine(values, rollouts)
    objectives = {k: v for k, v in values.items() if not k.startswith(TOKEN_PREFIX)}
    scored = []
    for i, r in enumerate(rollouts):
        scalar, tokens = float(out.scalar[i]), None
        if out.token_rewards is not None and len(r.response_ids):
            tokens = tuple(float(t) for t in out.token_rewards[i])
            if len(tokens) != len(r.response_ids):
                raise ValueError(
                    f"rollout {r.prompt.uid}#{r.sample_index}: {len(tokens)} token rewards for "
                    f"{len(r.response_ids)} response tokens"
                )
            if abs(sum(tokens) - scalar) > 1e-4 * max(1.0, abs(scalar)):
                raise ValueError(
                    f"rollout {r.prompt.uid}#{r.sample_index}: token rewards sum to {sum(tokens)}, scalar {scalar}"
                )
            scalar = sum(tokens)  # exactly the sum the learner will see
        breakdown = RewardBreakdown(
            scalar=scalar,
            objectives={k: float(v[i]) for k, v in objectives.items()},
            weights={k: float(w[i]) for k, w in out.weights.items()},
            branch=out.branches[i],
            token_rewards=tokens,
        )
        scored.append(ScoredRollout(r, breakdown))
    return scored
