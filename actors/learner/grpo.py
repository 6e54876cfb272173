"""Policy-gradient math: group-normalised advantages, the clipped token-level policy loss, and KL estimators.

Pure tensor functions (no DeepSpeed, no Ray) so they can be checked against hand-computed values.
"""

from __future__ import annotations

import torch


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


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3)."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    if estimator == "k3":  # unbiased and always >= 0: exp(-x) - 1 + x with x = logp - ref_logp
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl estimator must be k1, k2 or k3, got {estimator!r}")


def truncated_importance_weights(
    old_logp: torch.Tensor, behaviour_logp: torch.Tensor, cap: float, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token min(pi_old / pi_behaviour, cap) (TIS), detached; 1 outside `rows` ([B] bool, None: all rows).

    The log-ratio is clamped before exp so a token the learner finds far likelier cannot overflow."""
    w = torch.exp((old_logp - behaviour_logp).detach().clamp(-20.0, 20.0)).clamp(max=cap)
    if rows is not None:
        w = torch.where(rows[:, None], w, torch.ones_like(w))
    return w


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip loss -min(rho*A, clip(rho, 1-eps, 1+eps)*A) and a mask of clipped tokens.

    `advantages` is per sequence [B] or per token [B, T]; logp/old_logp are [B, T].
    """
    adv = advantages[:, None] if advantages.ndim == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    loss = -torch.minimum(unclipped, clipped)
    return loss, (clipped < unclipped).float()
