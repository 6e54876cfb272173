"""The score phase: the reward fleet's per-objective values, `reward.on_error` applied to the samples an objective
failed on (a NaN value: an exception, a timeout or an invalid value in user or remote code), then the aggregation.

- `zero`: the failed value counts as 0 and the sample trains as usual;
- `drop` (default): the sample's whole prompt group is left out of training (group advantages need all of it).
  Its rollouts stay in the batch with no loss and no reward (`RewardBreakdown.dropped`), so the learner ranks
  still split the batch evenly, and the prompt enters the accounting as dropped (`reward_error`);
- `fail`: the run stops with an error naming the objective.

The aggregation sees the kept samples only, so a failure never moves a normaliser or a gate. A sample whose reward
is not finite (an objective's inf, an inf/NaN token reward, or an aggregation that made one) has its prompt group
dropped the same way, as `nonfinite_reward`, and counted (`reward/nonfinite`). A trajectory whose environment
failed (`Rollout.failed`, env.on_error=drop) has its group dropped for that reason (env_error, env_timeout).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from troupe.actors.protocol import RewardBreakdown, Rollout, ScoredRollout
from troupe.actors.reward.aggregation import TOKEN_PREFIX, score_rollouts, split_tokens

DROP_REASON = "reward_error"
NONFINITE_REASON = "nonfinite_reward"


class ObjectiveFailed(RuntimeError):
    """An objective with on_error=fail failed on a sample."""


@dataclass
class ScoredBatch:
    scored: list[ScoredRollout]  # every rollout, in order; dropped ones have reward.dropped set
    errors: dict[str, int] = field(default_factory=dict)  # failed samples per objective
    dropped_groups: dict[str, int] = field(default_factory=dict)  # prompt groups left out, per reason
    nonfinite: int = 0  # samples whose reward was inf/NaN (their groups are dropped: NONFINITE_REASON)

    @property
    def kept(self) -> list[ScoredRollout]:
        return [s for s in self.scored if not s.reward.dropped]

    @property
    def dropped_prompts(self) -> int:
        return sum(self.dropped_groups.values())

    def metrics(self) -> dict:
        # Keys that are no other key's path prefix: MLflow's file store keeps "a/b" as a file under folder "a"
        # ("samples" is a metric already, so the count of dropped samples is "samples_dropped").
        row = {
            "reward/errors_total": sum(self.errors.values()),
            "reward/nonfinite": self.nonfinite,
            "samples_dropped": len(self.scored) - len(self.kept),
        }
        row.update({f"reward/errors/{name}": n for name, n in sorted(self.errors.items()) if n})
        return row


@dataclass(frozen=True)
class ErrorPolicy:
    """reward.on_error per objective: an entry's own `on_error`, else `default`."""

    default: str = "drop"
    per_objective: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, reward_cfg) -> ErrorPolicy:
        own = {
            name: params["on_error"]
            for name, params in reward_cfg.objectives.items()
            if isinstance(params, Mapping) and "on_error" in params
        }
        return cls(reward_cfg.on_error, own)

    def __call__(self, objective: str) -> str:
        return self.per_objective.get(objective, self.default)


