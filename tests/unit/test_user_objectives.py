"""Plug-in objectives behind the guard (actors/reward/objective.py) and reward.on_error in the score phase
(cluster/run/scoring.py): failures are per sample, counted, and dropped groups are accounted for."""

import asyncio
import math
import textwrap
import time

import pytest
import torch

from troupe.actors.learner.batch import from_scored
from troupe.actors.plugins import PluginError
from troupe.actors.protocol import Prompt, Rollout
from troupe.actors.reward.aggregation import WeightedSum, token_key
from troupe.actors.reward.alarm import HierarchyAggregation, Normalizer
from troupe.actors.reward.objective import BatchFailed, GuardedObjective, load_plugin, resolve_target
from troupe.actors.reward.shard import FAILURES_KEY, RewardShard, ShardSpec
from troupe.cluster.run.scoring import DROP_REASON, ErrorPolicy, ObjectiveFailed, score_batch


def _rollouts(n_prompts=3, n=2, text="Answer: 7"):
    out = []
    for p in range(n_prompts):
        prompt = Prompt(f"p{p}", (1, 2), "q", "7", meta=(("level", "2"),), messages=(("user", "q"),))
        for k in range(n):
            ids = tuple(range(3 + k))
            out.append(Rollout(prompt, k, ids, f"{p}.{k} {text}", torch.zeros(len(ids)), 0, "stop", 1.0))
    return out


def every_third_fails(samples):
    values = []
    for s in samples:
        p, k = (int(x) for x in s.response.split()[0].split("."))
        if (2 * p + k) % 3 == 2:
            raise RuntimeError(f"cannot score {s.uid}")
        values.append(float(len(s.response_ids)))
    return values


def test_a_failing_sample_is_nan_alone_and_its_first_traceback_kept():
    guarded = GuardedObjective("mine", every_third_fails, timeout_s=10)
    values, _ = guarded.score_batch(_rollouts(), tokens=False)
    failed = [i for i, v in enumerate(values.tolist()) if math.isnan(v)]
    assert failed == [2, 5]  # the samples with (2p + k) % 3 == 2, found by retrying one by one
    assert values[0] == 3.0 and values[1] == 4.0
    first = guarded.take_first_failure()
    assert first.sample == "p1#0" and first.reason == "error" and "cannot score p1#0" in first.detail
    assert guarded.take_first_failure() is None  # reported once
    assert guarded.failures == 2


def test_timeouts_invalid_values_and_wrong_counts_fail_the_samples():
    def slow(samples):
        time.sleep(5)
        return [1.0] * len(samples)

    start = time.perf_counter()
    values, _ = GuardedObjective("slow", slow, timeout_s=0.2).score_batch(_rollouts(1), tokens=False)
    assert time.perf_counter() - start < 2 and torch.isnan(values).all()

    invalid = GuardedObjective("bad", lambda s: [float("inf"), "x"], timeout_s=5)
    assert torch.isnan(invalid.score_batch(_rollouts(1), tokens=False)[0]).all()
    assert invalid.take_first_failure().reason == "invalid"

    short = GuardedObjective("short", lambda s: [1.0], timeout_s=5)  # one value for two samples, then 1 for 1
    assert short.score_batch(_rollouts(1), tokens=False)[0].tolist() == [1.0, 1.0]


def test_batch_failed_marks_every_sample_without_retrying_each():
    calls = []

    def down(samples):
        calls.append(len(samples))
        raise BatchFailed("service down")

    values, _ = GuardedObjective("remote", down, timeout_s=5).score_batch(_rollouts(), tokens=False)
    assert torch.isnan(values).all() and calls == [6]


def test_async_functions_classes_and_per_token_values(tmp_path):
    async def polite(samples, bonus=0.0):
        await asyncio.sleep(0)
        return [1.0 + bonus if "7" in s.response else 0.0 for s in samples]

    values, tokens = GuardedObjective("polite", lambda s: polite(s, 0.5), 5).score_batch(_rollouts(1), True)
    assert values.tolist() == [1.5, 1.5]
    assert tokens.tolist() == [0, 0, 1.5, 0, 0, 0, 1.5]  # a scalar sits on the last token

    plugin = tmp_path / "my_rewards.py"
    plugin.write_text(
        textwrap.dedent(
            """
            class PerToken:
                def __init__(self, scale):
                    self.scale = scale
                def __call__(self, samples):
                    return [[self.scale] * len(s.response_ids) for s in samples]
            """
        )
    )
    call = load_plugin("tok", {"target": f"{plugin}:PerToken", "scale": 0.25, "on_error": "zero"})
    values, tokens = GuardedObjective("tok", call, 5).score_batch(_rollouts(1), True)
    assert values.tolist() == [0.75, 1.0] and tokens.tolist() == [0.25] * 7
    assert resolve_target(f"{plugin}:PerToken", "k") == ("my_rewards:PerToken", str(plugin))
    with pytest.raises(PluginError, match="no such file"):
        resolve_target("/nowhere/x.py:f", "reward.objectives.x.target")
    with pytest.raises(PluginError, match="does not take"):
        load_plugin("tok", {"target": f"{plugin}:PerToken", "size": 1})


