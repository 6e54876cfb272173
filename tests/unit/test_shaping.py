"""DAPO's soft overlong punishment on training rewards (cluster/run/shaping.py) and the truncation objective
(actors/reward/rules.py), against hand-computed values."""

import pytest
import torch

from troupe.actors.protocol import Prompt, RewardBreakdown, Rollout, ScoredRollout
from troupe.actors.reward.rules import RULES
from troupe.cluster.run.shaping import OverlongShaping


def _scored(n_tokens, scalar=1.0, tokens=None, dropped="", finish="stop"):
    rollout = Rollout(
        Prompt("p", (1,), "q"), 0, tuple(range(n_tokens)), "r", torch.zeros(n_tokens), 0, finish, 1.0
    )
    return ScoredRollout(
        rollout, RewardBreakdown(scalar, {"x": scalar}, token_rewards=tokens, dropped=dropped)
    )


def test_the_penalty_ramps_over_the_buffer_before_max_new_tokens():
    shaping = OverlongShaping(max_tokens=16, buffer_tokens=4, penalty=0.5)
    assert [shaping.term(n) for n in (1, 12, 13, 14, 16)] == [0.0, 0.0, -0.125, -0.25, -0.5]
    assert OverlongShaping(16, 0, 1.0).term(16) == 0.0  # off


def test_apply_shapes_kept_rewards_and_their_last_token_and_reports_it():
    shaping = OverlongShaping(max_tokens=16, buffer_tokens=4, penalty=1.0)
    batch = [
        _scored(8),
        _scored(16, finish="length"),
        _scored(14, scalar=0.5, tokens=(0.25,) * 2),
        _scored(16, dropped="reward_error"),
    ]
    shaped, stats = shaping.apply(batch), shaping.metrics(batch)
    assert [s.reward.scalar for s in shaped] == [1.0, 0.0, 0.0, 1.0]  # the dropped one is untouched
    assert shaped[2].reward.token_rewards == (0.25, -0.25)  # still sums to the scalar
    assert shaped[1].reward.objectives == {"x": 1.0}  # the objectives are what the shards said
    assert stats["reward/overlong/mean"] == pytest.approx(-0.5) and stats[
        "reward/overlong/frac"
    ] == pytest.approx(2 / 3)


def test_shaping_off_changes_nothing_and_reports_nothing():
    batch = [_scored(16, finish="length")]
    shaping = OverlongShaping(16, 0, 1.0)
    shaped, stats = shaping.apply(batch), shaping.metrics(batch)
    assert shaped == batch and stats == {}


def test_truncation_objective_is_zero_for_replies_cut_at_the_limit():
    values = RULES["truncation"]().score([_scored(16, finish="length").rollout, _scored(3).rollout])
    assert values.tolist() == [0.0, 1.0]
