"""GRPO math against hand-computed values."""

import math

import pytest
import torch

from troupe.actors.learner.config import KL_VALUE_CLAMP
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
    loss_pos, clipped_pos, _ = clipped_policy_loss(logp, old, torch.tensor([2.0]), clip_low=0.2)
    # A>0: min(r*A, clip(r)*A) = [1.2*2, 0.5*2, 1.1*2]
    assert torch.allclose(loss_pos, -torch.tensor([[2.4, 1.0, 2.2]]))
    assert clipped_pos.tolist() == [[1.0, 0.0, 0.0]]
    loss_neg, clipped_neg, _ = clipped_policy_loss(logp, old, torch.tensor([-1.0]), clip_low=0.2)
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


def test_clip_higher_lets_positive_advantages_raise_the_ratio_further():
    logp = torch.log(torch.tensor([[1.25, 1.35, 0.7]]))
    old = torch.zeros(1, 3)
    loss, clipped, _ = clipped_policy_loss(logp, old, torch.tensor([1.0]), clip_low=0.2, clip_high=0.28)
    # A>0: the ratio counts up to 1.28 (1.25 unclipped, 1.35 clipped to 1.28); the low side is untouched
    assert torch.allclose(loss, -torch.tensor([[1.25, 1.28, 0.7]]))
    assert clipped.tolist() == [[0.0, 1.0, 0.0]]
    loss, clipped, _ = clipped_policy_loss(logp, old, torch.tensor([-1.0]), clip_low=0.2, clip_high=0.28)
    assert torch.allclose(loss, torch.tensor([[1.25, 1.35, 0.8]]))  # A<0: the low clip 0.8 still applies


def test_dual_clip_caps_the_loss_of_negative_advantages():
    logp = torch.log(torch.tensor([[2.0, 5.0, 0.5]]))
    old = torch.zeros(1, 3)
    loss, _, capped = clipped_policy_loss(logp, old, torch.tensor([-1.0]), clip_low=0.2, dual_clip=3.0)
    assert torch.allclose(loss, torch.tensor([[2.0, 3.0, 0.8]]))  # -rho*A = 5 > 3 = -c*A: capped
    assert capped.tolist() == [[0.0, 1.0, 0.0]]
    loss, _, capped = clipped_policy_loss(logp, old, torch.tensor([1.0]), clip_low=0.2, dual_clip=3.0)
    assert capped.sum() == 0  # positive advantages are never dual-clipped
    assert torch.allclose(loss, -torch.tensor([[1.2, 1.2, 0.5]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gap", [100.0, -100.0, float("inf"), float("-inf")])
def test_ratio_and_kl_estimators_stay_finite_with_finite_gradients(dtype, gap):
    """A log-ratio of +-100 (or inf) overflowed exp: the clamp keeps the loss, every estimator and their
    gradients finite, in fp32 and bf16."""
    logp = torch.zeros(2, 3, dtype=dtype, requires_grad=True)
    other = torch.full((2, 3), -gap, dtype=dtype)  # logp - other = gap
    for advantage in (1.0, -1.0):
        loss, _, _ = clipped_policy_loss(
            logp, other, torch.tensor([advantage, advantage]), 0.2, dual_clip=3.0
        )
        (grad,) = torch.autograd.grad(loss.sum(), logp)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), (advantage, loss, grad)
    for estimator in ("k1", "k2", "k3"):
        kl = kl_penalty(logp, other, estimator)
        (grad,) = torch.autograd.grad(kl.sum(), logp)
        assert torch.isfinite(kl).all() and torch.isfinite(grad).all(), estimator


def test_clamped_kl_matches_the_unclamped_estimators_inside_the_bound():
    logp = torch.randn(4, 5, dtype=torch.float64)
    ref = logp - (3 * torch.randn(4, 5, dtype=torch.float64)).clamp(-2, 10)  # x in [-2, 10]: k3 under its cap
    x = logp - ref
    assert torch.allclose(kl_penalty(logp, ref, "k3"), torch.exp(-x) - 1 + x)
    assert torch.allclose(kl_penalty(logp, ref, "k2"), 0.5 * x * x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_k3_is_capped_so_one_outlier_token_adds_no_gradient(dtype):
    # log-ratios -20 (k3 = e^20 - 21 ~ 5e8 uncapped), -3 (k3 = e^3 - 4 ~ 16: capped), -1 and 0.5 (under the cap)
    x = torch.tensor([-20.0, -3.0, -1.0, 0.5], dtype=dtype)
    logp = x.clone().requires_grad_(True)
    kl = kl_penalty(logp, torch.zeros_like(x), "k3")
    (grad,) = torch.autograd.grad(kl.sum(), logp)
    assert kl[:2].tolist() == [KL_VALUE_CLAMP, KL_VALUE_CLAMP] and grad[:2].tolist() == [0.0, 0.0]
    x64 = x.double()[2:]
    assert torch.allclose(kl[2:].double(), torch.exp(-x64) - 1 + x64, rtol=1e-2)
    assert torch.allclose(grad[2:].double(), 1 - torch.exp(-x64), rtol=1e-2)  # d/dx (e^-x - 1 + x)
