"""Advantage estimators: `algo.estimator` picks a registered one by name, or names your own by import path
(`mypkg.adv:my_estimator`; from Python, the object itself). Yours is an `Estimator(fn, token_level=...,
compares_group=..., needs_critic=...)`, or a bare function (then sequence-level, needing neither group nor critic):

    def centred(inputs: AdvantageInputs, algo: AlgoConfig):
        kept = inputs.kept()  # rows a reward failure dropped have no response tokens and reward 0
        adv = inputs.rewards - inputs.rewards[kept].mean()
        return adv[:, None] * inputs.mask, None

Each estimator maps `AdvantageInputs` (one learner rank's rows, whole prompt groups) to per-token advantages
[B, T] and, where a critic learns from them, returns [B, T]. Sequence-level estimators put one number on every
response token. Whitening over the global batch (`algo.whiten_advantages`) is applied after, by the caller.
Pure tensor functions (no DeepSpeed, no Ray).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from troupe.actors.learner.config import AlgoConfig
from troupe.actors.learner.grpo import group_advantages
from troupe.actors.learner.ppo import gae, last_token_index
from troupe.actors.plugins import PluginError, load_object


@dataclass(frozen=True)
class AdvantageInputs:
    rewards: torch.Tensor  # [B] sequence rewards
    token_rewards: (
        torch.Tensor
    )  # [B, T] the reward on each response token (minus beta*KL_t when kl_placement=reward)
    mask: torch.Tensor  # [B, T] response tokens
    group_size: int
    values: torch.Tensor | None = None  # [B, T] critic values (gae)

    def kept(self) -> torch.Tensor:
        """[B] bool: rows with response tokens. A prompt group dropped for a reward failure (reward.on_error=drop)
        stays in the batch with no response tokens and reward 0; whole-group estimators see all of it at once
        (its advantages are 0), but a statistic over the batch should leave those rows out."""
        return self.mask.bool().any(-1)


EstimatorFn = Callable[[AdvantageInputs, AlgoConfig], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class Estimator:
    fn: EstimatorFn
    token_level: bool  # advantages differ per token (so a KL penalty may sit in the token rewards)
    compares_group: bool  # reads other samples of the same prompt (needs samples_per_prompt >= 2)
    needs_critic: bool  # reads the critic's values


ESTIMATORS: dict[str, Estimator] = {}


def estimator(name: str, token_level: bool = False, compares_group: bool = False, needs_critic: bool = False):
    """Register an estimator under `name`; config validation reads what it declares here."""

    def register(fn: EstimatorFn) -> EstimatorFn:
        ESTIMATORS[name] = Estimator(fn, token_level, compares_group, needs_critic)
        return fn

    return register


def lookup(ref) -> Estimator:
    """A registered name, an import path or an object: the `Estimator` it means (errors name algo.estimator)."""
    if isinstance(ref, str) and ref in ESTIMATORS:
        return ESTIMATORS[ref]
    if isinstance(ref, str) and ("." not in ref and ":" not in ref):
        raise PluginError(
            f"algo.estimator must be one of {sorted(ESTIMATORS)} or an import path (pkg.module:name), got {ref!r}"
        )
    found = load_object(ref, "algo.estimator")
    if isinstance(found, Estimator):
        return found
    if callable(found):
        return Estimator(found, token_level=False, compares_group=False, needs_critic=False)
    raise PluginError(f"algo.estimator={ref!r} is a {type(found).__name__}, not an Estimator or a function")


def estimate(algo: AlgoConfig, inputs: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    return lookup(algo.estimator).fn(inputs, algo)


def _per_token(sequence_advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return sequence_advantages[:, None].float() * mask


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    return rewards.float().view(-1, group_size)


@estimator("group", compares_group=True)
def group(inputs: AdvantageInputs, algo: AlgoConfig):
    """GRPO: (r - group mean) / group std; Dr. GRPO without the std (algo.scale_by_std=false)."""
    adv = group_advantages(inputs.rewards, inputs.group_size, scale_by_std=algo.scale_by_std)
    return _per_token(adv, inputs.mask), None


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A_i = r_i - mean_{j != i} r_j (Ahmadian et al., 2024)."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    groups = _groups(rewards, group_size)
    loo_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - loo_mean).view(-1)


@estimator("rloo", compares_group=True)
def rloo(inputs: AdvantageInputs, algo: AlgoConfig):
    return _per_token(rloo_advantages(inputs.rewards, inputs.group_size), inputs.mask), None


def _centred_within_groups(inputs: AdvantageInputs) -> torch.Tensor:
    """token rewards with each group's mean sequence reward removed from each row's last token."""
    groups = _groups(inputs.rewards, inputs.group_size)
    shift = groups.mean(dim=1, keepdim=True).expand_as(groups).reshape(-1)
    last = last_token_index(inputs.mask)
    out = inputs.token_rewards.clone()
    out[torch.arange(len(out)), last] -= shift
    return out


@estimator("returns", token_level=True)
def returns(inputs: AdvantageInputs, algo: AlgoConfig):
    """REINFORCE++: the discounted reward-to-go of the token rewards (group mean removed with group_baseline)."""
    rewards = _centred_within_groups(inputs) if algo.group_baseline else inputs.token_rewards
    adv, ret = gae(rewards, torch.zeros_like(rewards), inputs.mask, algo.gamma, 1.0)
    return adv, ret


@estimator("gae", token_level=True, needs_critic=True)
def generalised_advantages(inputs: AdvantageInputs, algo: AlgoConfig):
    """PPO: GAE over the token rewards with the critic's values."""
    if inputs.values is None:
        raise ValueError("algo.estimator=gae needs critic values (algo.critic=true)")
    return gae(inputs.token_rewards, inputs.values, inputs.mask, algo.gamma, algo.lam)


@estimator("constant_baseline")
def constant_baseline(inputs: AdvantageInputs, algo: AlgoConfig):
    """REINFORCE with a constant baseline b (algo.estimator_args.baseline): A = r - b on every token."""
    baseline = float(algo.estimator_args.get("baseline", 0.0))
    return _per_token(inputs.rewards - baseline, inputs.mask), None
