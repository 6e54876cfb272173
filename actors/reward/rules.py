"""Rule objectives: task correctness, answer format, brevity, non-repetition, truncation, and the
instruction-following checks of actors/reward/ifeval.py (`ifeval`, `instructions`), and the trajectory objectives
of actors/reward/trajectory_rules.py (`env`, `tool_validity`, `turns`). Each maps rollouts to values
in [0, 1]. An objective with `score_tokens` also gives per-token values (the flat per-token channel of
actors/reward/aggregation.py) whose sum per rollout is its sequence value.

Pure functions of the rollout text and its prompt's reference or metadata; no model, no Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from troupe.actors.protocol import Rollout
from troupe.actors.reward.ifeval import IFEval, Instructions
from troupe.actors.reward.math_answer import has_final_answer, is_correct
from troupe.actors.reward.trajectory_rules import EnvReward, ToolValidity, TurnEconomy


@dataclass(frozen=True)
class Correctness:
    """1 when the reply's final answer equals the prompt's reference answer, else 0 (actors/reward/math_answer.py:
    boxed, ####, Answer: or the last number; numbers compared as exact fractions)."""

    name: str = "correctness"

    def score(self, rollouts: Sequence[Rollout]) -> torch.Tensor:
        values = []
        for r in rollouts:
            if not r.prompt.reference:
                raise ValueError(
                    f"objective 'correctness': prompt {r.prompt.uid} has no reference answer to check"
                )
            values.append(1.0 if is_correct(r.response_text, r.prompt.reference) else 0.0)
        return torch.tensor(values, dtype=torch.float32)


@dataclass(frozen=True)
class AnswerFormat:
    """1 when the reply marks a final answer (\\boxed{}, '#### ', 'Answer:') and was not cut off, else 0."""

    name: str = "format"

    def score(self, rollouts: Sequence[Rollout]) -> torch.Tensor:
        return torch.tensor(
            [
                1.0 if r.finish_reason == "stop" and has_final_answer(r.response_text) else 0.0
                for r in rollouts
            ],
            dtype=torch.float32,
        )


@dataclass(frozen=True)
class Brevity:
    """1 up to `target_tokens`, falling linearly to 0 at `max_tokens`; 0 for a reply cut off at the limit."""

    target_tokens: int = 64
    max_tokens: int = 256
    name: str = "length"

    def __post_init__(self) -> None:
        if not 0 < self.target_tokens < self.max_tokens:
            raise ValueError(
                f"objective 'length': need 0 < target_tokens < max_tokens, got {self.target_tokens}, {self.max_tokens}"
            )

    def score(self, rollouts: Sequence[Rollout]) -> torch.Tensor:
        values = []
        for r in rollouts:
            n = len(r.response_ids)
            if r.finish_reason == "length":
                values.append(0.0)
                continue
            over = max(0, n - self.target_tokens) / (self.max_tokens - self.target_tokens)
            values.append(max(0.0, 1.0 - over))
        return torch.tensor(values, dtype=torch.float32)


@dataclass(frozen=True)
class NonRepetition:
    """Share of distinct token n-grams in the reply (1 = no repeated n-gram); catches degenerate loops."""

    n: int = 1
    name: str = "repetition"

    def score(self, rollouts: Sequence[Rollout]) -> torch.Tensor:
        values = []
        for r in rollouts:
            ids = r.response_ids
            grams = [ids[i : i + self.n] for i in range(len(ids) - self.n + 1)]
            values.append(len(set(grams)) / len(grams) if grams else 0.0)
        return torch.tensor(values, dtype=torch.float32)

    def score_tokens(self, rollouts: Sequence[Rollout]) -> torch.Tensor:
        """1/#n-grams on the last token of each n-gram seen for the first time, 0 elsewhere: the credit sits on
        the tokens that add new content and sums to `score`. Flat over all response tokens, rollouts in order."""
        out: list[float] = []
        for r in rollouts:
            ids = r.response_ids
            values = [0.0] * len(ids)
            n_grams = len(ids) - self.n + 1
            seen: set[tuple[int, ...]] = set()
            for i in range(max(0, n_grams)):
                gram = tuple(ids[i : i + self.n])
                if gram not in seen:
                    seen.add(gram)
                    values[i + self.n - 1] = 1.0 / n_grams
            out.extend(values)
        return torch.tensor(out, dtype=torch.float32)


@dataclass(frozen=True)
class Truncation:
    """1 for a reply that ended on its own, 0 for one cut at generator.max_new_tokens: an aspect (or weight)
    against truncated answers."""

    name: str = "truncation"

    def score(self, rollouts: Sequence[Rollout]) -> torch.Tensor:
        return torch.tensor(
            [0.0 if r.finish_reason == "length" else 1.0 for r in rollouts], dtype=torch.float32
        )


RULES = {
    "correctness": Correctness,
    "format": AnswerFormat,
    "length": Brevity,
    "repetition": NonRepetition,
    "truncation": Truncation,
    "ifeval": IFEval,
    "instructions": Instructions,
    "env": EnvReward,
    "tool_validity": ToolValidity,
    "turns": TurnEconomy,
}
