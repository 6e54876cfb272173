"""DPO epochs on a learner rank over its share of preference pairs.

The reference log-probabilities are computed once per call, before any update: from the frozen initial model
(`dpo_reference: initial`) or from the policy as it stands at the start of the call (`previous`: in online
iterative DPO that is the previous iteration's model, as RLHFlow's code does). The loss is a mean over the
optimizer step's pairs on every rank (DeepSpeedRank.optimize).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from troupe.actors.learner.batch import pair_batch, pair_lengths, pair_rows
from troupe.actors.learner.dpo import PreferencePair, dpo_loss
from troupe.actors.learner.logprobs import response_logprobs


def dpo_update(learner, pairs: Sequence[PreferencePair]) -> dict:
    algo, device = learner.spec.algo, learner.engine.device
    n = len(pairs)
    if n == 0:
        raise ValueError(f"learner rank {learner.rank}: no preference pairs to train on")
    use_frozen = algo.dpo_reference == "initial"
    if use_frozen and not learner.has_reference():
        raise RuntimeError("dpo_reference=initial needs the learner to hold a reference model")
    batch = pair_batch(pairs, learner.pad_id)
    ref = learner.frozen_logprobs(batch, reference=use_frozen).sum(-1)

    def micro_loss(rows, norm):
        mb = batch.select(pair_rows(rows, n))
        m = mb.action_mask.to(device)
        logp, _ = response_logprobs(
            learner.engine,
            mb.input_ids.to(device),
            mb.attention_mask.to(device),
            m,
            mb.temperature,
            chunk=learner.spec.train.logprob_chunk,
        )
        seq = logp.sum(-1)
        k = len(rows)
        loss, chosen_r, rejected_r = dpo_loss(
            seq[:k],
            seq[k:],
            ref[rows].to(device),
            ref[rows + n].to(device),
            algo.dpo_beta,
            algo.dpo_loss,
            algo.label_smoothing,
        )
        total = norm.per_sequence(loss.sum())
        return total, {
            "loss": total.detach(),
            "reward/chosen": norm.per_sequence(chosen_r.sum()),
            "reward/rejected": norm.per_sequence(rejected_r.sum()),
            "margin": norm.per_sequence((chosen_r - rejected_r).sum()),
            "accuracy": norm.per_sequence((chosen_r > rejected_r).float().sum()),
        }

    metrics = learner.optimize(pair_lengths(batch), torch.ones(n), micro_loss)
    metrics["pairs"] = n
    return metrics
