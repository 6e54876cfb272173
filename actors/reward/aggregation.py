"""Aggregations turn per-objective values into one scalar reward, with weights and the branch taken.

The hierarchical RM (ArmoRM gating, ALaRM hierarchy) plugs in here with the same `combine` signature.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from actors.protocol import RewardBreakdown, Rollout, ScoredRollout


class Aggregation(Protocol):
    def combine(
        self, values: Mapping[str, torch.Tensor], rollouts: Sequence[Rollout]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]:
        """Return (scalar [N], per-objective weights {name: [N]}, branch label per rollout)."""
        ...


@dataclass(frozen=True)
class WeightedSum:
    """scalar = sum_k w_k * v_k with fixed weights; objectives without a weight are reported, not summed."""

    weights: Mapping[str, float]

    def combine(self, values, rollouts):
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
        return scalar, weights, ["weighted_sum"] * n


def score_rollouts(
    rollouts: Sequence[Rollout], values: Mapping[str, torch.Tensor], aggregation: Aggregation
) -> list[ScoredRollout]:
    """Attach the aggregated scalar and the full per-objective breakdown to each rollout."""
    for name, v in values.items():
        if v.shape != (len(rollouts),):
            raise ValueError(
                f"objective {name!r} returned shape {tuple(v.shape)} for {len(rollouts)} rollouts"
            )
    scalar, weights, branches = aggregation.combine(values, rollouts)
    scored = []
    for i, r in enumerate(rollouts):
        breakdown = RewardBreakdown(
            scalar=float(scalar[i]),
            objectives={k: float(v[i]) for k, v in values.items()},
            weights={k: float(w[i]) for k, w in weights.items()},
            branch=branches[i],
        )
        scored.append(ScoredRollout(r, breakdown))
    return scored
