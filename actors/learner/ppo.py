"""PPO math: GAE, masked (global) whitening, the clipped value loss, and the adaptive KL controller. Pure tensor functions on [B, T] tensors whose `mask` marks response tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last 1 in `mask` (rows must have at least one)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).max(dim=1).values


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; returns (advantages, returns), both [B, T].

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}; the value after the last
    response token is 0 (the episode ends), and positions outside `mask` are skipped. returns = A + V.
    With values = 0 and lam = 1, returns are the discounted reward-to-go (REINFORCE++).
    """
    mask = mask.float()
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        advantages[:, t] = adv_t * m
        # Padding keeps the carried values, so a right-padded row's last token sees V=0, A=0 after it.
        next_value = torch.where(m.bool(), values[:, t], next_value)
        next_adv = torch.where(m.bool(), adv_t, next_adv)
    return advantages, (advantages + values) * mask


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, distributed: bool = False, eps: float = 1e-8):
    """(x - mean) / std over masked entries; with `distributed`, the moments span every rank's batch."""
    mask = mask.float()
    stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    if distributed:
        from troupe.actors.learner.step import all_reduce_sum

        stats = all_reduce_sum(stats)
    total, sq, count = stats.tolist()
    mean = total / max(count, 1.0)
    var = max(sq / max(count, 1.0) - mean * mean, 0.0) * count / max(count - 1.0, 1.0)
    return (x - mean) / (var**0.5 + eps) * mask


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token 0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2) and a mask of tokens where clipping won."""
    unclipped = (values - returns).pow(2)
    if clip is None or clip <= 0:
        return 0.5 * unclipped, torch.zeros_like(unclipped)
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (clipped_values - returns).pow(2)
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def explained_variance(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.bool()
    residual, target = (target - pred)[m], target[m]
    var = target.var()
    return float(1.0 - residual.var() / var) if var > 0 else float("nan")


@dataclass
class AdaptiveKL:
    """Ziegler et al. (2019): beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon after each batch.

    `target=None` keeps beta fixed. KL is the batch mean of each sequence's summed per-token KL.
    """

    coef: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, n_samples: int) -> float:
        if self.target is not None and kl == kl:  # NaN (no reference) leaves beta unchanged
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + error * n_samples / self.horizon
        return self.coef
