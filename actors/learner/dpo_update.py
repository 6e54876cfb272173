"""DPO epochs on a learner rank over its share of preference pairs.

The reference log-probabilities are computed once per call, before any update: from the frozen initial model
(`dpo_reference: initial`) or from the policy as it stands at the start of the call (`previous`: in online
iterative DPO that is the previous iteration's model, as RLHFlow's code does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from actors.learner.batch import pad_sequences, token_logprobs
from actors.learner.dpo import PreferencePair, dpo_loss, sequence_logprob_sums


def dpo_update(learner, pairs: Sequence[PreferencePair]) -> dict:
    spec, engine = learner.spec, learner.engine
    device = engine.device
    n = len(pairs)
    if n == 0:
        raise ValueError(f"learner rank {learner.rank}: no preference pairs to train on")
    prompts = [p.prompt_ids for p in pairs] * 2
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    input_ids, attention, action = pad_sequences(prompts, responses, learner.pad_id)
    ref = _reference_sums(learner, input_ids, attention, action)
    sums = {"loss": 0.0, "reward/chosen": 0.0, "reward/rejected": 0.0, "margin": 0.0, "accuracy": 0.0}
    grad_norms: list[float] = []
    micro = 0
    engine.train()
    for rows, boundary, scale in learner.micro_batches(n):
        both = torch.cat([rows, rows + n])
        logp, _ = token_logprobs(engine, input_ids[both].to(device), attention[both].to(device))
        seq = sequence_logprob_sums(logp, action[both].to(device))
        k = len(rows)
        loss, chosen_r, rejected_r = dpo_loss(
            seq[:k],
            seq[k:],
            ref[rows].to(device),
            ref[rows + n].to(device),
            spec.dpo_beta,
            spec.dpo_loss,
            spec.dpo_label_smoothing,
        )
        loss = loss.mean()
        learner._step(loss, boundary, scale, grad_norms)
        micro += 1
        sums["loss"] += float(loss.detach())
        sums["reward/chosen"] += float(chosen_r.mean())
        sums["reward/rejected"] += float(rejected_r.mean())
        sums["margin"] += float((chosen_r - rejected_r).mean())
        sums["accuracy"] += float((chosen_r > rejected_r).float().mean())
    metrics = {k: v / micro for k, v in sums.items()}
    metrics["pairs"] = n
    metrics["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
    return metrics


@torch.no_grad()
def _reference_sums(learner, input_ids, attention, action) -> torch.Tensor:
    use_frozen = learner.spec.dpo_reference == "initial"
    if use_frozen and not learner.has_reference():
        raise RuntimeError("dpo_reference=initial needs the learner to hold a reference (use_reference=True)")
    out = []
    step = learner.spec.micro_batch_size * 2
    for lo in range(0, input_ids.shape[0], step):
        sl = slice(lo, lo + step)
        logp = learner.logprobs(input_ids[sl], attention[sl], reference=use_frozen)
        out.append(sequence_logprob_sums(logp, action[sl]))
    return torch.cat(out)
