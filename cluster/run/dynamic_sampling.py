"""Dynamic sampling with refill (DAPO; verl's filter_groups, OpenRLHF's dynamic filtering, SkyRL's `filter`).

Under a group baseline, a prompt group whose rewards are all equal has zero advantage: it teaches nothing, and
with sparse rewards (a small model on GSM8K) almost every group is all wrong. With `data.dynamic_sampling=true`
such groups are left out as `zero_variance`, and more batches of prompts are drawn from the data cursor,
generated with the current weights and scored, until `data.prompts_per_iteration` informative groups are found
or `data.max_oversampling` times that many prompts were drawn this iteration. The variance test sees the reward
before reward.overlong's penalty, as DAPO filters on accuracy (data.dynamic_sampling_on=shaped_reward: after it).

The batch trained always has prompts_per_iteration groups (the learner ranks split a fixed number of groups):
the first informative ones in draw order, then, when too few were found, left-out groups riding along without a
loss. Informative groups past the batch are left out as `surplus`. Every prompt drawn is in the accounting:
trained, or dropped with its reason.

Refill batches come from the cursor right after the batch they complete, before the next batch is drawn (in
async mode the pipeline is topped up only after the refill: RolloutPipeline.next_batch(top_up=False)), so a
checkpoint's cursor state resumes exactly after them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from troupe.actors.protocol import ScoredRollout
from troupe.cluster.run.scoring import drop_rows

ZERO_VARIANCE = "zero_variance"
SURPLUS = "surplus"


@dataclass
class FilledBatch:
    scored: list[ScoredRollout]  # the training batch: `groups` prompt groups, in draw order
    left_out: dict[str, int]  # groups drawn but not in the batch, per reason
    stats: dict


def group_reasons(scored: list[ScoredRollout], n: int) -> list[str]:
    """Per prompt group: "" (informative), its drop reason, or ZERO_VARIANCE (kept, rewards all equal)."""
    reasons = []
    for g in range(len(scored) // n):
        group = scored[g * n : (g + 1) * n]
        if group[0].reward.dropped:
            reasons.append(group[0].reward.dropped)
        elif n > 1 and len({s.reward.scalar for s in group}) == 1:
            reasons.append(ZERO_VARIANCE)
        else:
            reasons.append("")
    return reasons


def fill_batch(
    rounds: list[list[ScoredRollout]], groups: int, n: int, judged: list[list[ScoredRollout]] | None = None
) -> FilledBatch:
    """The training batch of `groups` groups out of the scored rounds (the batch, then its refills). `judged`: the
    same rounds with the rewards the variance test sees (data.dynamic_sampling_on; default: `rounds`)."""
    scored = [s for r in rounds for s in r]
    reasons = group_reasons([s for r in (judged or rounds) for s in r], n)
    informative = [g for g, why in enumerate(reasons) if not why]
    chosen = informative[:groups]
    riders = [g for g, why in enumerate(reasons) if why][: groups - len(chosen)]
    batch = sorted(chosen + riders)
    left_out = Counter(reasons[g] or SURPLUS for g in range(len(reasons)) if g not in set(batch))
    rows = [s for g in batch for s in scored[g * n : (g + 1) * n]]
    zero = [reasons[g] == ZERO_VARIANCE for g in batch for _ in range(n)]
    stats = {
        "dynamic/refills": len(rounds) - 1,
        "dynamic/prompts_drawn": len(reasons),
        "dynamic/informative_groups": len(informative),
        "dynamic/filled_frac": len(chosen) / groups,
        **drawn_means(scored),
    }
    return FilledBatch(drop_rows(rows, zero, ZERO_VARIANCE), dict(left_out), stats)


def drawn_means(scored: list[ScoredRollout]) -> dict:
    """The mean reward and objectives over every kept rollout drawn: the batch's own reward/* columns cover the
    informative groups only (about 0.5 accuracy when the policy's is 3%)."""
    kept = [s.reward for s in scored if not s.reward.dropped]
    if not kept:
        return {}
    means = {"dynamic/drawn/reward": sum(r.scalar for r in kept) / len(kept)}
    for name in kept[0].objectives:
        values = [r.objectives[name] for r in kept if name in r.objectives]
        means[f"dynamic/drawn/{name}"] = sum(values) / len(values)
    return means


def needs_more(rounds: list[list[ScoredRollout]], groups: int, n: int, max_rounds: int) -> bool:
    """Whether another batch should be drawn: too few informative groups in the (judged) rounds, and drawing
    budget left."""
    if len(rounds) >= max_rounds:
        return False
    return sum(not why for why in group_reasons([s for r in rounds for s in r], n)) < groups
