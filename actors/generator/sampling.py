"""Sampling settings shared by every generator backend (no backend imports here)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    n: int = 4  # completions per prompt (the GRPO group size)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    # Deterministic runs: each prompt samples from its own stream, seeded by (seed, prompt uid), so a rollout does
    # not depend on which generator serves it, on batch order, or on what was sampled before (a resumed run).
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"sampling.n must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Completion:
    """What a backend returns for one sample; the actor wraps it into a `Rollout`."""

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...]
    finish_reason: str


def prompt_seed(seed: int, uid: str) -> int:
    """A 31-bit seed for one prompt's samples, stable across processes (unlike hash())."""
    digest = hashlib.sha256(f"{seed}:{uid}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
