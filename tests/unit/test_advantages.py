"""RLOO and REINFORCE++ advantages against hand-computed values."""

import math

import pytest
import torch

from actors.learner.advantages import estimate_advantages, rloo_advantages, whiten


def test_rloo_subtracts_the_mean_of_the_others():
    adv = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 3.0, 3.0, 0.0]), group_size=3)
    # group 1: 1 - (0+0)/2 = 1, 0 - (1+0)/2 = -.5, -.5; group 2: 3 - 1.5, 3 - 1.5, 0 - 3
    assert torch.allclose(adv, torch.tensor([1.0, -0.5, -0.5, 1.5, 1.5, -3.0]))
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.ones(3), group_size=1)


def test_reinforce_pp_whitens_over_the_whole_batch():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    adv = estimate_advantages("reinforce_pp", r, group_size=2)
    std = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 3)
    assert torch.allclose(adv, (r - 3.0) / std, atol=1e-5)


def test_reinforce_pp_baseline_removes_group_mean_first():
    r = torch.tensor([1.0, 3.0, 10.0, 12.0])  # centred per group: [-1, 1, -1, 1]; std (unbiased) = sqrt(4/3)
    adv = estimate_advantages("reinforce_pp_baseline", r, group_size=2)
    assert torch.allclose(adv, torch.tensor([-1.0, 1.0, -1.0, 1.0]) / math.sqrt(4 / 3), atol=1e-5)


def test_whiten_and_unknown_name():
    assert torch.allclose(whiten(torch.tensor([2.0, 2.0, 2.0])), torch.zeros(3))
    with pytest.raises(ValueError, match="rloo"):
        estimate_advantages("ppo2", torch.ones(4), 2)
