"""Turns scored rollouts (or preference pairs) into padded training tensors, and computes per-token logprobs.

No DeepSpeed or Ray here; shapes follow the convention position t predicts token t+1, so per-token tensors are
[B, L-1] and the response tokens of row i sit under `action_mask[i] == 1`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class TrainSample:
    """One sequence for a policy-gradient update (sent from the driver to a learner rank)."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    advantage: float  # sequence-level advantage (advantage_mode "sequence")
    behaviour_logprobs: torch.Tensor  # the generator's logprobs, kept to measure the train/inference mismatch
    reward: float = 0.0  # sequence reward placed on the last token (token-level modes)
    token_rewards: torch.Tensor | None = None  # [len(response_ids)] dense rewards from the reward side
    values: torch.Tensor | None = None  # [len(response_ids)] critic values V(s_t) (PPO)


@dataclass(frozen=True)
class TrainTensors:
    input_ids: torch.Tensor  # [B, L] right-padded
    attention_mask: torch.Tensor  # [B, L]
    action_mask: torch.Tensor  # [B, L-1]: 1 where position t predicts a response token
    advantages: torch.Tensor  # [B]
    behaviour_logprobs: torch.Tensor  # [B, L-1], zero outside the action mask
    rewards: torch.Tensor  # [B]
    token_rewards: torch.Tensor  # [B, L-1]
    values: torch.Tensor  # [B, L-1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows) -> TrainTensors:
        return TrainTensors(*(getattr(self, f.name)[rows] for f in fields(self)))


def pad_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int):
    """Right-padded input_ids, attention_mask [B, L] and action_mask [B, L-1] for prompt + response rows."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    n = len(prompts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    action = torch.zeros((n, width - 1), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        input_ids[i, : len(p) + len(r)] = torch.tensor(tuple(p) + tuple(r))
        attention[i, : len(p) + len(r)] = 1
        action[i, len(p) - 1 : len(p) + len(r) - 1] = 1.0
    return input_ids, attention, action


def collate(samples: Sequence[TrainSample], pad_id: int) -> TrainTensors:
    input_ids, attention, action = pad_sequences(
        [s.prompt_ids for s in samples], [s.response_ids for s in samples], pad_id
    )
    per_token = {
        name: torch.zeros(action.shape, dtype=torch.float32)
        for name in ("behaviour_logprobs", "token_rewards", "values")
    }
    for i, s in enumerate(samples):
        span = slice(len(s.prompt_ids) - 1, len(s.prompt_ids) + len(s.response_ids) - 1)
        for name, tensor in per_token.items():
            value = getattr(s, name)
            if value is not None:
                tensor[i, span] = value.float()
    return TrainTensors(
        input_ids,
        attention,
        action,
        torch.tensor([s.advantage for s in samples], dtype=torch.float32),
        per_token["behaviour_logprobs"],
        torch.tensor([s.reward for s in samples], dtype=torch.float32),
        per_token["token_rewards"],
        per_token["values"],
    )


def response_slices(batch: TrainTensors, per_token: torch.Tensor) -> list[torch.Tensor]:
    """Row-wise response-token entries of a [B, L-1] tensor, as variable-length 1-D tensors."""
    return [per_token[i][batch.action_mask[i].bool()].clone() for i in range(len(batch))]


def place(action_mask: torch.Tensor, per_sample: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of `response_slices`: scatter variable-length per-response tensors into a [B, L-1] tensor."""
    out = torch.zeros(action_mask.shape, dtype=torch.float32)
    for i, values in enumerate(per_sample):
        out[i][action_mask[i].bool()] = values.float()
    return out


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_entropy: bool = False):
    """log pi(x_{t+1} | x_{<=t}) for t in [0, L-1), in float32; optionally the per-position entropy."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    # gather - logsumexp avoids materialising a second [B, L, V] log_softmax tensor for backward
    logp = logits.gather(-1, input_ids[:, 1:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        probs = logits.softmax(-1)
        entropy = torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)
    return logp, entropy