def test_the_shard_hosts_plugins_beside_rules_and_reports_failures_once():
    shard = RewardShard(
        ShardSpec(
            {"correctness": {}, "mine": {"target": "tests.unit.test_user_objectives:every_third_fails"}},
            batch_size=4,
            token_values=True,
        )
    )
    out = shard.score(_rollouts())
    assert out["correctness"].tolist() == [1.0] * 6
    assert torch.isnan(out["mine"]).tolist() == [False, False, True, False, False, True]
    assert out[token_key("mine")].shape == (sum(3 + k for _ in range(3) for k in range(2)),)
    assert "p1#0" in out[FAILURES_KEY]["mine"]
    assert FAILURES_KEY not in shard.score(_rollouts())  # the first failure is reported once


def _values(rollouts, failed_at=()):
    mine = torch.arange(len(rollouts), dtype=torch.float32)
    mine[list(failed_at)] = math.nan
    return {"correctness": torch.ones(len(rollouts)), "mine": mine}


def test_drop_leaves_out_whole_prompt_groups_and_counts_them():
    rollouts = _rollouts(3, 2)
    result = score_batch(rollouts, _values(rollouts, [3]), WeightedSum({"mine": 1.0}), ErrorPolicy("drop"), 2)
    assert [s.reward.dropped for s in result.scored] == ["", "", DROP_REASON, DROP_REASON, "", ""]
    assert result.errors == {"correctness": 0, "mine": 1} and result.dropped_prompts == 1
    assert [s.reward.scalar for s in result.kept] == [0.0, 1.0, 4.0, 5.0]
    assert (
        result.metrics()["reward/errors/mine"] == 1
        and result.metrics()["samples_dropped"] == 2
        and result.metrics()["reward/errors_total"] == 1
    )
    batch = from_scored(result.scored, 0, 2)  # the learner sees no response token of the dropped group
    assert batch.action_mask[2:4].sum() == 0 and batch.action_mask[[0, 1, 4, 5]].sum() > 0
    assert batch.rewards[2:4].tolist() == [0.0, 0.0]


def test_zero_and_fail_policies_and_per_objective_overrides():
    rollouts = _rollouts(2, 2)
    zero = score_batch(rollouts, _values(rollouts, [1]), WeightedSum({"mine": 1.0}), ErrorPolicy("zero"))
    assert not any(s.reward.dropped for s in zero.scored)
    assert [s.reward.scalar for s in zero.scored] == [0.0, 0.0, 2.0, 3.0]
    with pytest.raises(ObjectiveFailed, match="'mine' failed on 1 of 4"):
        score_batch(rollouts, _values(rollouts, [1]), WeightedSum({"mine": 1.0}), ErrorPolicy("fail"))
    own = ErrorPolicy("fail", {"mine": "zero"})
    assert score_batch(rollouts, _values(rollouts, [1]), WeightedSum({"mine": 1.0}), own).errors["mine"] == 1


def test_failures_never_reach_the_normaliser():
    rollouts = _rollouts(2, 2)
    values = _values(rollouts, [0])
    agg = HierarchyAggregation("mine", {}, normalizer=Normalizer(warmup_samples=100))
    result = score_batch(rollouts, values, agg, ErrorPolicy("drop"), 2)
    assert agg.normalizer.count == 2  # the kept group (values 2, 3) only
    assert agg.normalizer.mean == pytest.approx(2.5)
    assert all(not math.isnan(s.reward.scalar) for s in result.scored)


def test_everything_dropped_gives_an_empty_kept_set():
    rollouts = _rollouts(1, 2)
    result = score_batch(rollouts, _values(rollouts, [0]), WeightedSum({"mine": 1.0}), group_size=2)
    assert result.kept == [] and result.dropped_prompts == 1


def test_groups_are_told_apart_by_position_not_prompt_id():
    rollouts = _rollouts(1, 2) * 2  # one prompt served twice in a batch (e.g. across an epoch boundary)
    result = score_batch(rollouts, _values(rollouts, [0, 3]), WeightedSum({"mine": 1.0}), group_size=2)
    assert result.dropped_prompts == 2 and result.kept == []
    result = score_batch(rollouts, _values(rollouts, [0]), WeightedSum({"mine": 1.0}), group_size=2)
    assert result.dropped_prompts == 1 and len(result.kept) == 2
    with pytest.raises(ValueError, match="groups of 3"):
        score_batch(rollouts, _values(rollouts), WeightedSum({"mine": 1.0}), group_size=3)


def test_the_one_by_one_retry_shares_one_timeout_and_a_hung_call_gets_no_second_thread():
    calls = []

    def slow_when_alone(samples):
        calls.append(len(samples))
        if len(samples) > 1:
            raise RuntimeError("batch refused")
        time.sleep(0.3)
        return [1.0]

    guarded = GuardedObjective("slow", slow_when_alone, timeout_s=0.5)
    start = time.perf_counter()
    values, _ = guarded.score_batch(_rollouts(4, 2), tokens=False)  # 8 samples x 0.3 s > one 0.5 s timeout
    assert time.perf_counter() - start < 2.0
    assert int(torch.isnan(values).sum()) >= 6
    calls.clear()
    values, _ = guarded.score_batch(_rollouts(1), tokens=False)  # a call may still run: none is started
    if guarded.overrunning and any(t.is_alive() for t in guarded.overrunning):
        assert calls == [] and torch.isnan(values).all()


def test_none_means_the_objective_does_not_apply():
    values, _ = GuardedObjective("maybe", lambda s: [None, 1.0], 5).score_batch(_rollouts(1), tokens=False)
    assert values.tolist() == [0.0, 1.0]
