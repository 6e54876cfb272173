"""The `RewardShard` actor: hosts a set of experts and scores rollout batches on them.

Experts are rule objectives, user objectives (a `target` plug-in or a `type: http` remote reward model, each behind
the guard of actors/reward/objective.py) and/or reward bundles (a backbone with its heads: ArmoRM objectives and gate,
Bradley-Terry / HaF head); one backbone forward serves all heads of a bundle. A reward model is a set of shards
(each replicable) plus one aggregation, applied by the caller. With `token_values`, rule objectives that have
per-token values also return them under `token_key(name)` (for token-level aggregations). Bundles run their
backbone in `dtype` (auto | bfloat16 | float32). Plain class; cluster wraps it with `ray.remote`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from troupe.actors.hardware import node_id
from troupe.actors.protocol import Rollout
from troupe.actors.reward.aggregation import token_key
from troupe.actors.reward.objective import (
    RESERVED_KEYS,
    GuardedObjective,
    load_plugin,
)
from troupe.actors.reward.rules import RULES

FAILURES_KEY = "__failures__"  # in a shard's answer: {objective: first failure message}, once per objective

log = logging.getLogger("troupe.reward")


@dataclass(frozen=True)
class ShardSpec:
    """Which objectives this shard hosts and their settings ({objective: {param: value}})."""

    objectives: dict[str, dict] = field(default_factory=dict)
    bundles: tuple[str, ...] = ()  # reward bundle folders (actors/reward/bundle.py) hosted here
    batch_size: int = 64
    token_values: bool = False  # also return per-token channels of the objectives that have them
    timeout_s: float | None = 60.0  # per call of a guarded objective (an entry's own timeout_s wins)
    dtype: str = "float32"  # the bundles' backbone dtype: auto | bfloat16 | float32


def build_objectives(objectives: dict[str, dict], timeout_s: float | None = None) -> list:
    """Built-in rules by name; a `target` entry is a plug-in and a `type: http` entry a remote reward model, both
    guarded (a failing sample is NaN, never an exception)."""
    built = []
    for name, params in objectives.items():
        params = dict(params)
        timeout = params.get("timeout_s", timeout_s)
        if params.get("type") == "http":
            from troupe.actors.reward.remote_rm import HttpObjective

            built.append(GuardedObjective(name, HttpObjective.from_params(name, params), timeout))
            continue
        if "target" in params:
            built.append(GuardedObjective(name, load_plugin(name, params), timeout))
            continue
        if params.get("type") not in (None, "rule"):
            raise ValueError(
                f"reward.objectives.{name}.type={params['type']!r}: a rule shard hosts rules, plug-ins "
                "(target: ...) and http objectives; judge objectives run on a judge pool"
            )
        if name not in RULES:
            raise ValueError(
                f"reward objective {name!r} is unknown; known: {sorted(RULES)} (or give target: "
                "pkg.module:function for your own)"
            )
        try:
            built.append(RULES[name](**{k: v for k, v in params.items() if k not in RESERVED_KEYS}))
        except TypeError as e:
            raise ValueError(f"reward objective {name!r}: bad parameters {params}: {e}") from e
    return built


class RewardShard:
    def __init__(self, spec: ShardSpec, replica: int = 0) -> None:
        self.spec = spec
        self.replica = replica
        self.objectives = build_objectives(spec.objectives, spec.timeout_s)
        from troupe.actors.reward.bundle import BundleScorer

        self.bundles = [BundleScorer(b, dtype=spec.dtype) for b in spec.bundles]
        self.stats = {"rollouts": 0, "batches": 0, "score_s": 0.0}

    def ready(self) -> dict:
        return {
            "replica": self.replica,
            "pid": os.getpid(),
            "node": node_id(),
            "objectives": self.objective_names(),
        }

    def objective_names(self) -> list[str]:
        return [o.name for o in self.objectives] + [b.heads.info.name for b in self.bundles]

    def score(self, rollouts: Sequence[Rollout]) -> dict[str, torch.Tensor]:
        """Per-objective values [N] for each rollout (and per-token channels [tokens]), in batches of
        `spec.batch_size`."""
        start = time.perf_counter()
        out: dict[str, list[torch.Tensor]] = {o.name: [] for o in self.objectives}
        want_tokens = self.spec.token_values
        tokens = [o for o in self.objectives if want_tokens and hasattr(o, "score_tokens")]
        out |= {token_key(o.name): [] for o in tokens}
        for lo in range(0, len(rollouts), self.spec.batch_size):
            batch = rollouts[lo : lo + self.spec.batch_size]
            for o in self.objectives:
                if isinstance(o, GuardedObjective):
                    values, per_token = o.score_batch(batch, want_tokens)
                    out[o.name].append(values)
                    if per_token is not None:
                        out.setdefault(token_key(o.name), []).append(per_token)
                else:
                    out[o.name].append(o.score(batch))
            for o in tokens:
                out[token_key(o.name)].append(o.score_tokens(batch))
            for bundle in self.bundles:
                prompts = [r.prompt.chat() for r in batch]
                for name, values in bundle.score(prompts, [r.response_text for r in batch]).items():
                    out.setdefault(name, []).append(values.float())
            self.stats["batches"] += 1
        self.stats["rollouts"] += len(rollouts)
        self.stats["score_s"] += time.perf_counter() - start
        empty = torch.zeros(0, dtype=torch.float32)
        answer = {k: torch.cat(v) if v else empty for k, v in out.items()}
        guarded = [o for o in self.objectives if isinstance(o, GuardedObjective)]
        failures = {f.objective: f.message() for o in guarded if (f := o.take_first_failure())}
        if failures:
            answer[FAILURES_KEY] = failures
        return answer

    def get_stats(self) -> dict:
        return dict(self.stats, replica=self.replica)
