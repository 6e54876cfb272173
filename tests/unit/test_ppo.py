"""PPO math against hand-computed values: per-token rewards, GAE, whitening, clipped value loss, adaptive KL."""

import math

import pytest
import torch

from troupe.actors.learner.ppo import AdaptiveKL, gae, masked_whiten, value_loss


def test_gae_matches_hand_computation():
    # one sequence, 3 response tokens at positions 1..3 (position 0 is prompt), gamma=0.9, lam=0.8
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[5.0, 0.5, 0.4, 0.3]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    d3 = 1.0 + 0.9 * 0.0 - 0.3
    d2 = 0.0 + 0.9 * 0.3 - 0.4
    d1 = 0.0 + 0.9 * 0.4 - 0.5
    a3 = d3
    a2 = d2 + 0.72 * a3
    a1 = d1 + 0.72 * a2
    assert torch.allclose(adv, torch.tensor([[0.0, a1, a2, a3]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.0, a1 + 0.5, a2 + 0.4, a3 + 0.3]]), atol=1e-6)


def test_gae_ignores_right_padding_and_gives_reward_to_go_with_zero_values():
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    rewards = torch.tensor([[0.5, 2.0, 7.0, 7.0], [1.0, 0.0, 0.0, 3.0]])
    adv, ret = gae(rewards, torch.zeros(2, 4), mask, gamma=1.0, lam=1.0)
    assert torch.allclose(ret[0], torch.tensor([2.5, 2.0, 0.0, 0.0]))  # padding rewards never leak in
    assert torch.allclose(ret[1], torch.tensor([4.0, 3.0, 3.0, 3.0]))
    assert torch.equal(adv, ret)


def test_masked_whiten_uses_only_masked_entries():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    w = masked_whiten(x, mask)
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expect = (vals - vals.mean()) / vals.std()
    assert torch.allclose(w[mask.bool()], expect, atol=1e-5)
    assert torch.all(w[~mask.bool()] == 0)


def test_value_loss_clips_around_old_values():
    values = torch.tensor([1.0, 0.0])
    old = torch.tensor([0.5, 0.0])
    returns = torch.tensor([0.0, 1.0])
    loss, clipped = value_loss(values, old, returns, clip=0.2)
    # token 0: unclipped (1-0)^2=1, clipped V=0.7 -> 0.49; max = 1 -> 0.5
    # token 1: V unchanged -> both 1 -> 0.5
    assert torch.allclose(loss, torch.tensor([0.5, 0.5]))
    values = torch.tensor([0.0])
    loss, clipped = value_loss(values, torch.tensor([1.0]), torch.tensor([2.0]), clip=0.2)
    # unclipped (0-2)^2=4, clipped V=0.8 -> 1.44; max=4 -> 2.0, the unclipped branch
    assert loss.item() == pytest.approx(2.0) and clipped.item() == 0.0
    loss, clipped = value_loss(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0.0]), clip=0.2)
    # unclipped 4, clipped V=1.2 -> 1.44: unclipped wins again; value moving away from the target is not clipped
    assert loss.item() == pytest.approx(2.0)
    loss, clipped = value_loss(torch.tensor([-0.5]), torch.tensor([1.0]), torch.tensor([0.0]), clip=0.2)
    # unclipped 0.25, clipped V=0.8 -> 0.64 wins: a big jump towards the target is held back
    assert loss.item() == pytest.approx(0.32) and clipped.item() == 1.0


def test_adaptive_kl_moves_towards_target_and_is_bounded():
    ctl = AdaptiveKL(0.2, target=6.0, horizon=10000)
    ctl.update(12.0, n_samples=1000)  # error clipped to +0.2 -> x(1 + 0.2 * 0.1)
    assert ctl.coef == pytest.approx(0.2 * 1.02)
    ctl.update(3.0, n_samples=1000)  # error -0.5 clipped to -0.2
    assert ctl.coef == pytest.approx(0.2 * 1.02 * 0.98)
    fixed = AdaptiveKL(0.1)
    assert fixed.update(100.0, 1000) == 0.1
    assert AdaptiveKL(0.1, target=1.0).update(math.nan, 10) == 0.1
