"""DPO math and preference-pair construction (the RLHFlow online iterative DPO recipe).

Loss, with Delta = (log pi - log pi_ref)(y_w) - (log pi - log pi_ref)(y_l) over summed response-token logprobs:
  sigmoid (DPO, with label smoothing eps, "conservative DPO"): -(1-eps) log s(beta Delta) - eps log s(-beta Delta)
  ipo (Azar et al. 2023): (Delta - 1/(2 beta))^2, on summed (not length-averaged) log-ratios.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAIR_STRATEGIES = ("max_min", "max_random", "max_min_length")
DPO_LOSSES = ("sigmoid", "ipo")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss [B] and the implicit rewards beta * (log pi - log pi_ref) of chosen and rejected."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        loss = -(1.0 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(
            -beta * delta
        )
    elif loss_type == "ipo":
        loss = (delta - 1.0 / (2.0 * beta)).pow(2)
    else:
        raise ValueError(f"dpo loss must be one of {DPO_LOSSES}, got {loss_type!r}")
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


@dataclass(frozen=True)
class PreferencePair:
    """One DPO training pair of token ids (the prompt already chat-templated)."""

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.prompt_ids or not self.chosen_ids or not self.rejected_ids:
            raise ValueError(
                "preference pair has an empty prompt or response "
                f"(prompt {len(self.prompt_ids)}, chosen {len(self.chosen_ids)}, rejected {len(self.rejected_ids)} tokens)"
            )


def choose_pair(
    rewards: Sequence[float],
    lengths: Sequence[int],
    strategy: str,
    rng: random.Random,
    length_penalty: float = 0.0,
) -> tuple[int, int] | None:
    """(chosen, rejected) indices within one prompt's group, or None when the group gives no strict preference.

    max_min: best vs worst. max_random: best vs a random response with a strictly lower reward.
    max_min_length: best vs worst after subtracting length_penalty * length (RLHFlow's max_min_p).
    """
    if strategy not in PAIR_STRATEGIES:
        raise ValueError(f"pair strategy must be one of {PAIR_STRATEGIES}, got {strategy!r}")
    scores = list(rewards)
    if strategy == "max_min_length":
        scores = [r - length_penalty * n for r, n in zip(rewards, lengths, strict=True)]
    best = max(range(len(scores)), key=scores.__getitem__)
    if strategy == "max_random":
        lower = [i for i, s in enumerate(scores) if s < scores[best]]
        return (best, rng.choice(lower)) if lower else None
    worst = min(range(len(scores)), key=scores.__getitem__)
    return (best, worst) if scores[best] > scores[worst] else None


def sequence_logprob_sums(token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (token_logp * mask).sum(-1)
