"""DAPO's soft overlong punishment, added to the scalar reward after the aggregation (weighted sum or ALaRM
hierarchy), so a reply drifting towards `generator.max_new_tokens` costs something whatever the hierarchy's
gates decide. With L = max_new_tokens and B = reward.overlong.buffer_tokens, a reply of n tokens gets

    0                              n <= L - B
    -penalty * (n - (L - B)) / B   L - B < n <= L   (a reply cut at L: -penalty)

(Yu et al. 2025, DAPO eq. 13; verl's `overlong_buffer`, OpenRLHF's length penalty). The term goes on the last
response token of a token-level reward too, so its tokens still sum to the scalar. Training batches only:
evaluation reports the unshaped reward."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from troupe.actors.protocol import ScoredRollout


@dataclass(frozen=True)
class OverlongShaping:
    max_tokens: int  # generator.max_new_tokens
    buffer_tokens: int  # 0: off
    penalty: float

    def term(self, n_tokens: int) -> float:
        if self.buffer_tokens <= 0:
            return 0.0
        over = n_tokens - (self.max_tokens - self.buffer_tokens)
        return -self.penalty * min(max(over, 0) / self.buffer_tokens, 1.0)

    def apply(self, scored: Sequence[ScoredRollout]) -> list[ScoredRollout]:
        """The rollouts with the term added to the rewards of kept ones."""
        out = []
        for s in scored:
            term = 0.0 if s.reward.dropped else self.term(len(s.rollout.response_ids))
            if term:
                tokens = s.reward.token_rewards
                if tokens:
                    tokens = (*tokens[:-1], tokens[-1] + term)
                s = replace(s, reward=replace(s.reward, scalar=s.reward.scalar + term, token_rewards=tokens))
            out.append(s)
        return out

    def metrics(self, scored: Sequence[ScoredRollout]) -> dict:
        """The mean term and the share of penalised replies over the kept rollouts (none when off)."""
        terms = [self.term(len(s.rollout.response_ids)) for s in scored if not s.reward.dropped]
        if self.buffer_tokens <= 0 or not terms:
            return {}
        return {
            "reward/overlong/mean": sum(terms) / len(terms),
            "reward/overlong/frac": sum(t < 0 for t in terms) / len(terms),
        }
