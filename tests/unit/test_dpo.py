"""DPO loss (sigmoid with label smoothing, IPO) and pair construction against hand-computed values."""

import math
import random

import pytest
import torch

from troupe.actors.learner.dpo import PreferencePair, choose_pair, dpo_loss


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_sigmoid_dpo_with_label_smoothing():
    # Delta = (-1 - -2) - (-3 - -2.5) = 1 + 0.5 = 1.5; beta = 0.1
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.5))
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
    expect = -(0.9 * _log_sigmoid(0.15) + 0.1 * _log_sigmoid(-0.15))
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(-0.05)
    plain, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert plain.item() == pytest.approx(-_log_sigmoid(0.15), rel=1e-6)


def test_ipo_loss_is_squared_distance_to_half_inverse_beta():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.5))
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")
    assert loss.item() == pytest.approx((1.5 - 1.0) ** 2)
    with pytest.raises(ValueError, match="dpo loss"):
        dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="hinge-ish")


def test_dpo_gradient_pushes_chosen_up():
    pc = torch.tensor([-2.0], requires_grad=True)
    pr = torch.tensor([-2.0], requires_grad=True)
    loss, _, _ = dpo_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1)
    loss.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()


def test_pair_strategies():
    rng = random.Random(0)
    rewards, lengths = [0.2, 1.0, -0.5, 0.3], [10, 200, 5, 12]
    assert choose_pair(rewards, lengths, "max_min", rng) == (1, 2)
    # length penalty 0.005/char: scores 0.15, 0.0, -0.525, 0.24 -> best 3, worst 2
    assert choose_pair(rewards, lengths, "max_min_length", rng, length_penalty=0.005) == (3, 2)
    seen = {choose_pair(rewards, lengths, "max_random", random.Random(s))[1] for s in range(40)}
    assert seen == {0, 2, 3}  # any strictly worse response, never the chosen one
    assert choose_pair([0.5, 0.5, 0.5], [1, 2, 3], "max_min", rng) is None  # ties give no pair
    assert choose_pair([0.5, 0.5], [1, 2], "max_random", rng) is None
    with pytest.raises(ValueError, match="pair strategy"):
        choose_pair(rewards, lengths, "best_of", rng)


def test_empty_response_pair_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        PreferencePair((1, 2), (), (3,))
