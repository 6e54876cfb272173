"""Rule objectives over multi-turn trajectories (actors/envs): the environment's own rewards, the validity of the
tool calls, and the number of turns. Usable as weights, holistic reward or aspects like any objective; a
single-turn rollout scores as a trajectory of one turn with no tool calls.

    reward:
      objectives: {correctness: {}, env: {}, tool_validity: {}}
      aggregation: hierarchy
      hierarchy: {holistic: correctness, aspects: {tool_validity: 0.3, env: 0.2}}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from troupe.actors.protocol import Rollout


@dataclass(frozen=True)
class EnvReward:
    """The sum of the environment's per-turn rewards; per token, each turn's reward on its last token."""

    name: str = "env"

    def score(self, rollouts: Sequence[Rollout]) -> torch.Tensor:
        return torch.tensor([float(sum(r.turn_rewards)) for r in rollouts], dtype=torch.float32)

    def score_tokens(self, rollouts: Sequence[Rollout]) -> torch.Tensor:
        out = []
        for r in rollouts:
            values = [0.0] * len(r.response_ids)
            for end, reward in zip(r.turn_ends, r.turn_rewards, strict=True):
                values[end] += reward
            out.extend(values)
        return torch.tensor(out, dtype=torch.float32)


@dataclass(frozen=True)
class ToolValidity:
    """The share of the trajectory's tool calls that ran (1 with no call at all; `no_call` to change that)."""

    name: str = "tool_validity"
    no_call: float = 1.0

    def score(self, rollouts: Sequence[Rollout]) -> torch.Tensor:
        values = []
        for r in rollouts:
            counts = dict(r.env_counts)
            calls = counts.get("tool_calls", 0) + counts.get(
                "malformed", 0
            )  # a malformed call is no tool_call
            values.append(1.0 - counts.get("tool_errors", 0) / calls if calls else self.no_call)
        return torch.tensor(values, dtype=torch.float32)


@dataclass(frozen=True)
class TurnEconomy:
    """1 for a trajectory of one turn, falling linearly to 0 at `max_turns` turns: fewer round trips."""

    name: str = "turns"
    max_turns: int = 4

    def score(self, rollouts: Sequence[Rollout]) -> torch.Tensor:
        span = max(self.max_turns - 1, 1)
        values = [1.0 - min(max(dict(r.env_counts).get("turns", 1) - 1, 0) / span, 1.0) for r in rollouts]
        return torch.tensor(values, dtype=torch.float32)
