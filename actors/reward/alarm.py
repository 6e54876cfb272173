"""ALaRM (Lai et al. 2024): a holistic reward first; aspect rewards count only where the holistic reward clears a
threshold. Plus the aspect-selection step the public code lacks: keep aspects whose pairwise ordering agrees with
the holistic reward at least a set rate.

Rule, for holistic z-score h (normalised with statistics fitted on a warm-up of the policy's own samples, or
configured, or restored from a run or a reward bundle: see Normalizer), threshold tau,
holistic weight w_h and aspect values a_k with weights w_k:
  h <  tau: R = w_h * h                      (branch "holistic")
  h >= tau: R = w_h * h + sum_k w_k * a_k    (branch "holistic+aspects")
Token-level placement puts w_h * h on the last token and each aspect's per-token values (or its sequence value on
the last token) on the tokens, only in the second branch (HierarchyAggregation(token_level=True); the learner's
token-level estimators use the placement, see actors/reward/aggregation.py for the contract).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from troupe.actors.reward.aggregation import Aggregated, split_tokens, token_key

MIN_STD = 1e-6  # relative to max(1, |mean|): a holistic std below this is refused


@dataclass
class Normalizer:
    """z = (x - mean) / std for the holistic objective.

    The statistics come from, first to last: configured `mean` and `std` (`fixed`: never refitted, and a loaded
    state does not replace them); a loaded state (`load_state_dict`: a run checkpoint or a reward bundle); or a
    warm-up on the policy's own samples: `observe` adds each batch until `warmup_samples` values have been seen,
    then freezes. Before the warm-up is complete a batch is normalised with the statistics of every sample seen
    so far, itself included (warmup_samples <= one batch: fitted on the first batch, the initial policy's).
    A std below MIN_STD * max(1, |mean|) is refused with a ValueError naming the objective.
    """

    mean: float | None = None
    std: float | None = None
    warmup_samples: int = 0
    objective: str = "holistic"
    count: int = field(default=0, init=False)
    running_mean: float = field(default=0.0, init=False)
    running_m2: float = field(default=0.0, init=False)
    frozen: bool = field(default=False, init=False)
    fixed: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise ValueError("reward.hierarchy.mean and reward.hierarchy.std are set together or not at all")
        if self.mean is not None:
            self.fixed = self.frozen = True
            self._check("reward.hierarchy.std")

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    def observe(self, values: torch.Tensor) -> None:
        """Add a batch to the warm-up statistics (Welford merge, float64); a no-op once frozen."""
        if self.frozen:
            return
        v = values.detach().double().flatten()
        n_b = v.numel()
        if n_b == 0:
            return
        mean_b = float(v.mean())
        m2_b = float(((v - mean_b) ** 2).sum())
        total = self.count + n_b
        delta = mean_b - self.running_mean
        self.running_mean += delta * n_b / total
        self.running_m2 += m2_b + delta * delta * self.count * n_b / total
        self.count = total
        if self.count < 2:
            raise ValueError(
                f"holistic objective {self.objective!r}: normalising needs at least 2 samples, got {self.count}"
            )
        self.mean, self.std = self.running_mean, math.sqrt(self.running_m2 / (self.count - 1))
        self._check("its values barely vary")
        self.frozen = self.count >= self.warmup_samples

    def fit(self, values: torch.Tensor) -> Normalizer:
        """Fit on exactly `values` and freeze."""
        self.count, self.running_mean, self.running_m2, self.frozen = 0, 0.0, 0.0, False
        self.observe(values)
        self.frozen = True
        return self

    def _check(self, hint: str) -> None:
        if not self.std >= MIN_STD * max(1.0, abs(self.mean)):
            raise ValueError(
                f"holistic objective {self.objective!r}: std {self.std:.3g} (mean {self.mean:.4g}, "
                f"{self.count} samples) is too small to z-normalise ({hint}); set reward.hierarchy.mean and "
                "reward.hierarchy.std, or collect more samples with reward.hierarchy.warmup_samples"
            )

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        if not self.fitted:
            raise RuntimeError("holistic normaliser used before any statistics were observed or loaded")
        return (values - self.mean) / self.std

    def state_dict(self) -> dict:
        """Plain JSON-able statistics: objective, mean, std, count, running_mean, running_m2, frozen."""
        return {
            "objective": self.objective,
            "mean": self.mean,
            "std": self.std,
            "count": self.count,
            "running_mean": self.running_mean,
            "running_m2": self.running_m2,
            "frozen": self.frozen,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` output; configured statistics (`fixed`) win and are kept."""
        if self.fixed:
            return
        if state.get("objective", self.objective) != self.objective:
            raise ValueError(
                f"normaliser statistics are for objective {state['objective']!r}, not {self.objective!r}"
            )
        self.mean, self.std = state.get("mean"), state.get("std")
        self.count = int(state.get("count", 0))
        self.running_mean = float(state.get("running_mean", self.mean or 0.0))
        self.running_m2 = float(state.get("running_m2", 0.0))
        self.frozen = bool(state.get("frozen", self.mean is not None))
        if self.mean is not None:
            self._check("loaded statistics")


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
    gate = (holistic_z.double() >= threshold).float()  # float64: the same test as token_level_reward's
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

    The normaliser fits on a warm-up of the policy's first samples unless configured or loaded (see Normalizer).
    Gating weights produced by an ArmoRM shard (objectives named "gate/<name>") are passed through as weights.
    With `token_level`, each rollout's reward is placed on its response tokens (`token_level_reward`): w_h * h on
    the last token and, above the threshold, each aspect's per-token channel (`token_key(aspect)`) on its tokens
    or its sequence value on the last token; the scalar is then the sum of the token rewards.
    """

    holistic: str
    aspect_weights: dict[str, float]
    threshold: float = 0.0
    holistic_weight: float = 1.0
    normalizer: Normalizer = field(default_factory=Normalizer)
    token_level: bool = False
    # reward.hierarchy.select=consistency: an AspectSelection (actors/reward/selection.py) that chooses the aspects
    # on the warm-up samples; None: the configured aspects as they are
    selection: object | None = None

    def __post_init__(self) -> None:
        self.normalizer.objective = self.holistic

    def combine(self, values, rollouts) -> Aggregated:
        if self.holistic not in values:
            raise KeyError(f"holistic objective {self.holistic!r} not produced; produced: {sorted(values)}")
        raw = values[self.holistic].float()
        if self.selection is not None:
            self.selection.observe(raw, values, rollouts)  # a no-op once decided
            self.aspect_weights = self.selection.weights()
        self.normalizer.observe(raw)  # a no-op once the warm-up is complete (or statistics were given)
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
        if not self.token_level:
            return Aggregated(scalar, weights, branches)
        tokens = self._place(z, values, rollouts)
        scalar = torch.stack([t.sum() if len(t) else s for t, s in zip(tokens, scalar, strict=True)])
        return Aggregated(scalar, weights, branches, tokens)

    def _place(self, z, values, rollouts) -> list[torch.Tensor]:
        per_token = {
            name: split_tokens(values[token_key(name)], rollouts)
            for name in self.aspect_weights
            if token_key(name) in values
        }
        out = []
        for i, r in enumerate(rollouts):
            n = len(r.response_ids)
            if n == 0:  # nothing to place on: the sequence reward stands (token_rewards None)
                out.append(torch.zeros(0))
                continue
            aspects = {
                name: per_token[name][i].tolist() if name in per_token else float(values[name][i])
                for name in self.aspect_weights
            }
            placed = token_level_reward(
                float(z[i]), aspects, self.aspect_weights, n, self.threshold, self.holistic_weight
            )
            out.append(torch.tensor(placed, dtype=torch.float32))
        return out

    def metrics(self) -> dict:
        """The aspect selection's agreement rates and choices, once made."""
        return self.selection.metrics() if self.selection is not None else {}

    def state_dict(self) -> dict:
        """JSON-able: {"holistic": objective name, "normalizer": Normalizer.state_dict(), ["selection": ...]}."""
        state = {"holistic": self.holistic, "normalizer": self.normalizer.state_dict()}
        if self.selection is not None:
            state["selection"] = self.selection.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` output (configured reward.hierarchy.mean/std are kept)."""
        if state.get("holistic") != self.holistic:
            raise ValueError(
                f"saved hierarchy statistics are for holistic objective {state.get('holistic')!r}; "
                f"this aggregation's is {self.holistic!r}"
            )
        self.normalizer.load_state_dict(state["normalizer"])
        if self.selection is not None:
            self.selection.load_state_dict(state.get("selection", {}))
            self.aspect_weights = self.selection.weights()
