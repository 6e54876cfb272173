"""Dynamic sampling's batch (cluster/run/dynamic_sampling.py): zero-variance groups left out, refills until the
batch has its informative groups or the draw budget is spent, surplus and riders accounted."""

import torch

from troupe.actors.protocol import Prompt, RewardBreakdown, Rollout, ScoredRollout
from troupe.cluster.run.dynamic_sampling import (
    SURPLUS,
    ZERO_VARIANCE,
    drawn_means,
    fill_batch,
    group_reasons,
    needs_more,
)
from troupe.cluster.run.shaping import OverlongShaping

N = 2  # samples per prompt


def _group(uid, *rewards, dropped=""):
    return [
        ScoredRollout(
            Rollout(Prompt(uid, (1,), "q"), i, (5,), "r", torch.zeros(1), 0, "stop", 1.0),
            RewardBreakdown(r, {"x": r}, dropped=dropped),
        )
        for i, r in enumerate(rewards)
    ]


def test_groups_are_informative_zero_variance_or_already_dropped():
    scored = _group("a", 1.0, 0.0) + _group("b", 0.0, 0.0) + _group("c", 0.0, 1.0, dropped="reward_error")
    assert group_reasons(scored, N) == ["", ZERO_VARIANCE, "reward_error"]


def test_the_batch_takes_the_first_informative_groups_and_leaves_the_rest_out_with_reasons():
    rounds = [_group("a", 0.0, 0.0) + _group("b", 1.0, 0.0), _group("c", 0.0, 1.0) + _group("d", 1.0, 0.5)]
    filled = fill_batch(rounds, groups=2, n=N)
    assert [s.rollout.prompt.uid for s in filled.scored[::N]] == ["b", "c"]
    assert not any(s.reward.dropped for s in filled.scored)
    assert filled.left_out == {ZERO_VARIANCE: 1, SURPLUS: 1}
    assert filled.stats == {"dynamic/refills": 1, "dynamic/prompts_drawn": 4, "dynamic/informative_groups": 3,
                            "dynamic/filled_frac": 1.0,
                            # every drawn rollout: 0 0 1 0 | 0 1 1 0.5, not only the batch's b and c
                            "dynamic/drawn/reward": 3.5 / 8, "dynamic/drawn/x": 3.5 / 8}  # fmt: skip


def test_short_of_informative_groups_left_out_ones_ride_along_without_a_loss():
    rounds = [_group("a", 0.0, 0.0) + _group("b", 1.0, 1.0), _group("c", 0.0, 0.0) + _group("d", 1.0, 0.0)]
    filled = fill_batch(rounds, groups=2, n=N)
    assert [s.rollout.prompt.uid for s in filled.scored[::N]] == ["a", "d"]  # draw order kept
    assert [s.reward.dropped for s in filled.scored] == [ZERO_VARIANCE] * 2 + [""] * 2
    assert all(s.reward.scalar == 0.0 for s in filled.scored[:2])
    assert filled.left_out == {ZERO_VARIANCE: 2}
    assert filled.stats["dynamic/filled_frac"] == 0.5
    drawn = 4
    in_batch = len(filled.scored) // N
    assert in_batch + sum(filled.left_out.values()) == drawn  # every drawn group is somewhere


def test_refills_stop_when_the_batch_is_full_or_the_budget_is_spent():
    poor, rich = _group("a", 0.0, 0.0) + _group("b", 0.0, 0.0), _group("c", 1.0, 0.0) + _group("d", 0.0, 1.0)
    assert needs_more([poor], groups=2, n=N, max_rounds=3)
    assert needs_more([poor, poor], groups=2, n=N, max_rounds=3)
    assert not needs_more([poor, poor, poor], groups=2, n=N, max_rounds=3)
    assert not needs_more([poor, rich], groups=2, n=N, max_rounds=3)


def _lengths(uid, reward, *lengths):
    return [
        ScoredRollout(
            Rollout(Prompt(uid, (1,), "q"), i, (5,) * k, "r", torch.zeros(k), 0, "stop", 1.0),
            RewardBreakdown(reward, {"x": reward}),
        )
        for i, k in enumerate(lengths)
    ]


def test_the_variance_test_sees_the_reward_before_or_after_the_overlong_penalty():
    shaping = OverlongShaping(max_tokens=8, buffer_tokens=4, penalty=1.0)
    # a: all wrong, one reply cut at 8 tokens (shaped -1 vs -2); b: all wrong, same length; c: right (7 tokens,
    # shaped 1 - 0.75) and wrong
    raw = _lengths("a", -1.0, 3, 8) + _lengths("b", -1.0, 3, 3) + _lengths("c", -1.0, 3, 7)
    raw[-1] = ScoredRollout(raw[-1].rollout, RewardBreakdown(1.0, {"x": 1.0}))
    shaped = shaping.apply(raw)
    assert group_reasons(shaped, N) == ["", ZERO_VARIANCE, ""]  # the cut reply makes group a vary
    on_reward = fill_batch([shaped], groups=2, n=N, judged=[raw])  # on the reward, only c teaches
    assert [s.rollout.prompt.uid for s in on_reward.scored[::N]] == ["a", "c"]  # a rides along, in draw order
    assert [s.reward.dropped for s in on_reward.scored] == [ZERO_VARIANCE] * 2 + [""] * 2
    assert on_reward.stats["dynamic/informative_groups"] == 1 and on_reward.left_out == {ZERO_VARIANCE: 1}
    assert [s.reward.scalar for s in on_reward.scored[2:]] == [
        -1.0,
        0.25,
    ]  # the batch keeps the shaped rewards
    on_shaped = fill_batch([shaped], groups=2, n=N)
    assert not any(s.reward.dropped for s in on_shaped.scored)
    assert [s.reward.scalar for s in on_shaped.scored[:2]] == [-1.0, -2.0]
    assert on_shaped.stats["dynamic/informative_groups"] == 2 and on_shaped.left_out == {ZERO_VARIANCE: 1}
    assert needs_more([raw], groups=2, n=N, max_rounds=2)
    assert not needs_more([shaped], groups=2, n=N, max_rounds=2)


def test_drawn_means_cover_every_kept_rollout_drawn_and_each_objective():
    kept = [
        ScoredRollout(r.rollout, RewardBreakdown(r.reward.scalar, {"acc": a, "fmt": 0.5}))
        for r, a in zip(_group("a", 1.0, -1.0) + _group("b", -1.0, -1.0), (1.0, 0.0, 0.0, 0.0), strict=True)
    ]
    dropped = _group("c", 9.0, 9.0, dropped="reward_error")
    means = drawn_means(kept + dropped)
    assert means == {"dynamic/drawn/reward": -0.5, "dynamic/drawn/acc": 0.25, "dynamic/drawn/fmt": 0.5}
    assert drawn_means(dropped) == {}
