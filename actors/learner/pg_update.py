"""One policy-gradient update on a learner rank, for every estimator (GRPO, RLOO, REINFORCE++, PPO, ...):

  1. frozen log-probs: the reference's (KL), and the old policy's unless the update is exactly on-policy
     (one epoch, one mini-batch, the weights that generated the rollouts: then old = current, detached);
  2. token rewards (minus beta * KL_t when algo.kl_placement=reward), advantages from `algo.estimator`
     (a prompt group with an inf/NaN one is dropped from the update and reported), optionally whitened over the
     global batch;
  3. the clipped policy loss (+ a KL loss term), over micro-batches grouped by length (DeepSpeedRank.optimize).
All log-probs are at each rollout's sampling temperature.
"""

from __future__ import annotations

import torch

from troupe.actors.learner.advantages import AdvantageInputs, estimate
from troupe.actors.learner.batch import RolloutBatch
from troupe.actors.learner.config import MASKING
from troupe.actors.learner.grpo import clipped_policy_loss, kl_penalty
from troupe.actors.learner.logprobs import causal_lm, response_logprobs
from troupe.actors.learner.off_policy import correction_weights, mismatch_kl
from troupe.actors.learner.ppo import masked_whiten


def policy_gradient_update(learner, batch: RolloutBatch, kl_coef: float) -> tuple[dict, dict]:
    """Returns metrics and per-row outputs: "advantage" (each row's mean advantage over its response tokens, as
    the loss used it; NaN for a row without any), "nonfinite" (rows left out for an inf/NaN advantage or return)
    and, for a critic, "returns" (response tokens only, else None)."""
    spec, engine = learner.spec, learner.engine
    algo, train = spec.algo, spec.train
    device = engine.device
    mask = batch.action_mask
    with_reference = learner.has_reference()
    kl_in_reward = with_reference and algo.kl_placement == "reward" and kl_coef > 0
    on_policy = (
        train.epochs == 1
        and train.mini_batches == 1
        and bool((batch.weight_version == learner.version).all())
    )
    ref_logp = learner.frozen_logprobs(batch, reference=True) if with_reference else None
    old_logp = None if on_policy and not kl_in_reward else learner.frozen_logprobs(batch, reference=False)

    token_rewards = batch.token_rewards
    if kl_in_reward:
        token_rewards = (
            token_rewards - kl_coef * kl_penalty(old_logp, ref_logp, "k1", algo.log_ratio_clamp) * mask
        )
    advantages, returns = estimate(
        algo, AdvantageInputs(batch.rewards, token_rewards, mask, batch.group_size, batch.values)
    )
    # Prompt groups with an inf/NaN advantage (or return) leave the update, before whitening could spread it.
    nonfinite = nonfinite_groups(mask, batch.group_size, advantages, returns)
    if bool(nonfinite.any()):
        keep = ~nonfinite[:, None]
        mask = mask * keep
        advantages = torch.where(keep, advantages, 0.0)
        returns = None if returns is None else torch.where(keep, returns, 0.0)
        batch = batch.with_columns(action_mask=mask)
    if algo.whiten_advantages:
        advantages = masked_whiten(advantages, mask, distributed=train.world_size > 1)
    batch = batch.with_columns(advantages=advantages)
    kl_in_loss = with_reference and algo.kl_placement == "loss" and kl_coef > 0
    # Rows whose tokens are importance-corrected: those from older weights, or all of them (algo.tis_scope).
    stale_rows = batch.weight_version != learner.version
    # Decided by the config alone, so every rank reports the same metrics (one rank's share may hold no stale row).
    tis_rows = None
    if algo.corrects():
        tis_rows = torch.ones_like(stale_rows) if algo.tis_scope == "all" else stale_rows
    group_size = batch.group_size if train.share_prompts else 1

    def columns(full: torch.Tensor | None, rows: torch.Tensor, w: int) -> torch.Tensor | None:
        return None if full is None else full[rows][:, :w].to(device)

    def micro_loss(rows, norm):
        mb = batch.select(rows)
        m = mb.action_mask.to(device)
        w = m.shape[1]
        logp, entropy = response_logprobs(
            engine,
            mb.input_ids.to(device),
            mb.attention_mask.to(device),
            m,
            mb.temperature,
            with_entropy=True,
            chunk=train.logprob_chunk,
            group_size=group_size,
        )
        current = logp.detach()
        # Outside the mask (padding, rows a non-finite advantage dropped) the inputs may be inf/NaN, and the mask's
        # 0 does not cancel them (NaN x 0 is NaN, in the loss and in its gradient): they become the current
        # log-probs there, so those tokens add exactly nothing.
        keep = m.bool()
        old = columns(old_logp, rows, w)
        base = current if old is None else torch.where(keep, old, current)  # the policy before this update
        behaviour = torch.where(keep, mb.behaviour_logprobs.to(device), current)
        pg, clipped, dual_capped = clipped_policy_loss(
            logp,
            base,
            mb.advantages.to(device),
            clip_low=algo.clip_eps,
            clip_high=algo.clip_eps_high,
            dual_clip=algo.dual_clip,
            clamp=algo.log_ratio_clamp,
        )
        # the train/inference mismatch KL(pi_behaviour || pi_old), on every row
        stats = {
            "mismatch/kl": norm.per_token((mismatch_kl(base, behaviour, m, algo.log_ratio_clamp) * m).sum())
        }
        if tis_rows is not None:
            scope = m * tis_rows[rows].to(device)[:, None]
            bounds = (algo.correction_low, algo.correction_high)
            iw, masked = correction_weights(
                algo.correction, base, behaviour, m, algo.tis_cap, bounds, algo.log_ratio_clamp
            )
            iw = torch.where(scope.bool(), iw, 1.0)
            pg = pg * iw
            # over every response token (a token out of scope weighs 1), so ranks and micro-batches average alike
            stats["tis/weight_mean"] = norm.per_token((iw * m).sum())
            if algo.correction in MASKING:
                stats["tis/masked_frac"] = norm.per_token((masked * scope).sum())
            else:
                stats["tis/truncated_frac"] = norm.per_token(((iw >= algo.tis_cap) * scope).sum())
        loss = norm.reduce(pg, m, algo.loss_agg)
        stats |= {
            "pg_loss": loss.detach(),
            "clip_frac": norm.per_token((clipped * m).sum()),
            "dual_clip_frac": norm.per_token((dual_capped * m).sum()),
            "entropy": norm.per_token((entropy * m).sum()),
            "advantage/abs_mean": norm.per_token((mb.advantages.to(device).abs() * m).sum()),
        }
        if old is None:  # on-policy: the current log-probs are the old ones (one step, so measured once)
            gap = (current - behaviour).abs() * m
            stats["logprob_mismatch"] = norm.per_token(gap.sum())
        ref = columns(ref_logp, rows, w)
        if ref is not None:
            ref = torch.where(keep, ref, current)
            kl = kl_penalty(logp, ref, algo.kl_estimator, algo.log_ratio_clamp)
            stats["kl"] = norm.per_token((kl.detach() * m).sum())  # a token mean whatever loss_agg is
            stats["kl_seq"] = norm.per_sequence(((current - ref) * m).sum())  # adaptive KL's measure
            if kl_in_loss:
                loss = loss + kl_coef * norm.reduce(kl, m, algo.loss_agg)
        stats["loss"] = loss.detach()
        return loss, stats

    metrics = learner.optimize(batch.lengths, mask.sum(-1), micro_loss, not on_policy, group_size)
    metrics["old_logprobs_forward"] = float(old_logp is not None)
    metrics["stale_rows_frac"] = float(stale_rows.float().mean())
    metrics["prompts_packed"] = float(
        group_size > 1 and getattr(causal_lm(engine), "_troupe_packing", False) is True
    )
    # The train/inference mismatch before any update (later steps would add the policy's drift).
    if old_logp is not None:
        gap = (old_logp - batch.behaviour_logprobs).abs() * mask
        metrics["logprob_mismatch"] = float(gap.sum() / mask.sum().clamp(min=1.0))
    if ref_logp is None:
        metrics["kl"] = float("nan")  # not measured without a reference model (algo.kl_coef=0)
    metrics["kl_coef"] = kl_coef
    if returns is not None:
        metrics["returns/mean"] = float((returns * mask).sum() / mask.sum().clamp(min=1.0))
    per_row_advantage = (batch.advantages * mask).sum(-1) / mask.sum(-1)  # NaN (0/0) for rows without tokens
    rows = {
        "advantage": per_row_advantage.tolist(),
        "nonfinite": nonfinite.tolist(),  # rows dropped for an inf/NaN advantage: no loss, no return
        "returns": batch.response_rows(returns) if algo.critic and returns is not None else None,
    }
    return metrics, rows


def nonfinite_groups(mask: torch.Tensor, group_size: int, *per_token: torch.Tensor | None) -> torch.Tensor:
    """[B] bool: the rows of every prompt group (`group_size` contiguous rows) with an inf/NaN value on a response
    token in any of `per_token` ([B, T] each, None skipped). Whole groups: the accounting counts prompts."""
    bad = torch.zeros(mask.shape[0], dtype=torch.bool)
    for values in per_token:
        if values is not None:
            bad |= (~torch.isfinite(values) & mask.bool()).any(-1)
    g = group_size if group_size > 1 and len(bad) % group_size == 0 else 1
    return bad.view(-1, g).any(-1).repeat_interleave(g)
