"""Instruction-following rule objectives built on the IFEval checkers (actors/reward/ifeval_checks.py).

`ifeval`: per prompt, the instructions stored in the dataset row (meta keys `instruction_id_list` and `kwargs`,
listed in `data.meta_keys`); the value is the share of them the reply follows (IFEval's strict
instruction-level accuracy).
`instructions`: the same checks fixed in the config for every prompt, e.g. an ALaRM aspect "under 120 words, no
commas" on any dataset: {"checks": [{"id": "length_constraints:number_words", "relation": "less than",
"num_words": 120}, {"id": "punctuation:no_comma"}]}.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import torch

from troupe.actors.protocol import Rollout
from troupe.actors.reward.ifeval_checks import CHECKS, build_check

log = logging.getLogger("troupe.reward")


class IFEval:
    """Share of the prompt's own IFEval instructions that the reply follows.

    An instruction id without a checker here (e.g. language:response_language) is skipped: counted in
    `unsupported` and logged once per id. A prompt none of whose instructions is supported scores 0.0 and is
    counted in `unscorable`: a constant for all samples of that prompt, so group-relative advantages (GRPO,
    RLOO) get no signal from it, and a rising 0.0 share in logs shows the data does not fit. A prompt with no
    instruction list at all is a configuration error and raises.
    """

    name = "ifeval"

    def __init__(self) -> None:
        self.unsupported: Counter[str] = Counter()  # instruction id -> times skipped
        self.unscorable = 0  # rollouts whose prompt had no supported instruction

    def _checks(self, r: Rollout) -> list[Callable[[str], bool]]:
        uid = r.prompt.uid
        ids = r.prompt.meta_value("instruction_id_list")
        kwargs = r.prompt.meta_value("kwargs")
        if not ids or not isinstance(ids, list):
            raise ValueError(
                f"objective 'ifeval': prompt {uid} has no instruction_id_list metadata "
                f"(add 'instruction_id_list' and 'kwargs' to data.meta_keys), got {ids!r}"
            )
        if not isinstance(kwargs, list) or len(kwargs) != len(ids):
            raise ValueError(
                f"objective 'ifeval': prompt {uid} needs a 'kwargs' list aligned with its {len(ids)} "
                f"instruction ids, got {kwargs!r}"
            )
        checks = []
        for instruction_id, kw in zip(ids, kwargs, strict=True):
            if instruction_id not in CHECKS:
                if instruction_id not in self.unsupported:
                    log.warning("objective 'ifeval': skipping unsupported instruction %r", instruction_id)
                self.unsupported[instruction_id] += 1
                continue
            try:
                checks.append(build_check(instruction_id, kw))
            except ValueError as e:
                raise ValueError(f"objective 'ifeval': prompt {uid}: {e}") from e
        return checks

    def score(self, rollouts: Sequence[Rollout]) -> torch.Tensor:
        values = []
        for r in rollouts:
            checks = self._checks(r)
            if not checks:
                self.unscorable += 1
                values.append(0.0)
                continue
            values.append(sum(check(r.response_text) for check in checks) / len(checks))
        return torch.tensor(values, dtype=torch.float32)


class Instructions:
    """Share of the configured instruction checks that the reply follows, the same checks for every prompt."""

    name = "instructions"

    def __init__(self, checks: Sequence[Mapping]) -> None:
        if isinstance(checks, str) or not isinstance(checks, Sequence) or not checks:
            raise ValueError(
                f"objective 'instructions': 'checks' must be a non-empty list of {{'id': ..., kwargs}}, "
                f"got {checks!r}"
            )
        self.ids: list[str] = []
        self._checks: list[Callable[[str], bool]] = []
        for i, entry in enumerate(checks):
            if not isinstance(entry, Mapping) or "id" not in entry:
                raise ValueError(f"objective 'instructions': checks[{i}] needs an 'id' key, got {entry!r}")
            kwargs = {k: v for k, v in entry.items() if k != "id"}
            try:
                self._checks.append(build_check(entry["id"], kwargs))
            except ValueError as e:
                raise ValueError(f"objective 'instructions': checks[{i}]: {e}") from e
            self.ids.append(entry["id"])

    def score(self, rollouts: Sequence[Rollout]) -> torch.Tensor:
        return torch.tensor(
            [sum(c(r.response_text) for c in self._checks) / len(self._checks) for r in rollouts],
            dtype=torch.float32,
        )
