"""GRPO math against hand-computed values."""

import math

import pytest
import torch

from troupe.actors.learner.grpo import clipped_policy_loss, group_advantages, kl_penalty


def test_group_advantages_normalise_within_each_group():
    # group 1: [1, 0, 0, 1] mean .5, unbiased std sqrt(1/3); group 2: [2, 2, 2, 2] -> zeros
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), group_size=4)
    s = math.sqrt(1 / 3)
    assert torch.allclose(adv[:4], torch.tensor([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s]), atol=1e-5)
    assert torch.equal(adv[4:], torch.zeros(4))


def test_group_advantages_without_std_only_centre():
    adv = group_advantages(torch.tensor([3.0, 1.0, 0.0, 4.0]), group_size=2, scale_by_std=False)
    assert torch.allclose(adv, torch.tensor([1.0, -1.0, -2.0, 2.0]))


def test_group_advantages_reject_ragged_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), group_size=4)


def test_clipped_loss_takes_pessimistic_side():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1 against old logp 0
    old = torch.zeros(1, 3)
    loss_pos, clipped_pos = clipped_policy_loss(logp, old, torch.tensor([2.0]), clip_eps=0.2)
    # A>0: min(r*A, clip(r)*A) = [1.2*2, 0.5*2, 1.1*2]
    assert torch.allclose(loss_pos, -torch.tensor([[2.4, 1.0, 2.2]]))
    assert clipped_pos.tolist() == [[1.0, 0.0, 0.0]]
    loss_neg, clipped_neg = clipped_policy_loss(logp, old, torch.tensor([-1.0]), clip_eps=0.2)
    # A<0: min(-r, -clip(r)) = [-1.5, -0.8, -1.1]
    assert torch.allclose(loss_neg, torch.tensor([[1.5, 0.8, 1.1]]))
    assert clipped_neg.tolist() == [[0.0, 1.0, 0.0]]


def test_kl_estimators_hand_values():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    x = math.log(2.0)  # logp - ref
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(x)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * x * x)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + x)  # exp(-x) - 1 + x
    assert kl_penalty(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        kl_penalty(logp, ref, "k4")
