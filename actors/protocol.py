"""Typed records that travel between roles through the Ray object store.

Plain frozen dataclasses of tensors and primitives; no Ray, vLLM or DeepSpeed imports here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Prompt:
    """One prompt: chat-templated token ids plus what the reward side needs to check it."""

    uid: str
    token_ids: tuple[int, ...]
    text: str
    reference: str = ""  # the checkable answer (task correctness); empty when the task has none
    # Small, hashable facts for the reward objectives, e.g. ("level", "2"); a value that is not a string in the
    # dataset (a list, a dict, a number) is stored JSON-encoded: decode with `meta_value`.
    meta: tuple[tuple[str, str], ...] = ()
    # The chat before the generation prompt as (role, content) turns, system turn included; reward models read
    # it. Empty: a single user turn holding `text`.
    messages: tuple[tuple[str, str], ...] = ()

    def chat(self) -> list[dict[str, str]]:
        """The prompt as chat messages (what a reward model's chat template formats)."""
        if self.messages:
            return [{"role": role, "content": content} for role, content in self.messages]
        return [{"role": "user", "content": self.text}]

    def meta_value(self, key: str, default=None):
        """A metadata field, JSON-decoded when it was stored encoded; `default` when absent."""
        import json

        for k, v in self.meta:
            if k == key:
                try:
                    return json.loads(v)
                except ValueError:
                    return v
        return default


@dataclass(frozen=True)
class PromptBatch:
    prompts: tuple[Prompt, ...]
    iteration: int

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class Rollout:
    """One sampled completion of one prompt, tagged with the policy weight version that produced it."""

    prompt: Prompt
    sample_index: int
    response_ids: tuple[int, ...]
    response_text: str
    logprobs: torch.Tensor  # float32 [len(response_ids)]: behaviour-policy logprob of each sampled token
    weight_version: int
    finish_reason: str  # "stop" (EOS / stop string) or "length" (hit max_new_tokens)
    temperature: float  # the sampling temperature: logprobs above are of the distribution at this temperature
    # A multi-turn trajectory (actors/envs): response_ids hold its turns and the observations between them, as
    # sampled and templated; loss_mask is 1 on the tokens the policy wrote (None: every token), versions their
    # weight version (None: weight_version). logprobs are 0 on observation tokens.
    loss_mask: tuple[int, ...] | None = None
    versions: tuple[int, ...] | None = None
    turn_ends: tuple[int, ...] = ()  # index in response_ids of each turn's last token
    turn_rewards: tuple[float, ...] = ()  # the environment's reward for each turn
    conversation: tuple[tuple[str, str], ...] = ()  # (role, content) of the messages after the prompt
    env_counts: tuple[tuple[str, int], ...] = ()  # e.g. turns, tool_calls, tool_errors, ended/<reason>
    failed: str = ""  # env_error / env_timeout: the environment failed it and env.on_error=drop

    def __post_init__(self) -> None:
        n = len(self.response_ids)
        where = f"rollout {self.prompt.uid}#{self.sample_index}"
        if self.logprobs.shape != (n,):
            raise ValueError(f"{where}: logprobs shape {tuple(self.logprobs.shape)} != ({n},)")
        for name in ("loss_mask", "versions"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{where}: {name} of {len(value)} for {n} response tokens")
        if len(self.turn_rewards) != len(self.turn_ends) or any(not 0 <= e < n for e in self.turn_ends):
            raise ValueError(
                f"{where}: turn_ends {self.turn_ends} / turn_rewards {self.turn_rewards} do not fit"
            )

    @property
    def trained_tokens(self) -> int:
        """Tokens the policy wrote (what the loss covers)."""
        return len(self.response_ids) if self.loss_mask is None else sum(self.loss_mask)


@dataclass(frozen=True)
class RewardBreakdown:
    """The reward of one rollout and why: scalar, per-objective values, aggregation weights, branch taken."""

    scalar: float
    objectives: dict[str, float]
    weights: dict[str, float] = field(default_factory=dict)
    branch: str = ""
    # The complete reward placed on response tokens (e.g. ALaRM aspects on tokens), sum == scalar; token-level
    # estimators (returns, GAE) use it instead of the scalar on the last token. None: a sequence-level reward.
    token_rewards: tuple[float, ...] | None = None
    # Why the rollout is left out of training ("" = kept): e.g. "reward_error", an objective failed on it or on
    # another sample of its prompt and reward.on_error=drop. A dropped rollout carries no loss and no reward.
    dropped: str = ""


@dataclass(frozen=True)
class ScoredRollout:
    rollout: Rollout
    reward: RewardBreakdown


@dataclass(frozen=True)
class WeightBundle:
    """A full or partial state dict with HF parameter names, versioned for the generators."""

    version: int
    tensors: dict[str, torch.Tensor]
