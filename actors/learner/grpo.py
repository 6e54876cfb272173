"""Policy-gradient math: group-normalised advantages, the clipped token-level policy loss, and KL estimators.

Pure tensor functions (no DeepSpeed, no Ray) so they can be checked against hand-computed values.
"""

from __future__ import annotations

import torch

from troupe.actors.learner.config import KL_VALUE_CLAMP, LOG_RATIO_CLAMP


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """A_i = (r_i - mean(group)) / (std(group) + eps), groups being consecutive runs of `group_size`.

    std is the unbiased sample std (as in the GRPO paper's reference implementations); a group whose rewards are
    all equal gets zero advantages. With `scale_by_std=False` only the mean is removed (Dr. GRPO).
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std and group_size > 1:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.view(-1)


def kl_penalty(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3", clamp: float = LOG_RATIO_CLAMP
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3). The log-ratio is clamped
    to +-`clamp` first, so every estimator and its gradient stay finite for any input (k3 has exp(-x)); k3's value
    is also capped at KL_VALUE_CLAMP, past which a token adds no gradient (one outlier cannot steer the step)."""
    log_ratio = (logp - ref_logp).clamp(-clamp, clamp)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    if estimator == "k3":  # unbiased and always >= 0: exp(-x) - 1 + x with x = logp - ref_logp
        return (torch.expm1(-log_ratio) + log_ratio).clamp(max=KL_VALUE_CLAMP)
    raise ValueError(f"kl estimator must be k1, k2 or k3, got {estimator!r}")


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    clamp: float = LOG_RATIO_CLAMP,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip loss max(-rho*A, -clip(rho, 1-clip_low, 1+clip_high)*A), the mask of clipped tokens,
    and the mask of tokens the dual clip capped.

    clip_high > clip_low is DAPO's clip-higher (None: symmetric). `dual_clip` c > 1 caps the loss of a negative
    advantage at -c*A (Ye et al. 2020), which the clip leaves unbounded as rho grows. The log-ratio is clamped to
    +-`clamp` before exp, so the ratio is finite for any input. `advantages` is per sequence [B] or per token
    [B, T]; logp/old_logp are [B, T]."""
    adv = advantages[:, None] if advantages.ndim == 1 else advantages
    high = clip_low if clip_high is None else clip_high
    ratio = torch.exp((logp - old_logp).clamp(-clamp, clamp))
    unclipped = -ratio * adv
    clipped = -ratio.clamp(1.0 - clip_low, 1.0 + high) * adv
    loss = torch.maximum(unclipped, clipped)
    capped = torch.zeros_like(loss, dtype=torch.bool)
    if dual_clip is not None:
        cap = -dual_clip * adv
        capped = (adv < 0) & (loss > cap)
        loss = torch.where(capped, cap, loss)
    return loss, (clipped > unclipped).float(), capped.float()
