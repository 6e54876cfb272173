"""Token-level truncated importance weights (TIS) and the staleness rule of the async pipeline (the other
correction modes: test_off_policy.py)."""

import math

import torch

from troupe.actors.learner.off_policy import correction_weights
from troupe.actors.protocol import Prompt, Rollout
from troupe.cluster.run.pipeline import stale_groups


def test_weights_are_the_ratio_capped_and_detached():
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    behaviour = torch.log(torch.tensor([[0.25, 0.4, 0.1]]))
    old.requires_grad_(True)
    w, masked = correction_weights("token_tis", old, behaviour, torch.ones(1, 3), cap=2.0)
    assert torch.allclose(w, torch.tensor([[2.0, 0.5, 2.0]]))  # 2.0 exactly, 0.5, 9.0 capped
    assert not masked.any()
    assert not w.requires_grad


def test_huge_ratios_do_not_overflow():
    old = torch.tensor([[0.0, 0.0]])
    behaviour = torch.tensor([[-1000.0, -1.0]])
    w, _ = correction_weights("token_tis", old, behaviour, torch.ones(1, 2), cap=5.0)
    assert torch.isfinite(w).all()
    assert torch.allclose(w[0], torch.tensor([5.0, math.e]))


def test_the_capped_weight_scales_the_policy_gradient():
    """d/dθ of w * (-ratio * A) at ratio 1 is -w * A * dlogp: the weight scales the gradient of each token."""
    from troupe.actors.learner.grpo import clipped_policy_loss

    logp = torch.zeros(1, 2, requires_grad=True)
    behaviour = torch.log(torch.tensor([[0.5, 0.1]]))
    w, _ = correction_weights("token_tis", torch.zeros(1, 2), behaviour, torch.ones(1, 2), cap=3.0)
    loss, _, _ = clipped_policy_loss(logp, logp.detach(), torch.tensor([1.0]), 0.2)
    (loss * w).sum().backward()
    assert torch.allclose(logp.grad, -torch.tensor([[2.0, 3.0]]))


def _rollout(uid, version):
    return Rollout(Prompt(uid, (1,), "p"), 0, (2,), "r", torch.zeros(1), version, "stop", 1.0)


def test_a_group_is_stale_when_any_sample_is_past_the_bound():
    rollouts = [
        _rollout("a", 5),
        _rollout("a", 5),
        _rollout("b", 4),
        _rollout("b", 3),
        _rollout("c", 3),
        _rollout("c", 3),
    ]
    assert stale_groups(rollouts, 2, version=5, max_staleness=1) == [1, 2]
    assert stale_groups(rollouts, 2, version=5, max_staleness=2) == []
    # a rollout newer than the learner's weights (a rollback undid them) is not trainable either
    assert stale_groups(rollouts, 2, version=4, max_staleness=1) == [0]
