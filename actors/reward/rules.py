"""Rule objectives: task correctness, answer format, brevity, non-repetition. Each maps rollouts to values in
[0, 1]. An objective with `score_tokens` also gives per-token values (the flat per-token channel of
actors/reward/aggregation.py) whose sum per rollout is its sequence value.

Pure functions of the rollout text and its prompt's reference; no model, no Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from actors.protocol import Rollout
from actors.tasks.arithmetic import extract_answer, has_answer_line


@dataclass(frozen=True)
class Correctness:
    """1 when the extracted integer answer equals the prompt's reference, else 0."""

    name: str = "correctness"

    def score(self, rollouts: Sequence[Rollout]) -> torch.Tensor:
        values = []
        for r in rollouts:
            if not r.prompt.reference:
                raise ValueError(
                    f"objective 'correctness': prompt {r.prompt.uid} has no reference answer to check"
                )
            got = extract_answer(r.response_text)
            values.append(1.0 if got is not None and str(got) == r.prompt.reference.strip() else 0.0)
        return torch.tensor(values, dtype=torch.float32)


@dataclass(frozen=True)
class AnswerFormat:
    """1 when the reply states its result on an 'Answer: <number>' line and was not cut off, else 0."""

    name: str = "format"

    def score(self, rollouts: Sequence[Rollout]) -> torch.Tensor:
        return torch.tensor(
            [
                1.0 if r.finish_reason == "stop" and has_answer_line(r.response_text) else 0.0
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


RULES = {"correctness": Correctness, "format": AnswerFormat, "length": Brevity, "repetition": NonRepetition}
