"""Per-batch statistics shared by training and evaluation, the verbosity alarm, and when evaluation runs."""

import logging
import math

import pytest
import torch

from troupe.actors.protocol import Prompt, RewardBreakdown, Rollout, ScoredRollout
from troupe.cluster.config.schema import MonitorConfig
from troupe.cluster.run.evaluation import batch_stats, pearson
from troupe.cluster.run.loop import _length_alarm, eval_due


def scored(n_tokens: int, reward: float, branch: str = "holistic", gate: float = 0.5) -> ScoredRollout:
    prompt = Prompt("p", (1, 2), "q", "1")
    rollout = Rollout(prompt, 0, tuple(range(n_tokens)), "x", torch.zeros(n_tokens), 0, "stop", 1.0)
    return ScoredRollout(rollout, RewardBreakdown(reward, {"armo": reward, "gate/help": gate}, branch=branch))


def test_batch_stats_report_branch_rates_gates_and_the_length_correlation():
    batch = [scored(10, 0.1), scored(20, 0.2, "holistic+aspects", 0.7), scored(30, 0.3), scored(40, 0.4)]
    stats = batch_stats(batch)
    assert stats["branch/holistic"] == 0.75 and stats["branch/holistic+aspects"] == 0.25
    assert stats["objective/gate/help"] == pytest.approx(0.55)
    assert stats["reward/length_corr"] == pytest.approx(1.0)  # reward grows exactly with length
    assert stats["response_tokens/mean"] == 25.0
    flipped = batch_stats([scored(10, 0.4), scored(20, 0.3), scored(30, 0.2), scored(40, 0.1)])
    assert flipped["reward/length_corr"] == pytest.approx(-1.0)
    assert math.isnan(pearson(torch.ones(3), torch.arange(3.0)))  # constant reward: no evidence either way


def test_weighted_sum_batches_have_no_branch_columns():
    stats = batch_stats([scored(5, 1.0, "weighted_sum"), scored(6, 0.0, "weighted_sum")])
    assert not any(k.startswith("branch/") for k in stats)


def test_verbosity_alarm_warns_and_sets_the_metric_over_the_threshold(caplog):
    record = {"iteration": 3, "reward/length_corr": 0.8}
    with caplog.at_level(logging.WARNING, logger="troupe.loop"):
        _length_alarm(record, MonitorConfig(length_corr_max=0.5))
    assert record["monitor/length_alarm"] == 1 and "0.80" in caplog.text and "iteration 3" in caplog.text
    quiet = {"iteration": 4, "reward/length_corr": 0.3}
    _length_alarm(quiet, MonitorConfig(length_corr_max=0.5))
    assert quiet["monitor/length_alarm"] == 0
    undefined = {"iteration": 5, "reward/length_corr": float("nan")}
    _length_alarm(undefined, MonitorConfig(length_corr_max=0.5))
    assert undefined["monitor/length_alarm"] == 0


def test_evaluation_runs_every_n_iterations_and_after_the_last():
    assert [i for i in range(10) if eval_due(i, 10, 4)] == [3, 7, 9]
    assert [i for i in range(5) if eval_due(i, 5, 0)] == [4]