def score_batch(
    rollouts: Sequence[Rollout],
    values: Mapping[str, torch.Tensor],
    aggregation,
    on_error: ErrorPolicy = ErrorPolicy(),
    group_size: int = 1,
) -> ScoredBatch:
    """Scored rollouts, with `on_error` applied to the samples an objective failed on. Rollouts come in contiguous
    prompt groups of `group_size` (a training batch: generator.samples_per_prompt); a drop takes the whole group.
    Groups are told apart by position, not by prompt id: a batch may hold one prompt twice (e.g. across epochs)."""
    values = dict(values)
    failed_rows = torch.zeros(len(rollouts), dtype=torch.bool)
    errors: dict[str, int] = {}
    for name, v in list(values.items()):
        if name.startswith(TOKEN_PREFIX) or name.startswith("gate/"):
            continue
        failed = torch.isnan(v)
        errors[name] = int(failed.sum())
        if not errors[name]:
            continue
        policy = on_error(name)
        if policy == "fail":
            raise ObjectiveFailed(
                f"reward objective {name!r} failed on {errors[name]} of {len(rollouts)} samples "
                f"(reward.on_error=fail; its first traceback is in the log)"
            )
        if policy == "zero":
            values[name] = torch.where(failed, torch.zeros_like(v), v)
        else:
            failed_rows |= failed
    if len(rollouts) % group_size:
        raise ValueError(f"{len(rollouts)} rollouts do not split into prompt groups of {group_size}")
    # inf in an objective (NaN is a failure, above) or inf/NaN in a token channel: kept from the aggregation too,
    # whose normalisers would carry it into every later reward
    nonfinite_rows = _nonfinite_rows(values, rollouts) & ~failed_rows
    drop: dict[int, str] = {}  # prompt group -> why it is left out
    for i, r in enumerate(rollouts):  # a trajectory its environment failed (env.on_error=drop)
        if r.failed:
            drop.setdefault(i // group_size, r.failed)
    for reason, rows in ((DROP_REASON, failed_rows), (NONFINITE_REASON, nonfinite_rows)):
        for i in rows.nonzero().flatten().tolist():
            drop.setdefault(i // group_size, reason)
    keep = [i for i in range(len(rollouts)) if i // group_size not in drop]
    kept = [rollouts[i] for i in keep]
    kept_scored = score_rollouts(kept, _rows(values, rollouts, keep), aggregation) if keep else []
    by_row = dict(zip(keep, kept_scored, strict=True))
    nonfinite = int(nonfinite_rows.sum())
    for i, s in by_row.items():  # the aggregation may still make inf/NaN of finite values
        if not _finite(s.reward):
            drop.setdefault(i // group_size, NONFINITE_REASON)
            nonfinite += 1
    scored = []
    for i, r in enumerate(rollouts):
        reason = drop.get(i // group_size)
        if reason:
            raw = {k: float(v[i]) for k, v in values.items() if not k.startswith(TOKEN_PREFIX)}
            scored.append(ScoredRollout(r, RewardBreakdown(0.0, raw, branch="dropped", dropped=reason)))
        else:
            scored.append(by_row[i])
    return ScoredBatch(scored, errors, dict(Counter(drop.values())), nonfinite)


def _nonfinite_rows(values: Mapping[str, torch.Tensor], rollouts: Sequence[Rollout]) -> torch.Tensor:
    bad = torch.zeros(len(rollouts), dtype=torch.bool)
    for name, v in values.items():
        if name.startswith(TOKEN_PREFIX):
            bad |= torch.tensor([not bool(torch.isfinite(t).all()) for t in split_tokens(v, rollouts)])
        elif not name.startswith("gate/"):
            bad |= torch.isinf(v)
    return bad


def _finite(reward: RewardBreakdown) -> bool:
    return math.isfinite(reward.scalar) and all(math.isfinite(t) for t in reward.token_rewards or ())


def dropped_groups(scored: Sequence[ScoredRollout], group_size: int) -> dict[str, int]:
    """Prompt groups left out of training, per reason (the first sample of a group carries it)."""
    return dict(Counter(s.reward.dropped for s in scored[::group_size] if s.reward.dropped))


def drop_rows(scored: Sequence[ScoredRollout], rows: Sequence[bool], reason: str) -> list[ScoredRollout]:
    """`scored` with the rows flagged in `rows` marked dropped for `reason` (their reward no longer counts)."""
    return [
        replace(s, reward=replace(s.reward, scalar=0.0, branch="dropped", dropped=reason)) if bad else s
        for s, bad in zip(scored, rows, strict=True)
    ]


def _rows(values: Mapping[str, torch.Tensor], rollouts: Sequence[Rollout], keep: list[int]) -> dict:
    """The values of the rollouts at `keep` (per-token channels cut per rollout and joined again)."""
    out = {}
    index = torch.tensor(keep, dtype=torch.long)
    for name, v in values.items():
        if name.startswith(TOKEN_PREFIX):
            per_rollout = split_tokens(v, rollouts)
            out[name] = torch.cat([per_rollout[i] for i in keep]) if keep else v[:0]
        else:
            out[name] = v[index]
    return out
