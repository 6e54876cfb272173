"""The score phase: the reward fleet's per-objective values, `reward.on_error` applied to the samples an objective
failed on (a NaN value: an exception, a timeout or an invalid value in user or remote code), then the aggregation.

- `zero`: the failed value counts as 0 and the sample trains as usual;
- `drop` (default): the sample's whole prompt group is left out of training (group advantages need all of it).
  Its rollouts stay in the batch with no loss and no reward (`RewardBreakdown.dropped`), so the learner ranks
  still split the batch evenly, and the prompt enters the accounting as dropped (`reward_error`);
- `fail`: the run stops with an error naming the objective.

The aggregation sees the kept samples only, so a failure never moves a normaliser or a gate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from troupe.actors.protocol import RewardBreakdown, Rollout, ScoredRollout
from troupe.actors.reward.aggregation import TOKEN_PREFIX, score_rollouts, split_tokens

DROP_REASON = "reward_error"


class ObjectiveFailed(RuntimeError):
    """An objective with on_error=fail failed on a sample."""


@dataclass
class ScoredBatch:
    scored: list[ScoredRollout]  # every rollout, in order; dropped ones have reward.dropped set
    errors: dict[str, int] = field(default_factory=dict)  # failed samples per objective
    dropped_prompts: int = 0

    @property
    def kept(self) -> list[ScoredRollout]:
        return [s for s in self.scored if not s.reward.dropped]

    def metrics(self) -> dict:
        # Keys that are no other key's path prefix: MLflow's file store keeps "a/b" as a file under folder "a"
        # ("samples" is a metric already, so the count of dropped samples is "samples_dropped").
        row = {
            "reward/errors_total": sum(self.errors.values()),
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
    dropped_groups = {i // group_size for i, bad in enumerate(failed_rows.tolist()) if bad}
    keep = [i for i in range(len(rollouts)) if i // group_size not in dropped_groups]
    kept = [rollouts[i] for i in keep]
    kept_scored = iter(score_rollouts(kept, _rows(values, rollouts, keep), aggregation) if keep else [])
    scored = []
    for i, r in enumerate(rollouts):
        if i // group_size in dropped_groups:
            raw = {k: float(v[i]) for k, v in values.items() if not k.startswith(TOKEN_PREFIX)}
            scored.append(ScoredRollout(r, RewardBreakdown(0.0, raw, branch="dropped", dropped=DROP_REASON)))
        else:
            scored.append(next(kept_scored))
    return ScoredBatch(scored, errors, len(dropped_groups))


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
