"""ALaRM (Lai et al. 2024): a holistic reward first; aspect rewards count only where the holistic reward clears a
threshold. Plus the aspect-selection step the public code lacks: keep aspects whose pairwise ordering agrees with
the holistic reward at least a set rate.

Rule, for holistic z-score h (normalised with statistics fitted on the policy's own samples), threshold tau,
holistic weight w_h and aspect values a_k with weights w_k:
  h <  tau: R = w_h * h                      (branch "holistic")
  h >= tau: R = w_h * h + sum_k w_k * a_k    (branch "holistic+aspects")
Token-level placement puts w_h * h on the last token and each aspect's per-token values (or its sequence value on
the last token) on the tokens, only in the second branch; PPO adds them per token.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Normalizer:
    """z = (x - mean) / std with statistics fitted once on the policy's own samples (None until fitted)."""

    mean: float | None = None
    std: float | None = None

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    def fit(self, values: torch.Tensor) -> Normalizer:
        if values.numel() < 2:
            raise ValueError("fitting the holistic normaliser needs at least 2 samples")
        self.mean, self.std = float(values.mean()), float(values.std().clamp(min=1e-6))
        return self

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        if not self.fitted:
            raise RuntimeError("holistic normaliser used before fit()")
        return (values - self.mean) / self.std


def hierarchical_reward(
    holistic_z: torch.Tensor,
    aspects: Mapping[str, torch.Tensor],
    aspect_weights: Mapping[str, float],
    threshold: float,
    holistic_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence-level rule: (reward [N], gate [N] = 1 where aspects were added)."""
    missing = sorted(set(aspect_weights) - set(aspects))
    if missing:
        raise KeyError(f"hierarchy aspects {missing} were not produced; produced: {sorted(aspects)}")
    gate = (holistic_z >= threshold).float()
    bonus = torch.zeros_like(holistic_z)
    for name, w in aspect_weights.items():
        bonus = bonus + w * aspects[name].float()
    return holistic_weight * holistic_z + gate * bonus, gate


def token_level_reward(
    holistic_z: float,
    aspects_per_token: Mapping[str, Sequence[float] | float],
    aspect_weights: Mapping[str, float],
    n_tokens: int,
    threshold: float,
    holistic_weight: float = 1.0,
) -> list[float]:
    """ALaRM's per-token rewards for one response of n_tokens: w_h * h on the last token; above the threshold,
    each aspect's per-token values (a sequence of n_tokens) or its scalar on the last token, weighted."""
    out = [0.0] * n_tokens
    out[-1] = holistic_weight * holistic_z
    if holistic_z < threshold:
        return out
    for name, w in aspect_weights.items():
        values = aspects_per_token[name]
        if isinstance(values, (int, float)):
            out[-1] += w * float(values)
            continue
        if len(values) != n_tokens:
            raise ValueError(
                f"aspect {name!r} has {len(values)} token values for a {n_tokens}-token response"
            )
        for t, v in enumerate(values):
            out[t] += w * float(v)
    return out


def consistency_rates(
    holistic: torch.Tensor,
    aspects: Mapping[str, torch.Tensor],
    n_pairs: int = 1000,
    seed: int = 0,
    groups: Sequence[int] | None = None,
) -> dict[str, float]:
    """For each aspect, the fraction of sampled response pairs it orders as the holistic reward does.

    Pairs where either reward ties are not counted. With `groups` (a prompt id per response), pairs are drawn
    within a prompt, which is what a policy's reward compares.
    """
    rng = random.Random(seed)
    n = len(holistic)
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(groups if groups is not None else [0] * n):
        by_group.setdefault(g, []).append(i)
    pools = [ids for ids in by_group.values() if len(ids) >= 2]
    if not pools:
        raise ValueError("consistency needs at least one group with two responses")
    pairs = []
    for _ in range(n_pairs):
        i, j = rng.sample(rng.choice(pools), 2)
        pairs.append((i, j))
    rates = {}
    for name, values in aspects.items():
        agree = counted = 0
        for i, j in pairs:
            dh, da = float(holistic[i] - holistic[j]), float(values[i] - values[j])
            if dh == 0 or da == 0:
                continue
            counted += 1
            agree += (dh > 0) == (da > 0)
        rates[name] = agree / counted if counted else float("nan")
    return rates


def select_aspects(rates: Mapping[str, float], min_rate: float) -> list[str]:
    """Aspects that agree with the holistic ordering at least `min_rate` of the time, most consistent first."""
    kept = [(r, n) for n, r in rates.items() if r == r and r >= min_rate]
    return [n for _, n in sorted(kept, reverse=True)]


@dataclass
class HierarchyAggregation:
    """The loop's `Aggregation` for ALaRM: holistic objective `holistic`, aspects added above `threshold`.

    The normaliser is fitted on the first batch it sees (the initial policy's samples) unless given.
    Gating weights produced by an ArmoRM shard (objectives named "gate/<name>") are passed through as weights.
    """

    holistic: str
    aspect_weights: dict[str, float]
    threshold: float = 0.0
    holistic_weight: float = 1.0
    normalizer: Normalizer = field(default_factory=Normalizer)

    def combine(self, values, rollouts):
        if self.holistic not in values:
            raise KeyError(f"holistic objective {self.holistic!r} not produced; produced: {sorted(values)}")
        raw = values[self.holistic].float()
        if not self.normalizer.fitted:
            self.normalizer.fit(raw)
        z = self.normalizer(raw)
        scalar, gate = hierarchical_reward(
            z, values, self.aspect_weights, self.threshold, self.holistic_weight
        )
        n = len(rollouts)
        weights = {self.holistic: torch.full((n,), self.holistic_weight)}
        for name, w in self.aspect_weights.items():
            weights[name] = gate * w
        for name, v in values.items():
            if name.startswith("gate/"):
                weights[name] = v.float()
        branches = ["holistic+aspects" if g else "holistic" for g in gate.tolist()]
        return scalar, weights, branches
