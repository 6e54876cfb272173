"""Critic-free sequence-level advantage estimators beside GRPO: RLOO and REINFORCE++ (with/without baseline).

Pure tensor functions; rewards come as consecutive groups of `group_size` samples of one prompt.
KL to the reference enters the loss as a k1/k2/k3 term (as in GRPO), not as a per-token reward penalty:
OpenRLHF's REINFORCE++ folds it into the reward; troupe does that only once token-level rewards land (PPO).
"""

from __future__ import annotations

import torch

from actors.learner.grpo import group_advantages

ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A_i = r_i - mean_{j != i} r_j = n/(n-1) * (r_i - mean(group)) (Ahmadian et al., 2024)."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    groups = _groups(rewards, group_size)
    loo_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - loo_mean).view(-1)


def whiten(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(x - mean) / (std + eps) over the whole batch (unbiased std)."""
    if x.numel() < 2:
        return x - x.mean()
    return (x - x.mean()) / (x.std() + eps)


def reinforce_pp_advantages(rewards: torch.Tensor, group_size: int, baseline: bool) -> torch.Tensor:
    """REINFORCE++: rewards whitened over the global batch; with `baseline`, the group mean is removed first."""
    r = rewards.float()
    if baseline:
        groups = _groups(r, group_size)
        r = (groups - groups.mean(dim=1, keepdim=True)).view(-1)
    return whiten(r)


def estimate_advantages(
    name: str, rewards: torch.Tensor, group_size: int, scale_by_std: bool = True
) -> torch.Tensor:
    if name == "grpo":
        return group_advantages(rewards, group_size, scale_by_std=scale_by_std)
    if name == "rloo":
        return rloo_advantages(rewards, group_size)
    if name == "reinforce_pp":
        return reinforce_pp_advantages(rewards, group_size, baseline=False)
    if name == "reinforce_pp_baseline":
        return reinforce_pp_advantages(rewards, group_size, baseline=True)
    raise ValueError(f"advantage estimator must be one of {ESTIMATORS}, got {name!r}")


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    return rewards.float().view(-1, group_size)
