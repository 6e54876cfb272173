"""ALaRM's aspect selection inside training (reward.hierarchy.select=consistency): the candidate aspects are
judged on the warm-up samples of the policy itself. For each aspect, the agreement rate is the share of sampled
response pairs of the same prompt that it orders as the holistic reward does (ties skipped; `consistency_rates`);
aspects at or above `min_agreement` are kept, the others get no weight for the rest of the run.

The warm-up is the first `warmup_samples` training samples, at least one batch. Batches scored before the decision
(a warm-up longer than one batch) use every candidate. The decision, the rates and the number of samples behind
them are part of the aggregation's state: logged in each row (hierarchy/agreement/<aspect>,
hierarchy/selected/<aspect>), saved in checkpoints and in checkpoint-final/troupe_state.json, which a resume and
`troupe rm serve` load, so neither decides again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from troupe.actors.protocol import Rollout
from troupe.actors.reward.alarm import consistency_rates, select_aspects

log = logging.getLogger("troupe.reward")


@dataclass
class AspectSelection:
    candidates: dict[str, float]  # {aspect: weight} as configured
    min_agreement: float
    warmup_samples: int = 0
    n_pairs: int = 2000
    seed: int = 0
    holistic: list[float] = field(default_factory=list, init=False)
    aspects: dict[str, list[float]] = field(default_factory=dict, init=False)
    groups: list[str] = field(default_factory=list, init=False)
    chosen: list[str] | None = field(default=None, init=False)
    agreement: dict[str, float] = field(default_factory=dict, init=False)

    @property
    def done(self) -> bool:
        return self.chosen is not None

    def weights(self) -> dict[str, float]:
        """The aspect weights in force: every candidate until the decision, then the chosen ones."""
        if self.chosen is None:
            return dict(self.candidates)
        return {name: w for name, w in self.candidates.items() if name in self.chosen}

    def observe(
        self, holistic: torch.Tensor, values: Mapping[str, torch.Tensor], rollouts: Sequence[Rollout]
    ) -> None:
        """Add a batch of warm-up samples; decide once there are `warmup_samples` of them (or after this batch)."""
        if self.done:
            return
        self.holistic += holistic.float().tolist()
        for name in self.candidates:
            self.aspects.setdefault(name, []).extend(values[name].float().tolist())
        self.groups += [r.prompt.uid for r in rollouts]
        if len(self.holistic) >= self.warmup_samples:
            self.decide()

    def decide(self) -> None:
        ids = {uid: k for k, uid in enumerate(dict.fromkeys(self.groups))}
        rates = consistency_rates(
            torch.tensor(self.holistic),
            {name: torch.tensor(v) for name, v in self.aspects.items()},
            n_pairs=self.n_pairs,
            seed=self.seed,
            groups=[ids[g] for g in self.groups],
        )
        self.agreement = rates
        self.chosen = select_aspects(rates, self.min_agreement)
        log.warning(
            "ALaRM aspect selection on %d warm-up samples: agreement with the holistic reward %s; kept %s (at or "
            "above %.2f), dropped %s",
            len(self.holistic),
            {k: round(v, 3) for k, v in rates.items()},
            self.chosen,
            self.min_agreement,
            sorted(set(self.candidates) - set(self.chosen)),
        )
        self.holistic, self.aspects, self.groups = [], {}, []  # the decision is all that is kept

    def metrics(self) -> dict:
        if not self.done:
            return {}
        out = {f"hierarchy/agreement/{k}": v for k, v in self.agreement.items()}
        out |= {f"hierarchy/selected/{k}": int(k in self.chosen) for k in self.candidates}
        return out

    def state_dict(self) -> dict:
        return {"chosen": self.chosen, "agreement": dict(self.agreement), "min_agreement": self.min_agreement}

    def load_state_dict(self, state: dict) -> None:
        if state.get("chosen") is None:  # saved before the decision: the warm-up starts again
            self.chosen, self.agreement, self.holistic, self.aspects, self.groups = None, {}, [], {}, []
            return
        unknown = sorted(set(state["chosen"]) - set(self.candidates))
        if unknown:
            raise ValueError(
                f"saved aspect selection chose {unknown}, which are not among reward.hierarchy.aspects "
                f"{sorted(self.candidates)}"
            )
        self.chosen, self.agreement = list(state["chosen"]), dict(state.get("agreement", {}))
