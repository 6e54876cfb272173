"""One policy-gradient update on a learner rank: GRPO / RLOO / REINFORCE++ / PPO share this loop.

Advantages per token come from `spec.advantage_mode`:
  sequence: the driver's per-sample advantage on every response token (GRPO, RLOO, Dr. GRPO);
  returns:  REINFORCE++ - per-token rewards (sequence reward on the last token, minus beta*KL if kl_in_reward),
            discounted reward-to-go, whitened over the global batch;
  gae:      PPO - the same per-token rewards, GAE with the critic's values, whitened over the global batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from actors.learner.batch import TrainSample, collate, response_slices, token_logprobs
from actors.learner.grpo import aggregate, clipped_policy_loss, kl_penalty
from actors.learner.ppo import gae, masked_whiten, token_rewards


def policy_gradient_update(learner, samples: Sequence[TrainSample], kl_coef: float) -> dict:
    spec, engine = learner.spec, learner.engine
    device = engine.device
    batch = collate(samples, learner.pad_id)
    mask = batch.action_mask
    old_logp, ref_logp = _frozen_logprobs(learner, batch)
    stats = {
        "logprob_mismatch": float(((old_logp - batch.behaviour_logprobs).abs() * mask).sum() / mask.sum()),
    }
    log_ratio_ref = (old_logp - ref_logp) * mask if ref_logp is not None else None
    if log_ratio_ref is not None:  # what adaptive KL tracks: each sequence's summed KL, averaged
        stats["kl_seq"] = float(log_ratio_ref.sum(-1).mean())
    advantages, returns = _advantages(spec, batch, log_ratio_ref, kl_coef, learner)
    kl_in_loss = ref_logp is not None and not spec.kl_in_reward and kl_coef > 0
    sums = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0}
    grad_norms: list[float] = []
    micro = 0
    engine.train()
    for rows, boundary, scale in learner.micro_batches(len(batch)):
        mb = batch.select(rows)
        m = mb.action_mask.to(device)
        logp, entropy = token_logprobs(engine, mb.input_ids.to(device), mb.attention_mask.to(device), True)
        pg, clipped = clipped_policy_loss(
            logp, old_logp[rows].to(device), advantages[rows].to(device), spec.clip_eps
        )
        loss = aggregate(pg, m, spec.loss_agg)
        kl = torch.zeros((), device=device)
        if ref_logp is not None:
            kl = aggregate(kl_penalty(logp, ref_logp[rows].to(device), spec.kl_estimator), m, spec.loss_agg)
            if kl_in_loss:
                loss = loss + kl_coef * kl
        learner._step(loss, boundary, scale, grad_norms)
        micro += 1
        sums["loss"] += float(loss.detach())
        sums["pg_loss"] += float(aggregate(pg.detach(), m, spec.loss_agg))
        sums["kl"] += float(kl.detach())
        sums["clip_frac"] += float(aggregate(clipped, m, "token_mean"))
        sums["entropy"] += float(aggregate(entropy, m, "token_mean"))
    metrics = {k: v / micro for k, v in sums.items()} | stats
    if ref_logp is None:
        metrics["kl"] = float("nan")  # not measured without a reference model (algo.kl_coef=0)
    metrics["kl_coef"] = kl_coef
    metrics["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
    if returns is not None:
        metrics["returns/mean"] = float((returns * mask).sum() / mask.sum())
        if spec.advantage_mode == "gae":
            metrics["_returns"] = response_slices(batch, returns)  # the critic's targets, in sample order
    return metrics


def _frozen_logprobs(learner, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprobs before the update (the ratio's denominator) and under the reference model."""
    old, ref = [], []
    step = learner.spec.micro_batch_size
    for lo in range(0, len(batch), step):
        mb = batch.select(slice(lo, lo + step))
        old.append(learner.logprobs(mb.input_ids, mb.attention_mask, reference=False))
        if learner.has_reference():
            ref.append(learner.logprobs(mb.input_ids, mb.attention_mask, reference=True))
    return torch.cat(old), (torch.cat(ref) if ref else None)


def _advantages(spec, batch, log_ratio_ref, kl_coef: float, learner):
    mask = batch.action_mask
    if spec.advantage_mode == "sequence":
        return batch.advantages[:, None] * mask, None
    penalty = kl_coef if spec.kl_in_reward else 0.0
    rewards = token_rewards(batch.rewards, mask, log_ratio_ref, penalty, batch.token_rewards)
    if spec.advantage_mode == "gae":
        advantages, returns = gae(rewards, batch.values, mask, spec.gamma, spec.lam)
    elif spec.advantage_mode == "returns":
        advantages, returns = gae(rewards, torch.zeros_like(rewards), mask, spec.gamma, 1.0)
    else:
        raise ValueError(f"advantage_mode must be sequence, returns or gae, got {spec.advantage_mode!r}")
    if spec.whiten_advantages:
        advantages = masked_whiten(advantages, mask, distributed=spec.world_size > 1)
    return advantages, returns
