"""Turns scored rollouts into padded training tensors, and computes per-token logprobs of a causal LM.

No DeepSpeed or Ray here; shapes follow the convention position t predicts token t+1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TrainSample:
    """One sequence for a policy-gradient update (sent from the driver to a learner rank)."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    advantage: float
    behaviour_logprobs: torch.Tensor  # the generator's logprobs, kept to measure the train/inference mismatch


@dataclass(frozen=True)
class TrainTensors:
    input_ids: torch.Tensor  # [B, L] right-padded
    attention_mask: torch.Tensor  # [B, L]
    action_mask: torch.Tensor  # [B, L-1]: 1 where position t predicts a response token
    advantages: torch.Tensor  # [B]
    behaviour_logprobs: torch.Tensor  # [B, L-1], zero outside the action mask

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: slice) -> TrainTensors:
        return TrainTensors(
            *(
                t[rows]
                for t in (
                    self.input_ids,
                    self.attention_mask,
                    self.action_mask,
                    self.advantages,
                    self.behaviour_logprobs,
                )
            )
        )


def collate(samples: Sequence[TrainSample], pad_id: int) -> TrainTensors:
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    n = len(samples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    action = torch.zeros((n, width - 1), dtype=torch.float32)
    behaviour = torch.zeros((n, width - 1), dtype=torch.float32)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        input_ids[i, : p + r] = torch.tensor(s.prompt_ids + s.response_ids)
        attention[i, : p + r] = 1
        action[i, p - 1 : p + r - 1] = 1.0
        behaviour[i, p - 1 : p + r - 1] = s.behaviour_logprobs
    adv = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
    return TrainTensors(input_ids, attention, action, adv, behaviour)


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
