"""Advantage estimators by name, against hand-computed values; adding one is a registered function."""

import math

import pytest
import torch

from troupe.actors.learner.advantages import ESTIMATORS, AdvantageInputs, estimate, rloo_advantages
from troupe.actors.learner.config import AlgoConfig
from troupe.actors.learner.ppo import masked_whiten


def _inputs(rewards, group_size, width=3):
    """Right-aligned responses of `width` tokens, the sequence reward on the last token."""
    r = torch.tensor(rewards)
    mask = torch.ones(len(r), width)
    token_rewards = torch.zeros(len(r), width)
    token_rewards[:, -1] = r
    return AdvantageInputs(r, token_rewards, mask, group_size)


def test_rloo_subtracts_the_mean_of_the_others():
    adv = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 3.0, 3.0, 0.0]), group_size=3)
    assert torch.allclose(adv, torch.tensor([1.0, -0.5, -0.5, 1.5, 1.5, -3.0]))
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.ones(3), group_size=1)


def test_sequence_estimators_put_one_value_on_every_response_token():
    inputs = _inputs([1.0, 0.0, 0.0, 3.0, 3.0, 0.0], 3)
    adv, returns = estimate(AlgoConfig(estimator="rloo"), inputs)
    assert returns is None and adv.shape == (6, 3)
    assert torch.allclose(adv[:, 0], adv[:, 2]) and adv[0, 0].item() == pytest.approx(1.0)
    grpo, _ = estimate(AlgoConfig(estimator="group", scale_by_std=False), inputs)
    assert grpo[0, 1].item() == pytest.approx(1.0 - 1.0 / 3)


def test_reinforce_pp_returns_whitened_over_the_batch():
    r = [1.0, 2.0, 3.0, 6.0]
    inputs = _inputs(r, 2, width=1)
    adv, returns = estimate(AlgoConfig(estimator="returns", gamma=1.0), inputs)
    assert torch.allclose(returns[:, 0], torch.tensor(r))
    white = masked_whiten(adv, inputs.mask)
    std = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 3)
    assert torch.allclose(white[:, 0], (torch.tensor(r) - 3.0) / std, atol=1e-5)


def test_reinforce_pp_baseline_removes_group_mean_first():
    inputs = _inputs([1.0, 3.0, 10.0, 12.0], 2, width=2)
    adv, _ = estimate(AlgoConfig(estimator="returns", group_baseline=True), inputs)
    # reward-to-go of [0, r - mean]: both tokens carry the centred reward
    assert torch.allclose(adv, torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0], [1.0, 1.0]]))


def test_constant_baseline_estimator_is_one_function_and_one_yaml():
    """REINFORCE with a constant baseline: the trivial estimator added as a function + conf/algo/reinforce.yaml."""
    adv, _ = estimate(
        AlgoConfig(estimator="constant_baseline", estimator_args={"baseline": 0.5}), _inputs([1.0, 0.0], 2)
    )
    assert torch.allclose(adv, torch.tensor([[0.5] * 3, [-0.5] * 3]))
    assert "constant_baseline" in ESTIMATORS


def test_unknown_estimator_names_the_key():
    with pytest.raises(ValueError, match="algo.estimator"):
        estimate(AlgoConfig(estimator="ppo2"), _inputs([1.0, 0.0], 2))


def test_gae_needs_values():
    with pytest.raises(ValueError, match="critic"):
        estimate(AlgoConfig(estimator="gae"), _inputs([1.0, 0.0], 2))


def test_kept_rows_leave_out_rows_without_response_tokens():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    inputs = AdvantageInputs(torch.tensor([1.0, 0.0, 3.0]), torch.zeros(3, 3), mask, 1)
    assert inputs.kept().tolist() == [True, False, True]
    assert float(inputs.rewards[inputs.kept()].mean()) == 2.0  # the dropped row's 0 is not averaged in
