"""HaF-RM (Liu et al. 2024): a reward head and the LM head on one body, trained with
  L = -log s(r_w - r_l) + alpha * -log s(beta * [(log pi - log pi_ref)(y_w) - (log pi - log pi_ref)(y_l)])
with summed response-token log-probabilities and a frozen reference. alpha = 0 is a plain Bradley-Terry RM.
The reward is read at each sequence's last non-pad token (HaF's code reads position -1, a pad for the shorter side),
in the reward head's dtype (bfloat16 or float32), and returned as float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from troupe.actors.learner.dpo import dpo_loss


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(r_chosen - r_rejected)


def haf_loss(
    r_chosen, r_rejected, logp_chosen, logp_rejected, ref_chosen, ref_rejected, alpha: float, beta: float
):
    """Per-pair (total, reward part, policy part)."""
    reward_part = bradley_terry_loss(r_chosen, r_rejected)
    if alpha == 0:
        return reward_part, reward_part, torch.zeros_like(reward_part)
    policy_part, _, _ = dpo_loss(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta)
    return reward_part + alpha * policy_part, reward_part, policy_part


def last_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last non-pad token (right padding)."""
    return attention_mask.long().sum(-1) - 1


class RewardLM(nn.Module):
    """Causal LM whose final hidden state also feeds a scalar reward head (zero-initialised, as HaF)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.config = lm.config
        self.reward_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.reward_head.weight)
        nn.init.zeros_(self.reward_head.bias)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.lm.gradient_checkpointing_enable(**kwargs)

    def forward(self, input_ids, attention_mask, with_logits: bool = True):
        out = self.lm(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
        )
        hidden = out.hidden_states[-1]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, last_index(attention_mask)]
        # The head runs in its own dtype (bf16 under a bf16 engine, fp32 otherwise); the reward is float32.
        reward = self.reward_head(last.to(self.reward_head.weight.dtype)).float().squeeze(-1)
        return reward, (out.logits if with_logits else None)
