"""Trajectory objectives (actors/reward/trajectory_rules.py) and env/* metrics (cluster/run/evaluation.py)."""

import pytest
import torch

from troupe.actors.protocol import Prompt, Rollout
from troupe.actors.reward.aggregation import split_tokens
from troupe.actors.reward.rules import RULES
from troupe.cluster.run.evaluation import env_stats


def _trajectory(turn_ends=(2, 6), turn_rewards=(0.5, 1.0), **counts):
    n = 8
    mask = tuple(0 if 3 <= i <= 4 else 1 for i in range(n))
    return Rollout(
        Prompt("p", (1,), "q"), 0, tuple(range(10, 10 + n)), "a", torch.zeros(n), 0, "stop", 1.0,
        loss_mask=mask, turn_ends=turn_ends, turn_rewards=turn_rewards,
        env_counts=tuple(sorted({"turns": len(turn_ends), **counts}.items())),
    )  # fmt: skip


def test_env_reward_sums_turn_rewards_and_places_them_on_turn_ends():
    plain = Rollout(Prompt("p", (1,), "q"), 1, (5, 6), "a", torch.zeros(2), 0, "stop", 1.0)
    rollouts = [_trajectory(), plain]
    env = RULES["env"]()
    assert env.score(rollouts).tolist() == [1.5, 0.0]
    first, second = split_tokens(env.score_tokens(rollouts), rollouts)
    assert first.tolist() == [0, 0, 0.5, 0, 0, 0, 1.0, 0] and second.tolist() == [0, 0]
    assert float(first.sum()) == float(env.score(rollouts)[0])  # the token channel sums to the value


@pytest.mark.parametrize(
    "counts, value",
    [({}, 1.0), ({"tool_calls": 4}, 1.0), ({"tool_calls": 4, "tool_errors": 1}, 0.75),
     ({"tool_errors": 1, "malformed": 1}, 0.0), ({"tool_calls": 1, "tool_errors": 1, "malformed": 1}, 0.5)],
)  # fmt: skip
def test_tool_validity_is_the_share_of_calls_that_ran(counts, value):
    assert RULES["tool_validity"]().score([_trajectory(**counts)]).tolist() == [value]
    assert RULES["tool_validity"](no_call=0.0).score([_trajectory()]).tolist() == [0.0]


def test_turns_favour_fewer_round_trips():
    one, two = _trajectory(turn_ends=(6,), turn_rewards=(0.0,)), _trajectory()
    assert RULES["turns"](max_turns=3).score([one, two]).tolist() == [1.0, 0.5]


def test_env_stats_over_every_trajectory():
    rollouts = [
        _trajectory(tool_calls=2, tool_errors=1, **{"ended/done": 1}),
        _trajectory(**{"ended/timeout": 1}),
    ]
    stats = env_stats(rollouts)
    assert stats == {
        "env/turns": 2.0, "env/tool_calls": 1.0, "env/tool_call_rate": 0.5, "env/tool_errors": 0.5,
        "env/ended/done": 0.5, "env/ended/timeout": 0.5,
    }  # fmt: skip
    plain = Rollout(Prompt("p", (1,), "q"), 1, (5, 6), "a", torch.zeros(2), 0, "stop", 1.0)
    assert env_stats([plain]) == {}


def test_env_stats_measure_the_staleness_of_each_span():
    from dataclasses import replace

    partial = replace(_trajectory(), versions=(2, 2, 3, -1, -1, 3, 3, 3))  # one turn straddled a sync
    whole = replace(_trajectory(), versions=(3, 3, 3, -1, -1, 3, 3, 3))
    stats = env_stats([partial, whole], version=4)
    assert stats["env/token_lag"] == pytest.approx((2 + 2 + 1 * 4 + 1 * 6) / 12)
    assert stats["env/partial_frac"] == 0.5
    assert "env/token_lag" not in env_stats([partial, whole])


def test_a_judge_sees_the_whole_conversation_before_the_last_reply():
    from dataclasses import replace

    from troupe.actors.reward.judge import question_of

    single = Rollout(Prompt("p", (1,), "Write a poem."), 0, (5,), "a", torch.zeros(1), 0, "stop", 1.0)
    assert question_of(single) == "Write a poem."
    conversation = (
        ("assistant", "Roses are red."),
        ("user", "Now make it rhyme."),
        ("assistant", "Red, said."),
    )
    multi = replace(single, conversation=conversation)
    assert (
        question_of(multi) == "User: Write a poem.\n\nAssistant: Roses are red.\n\nUser: Now make it rhyme."
    )


def test_the_table_shows_tool_calls_errors_and_turns_for_multi_turn_runs():
    from troupe.cluster.observe.metrics import rl_columns

    keys = [key for _, key, _ in rl_columns(["correctness"], True, "sampled", env=True)]
    assert {"env/tool_call_rate", "env/tool_errors", "env/turns"} <= set(keys)
    assert not any(k.startswith("env/") for _, k, _ in rl_columns(["correctness"], True, "sampled"))


def test_rollouts_jsonl_keeps_a_trajectorys_conversation_and_counts():
    from dataclasses import replace

    from troupe.actors.protocol import RewardBreakdown, ScoredRollout
    from troupe.cluster.observe.rollouts import sample_rows

    t = replace(
        _trajectory(tool_calls=1),
        conversation=(("assistant", "<tool_call>"), ("tool", "6"), ("assistant", "6")),
    )
    plain = Rollout(Prompt("q", (1,), "q"), 0, (5, 6), "a", torch.zeros(2), 0, "stop", 1.0)
    rows = sample_rows(
        0,
        [ScoredRollout(t, RewardBreakdown(1.0, {})), ScoredRollout(plain, RewardBreakdown(0.0, {}))],
        None,
        1.0,
    )
    assert rows[0]["conversation"][1] == {"role": "tool", "content": "6"}
    assert rows[0]["env"] == {"turns": 2, "tool_calls": 1} and rows[0]["length"] == 6  # the tokens it wrote
    assert "conversation" not in rows[1] and rows[1]["length"] == 2
