"""Collation puts the action mask exactly on the positions that predict response tokens."""

import math

import torch

from actors.learner.batch import TrainSample, collate, token_logprobs


def test_collate_aligns_response_positions():
    s1 = TrainSample((5, 6), (7, 8, 9), 1.0, torch.tensor([-0.1, -0.2, -0.3]))
    s2 = TrainSample((5, 6, 7), (8,), -1.0, torch.tensor([-0.4]))
    t = collate([s1, s2], pad_id=0)
    assert t.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 8, 0]]
    assert t.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # position t predicts token t+1: s1's response starts at index 2, predicted from position 1
    assert t.action_mask.tolist() == [[0, 1, 1, 1], [0, 0, 1, 0]]
    assert torch.allclose(t.behaviour_logprobs[0], torch.tensor([0.0, -0.1, -0.2, -0.3]))
    assert t.advantages.tolist() == [1.0, -1.0]


class _Uniform(torch.nn.Module):
    """Logits fixed so that the next token's probability is known: token 1 gets e^2 / (e^2 + 3)."""

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        logits = torch.zeros(*input_ids.shape, 4)
        logits[..., 1] = 2.0

        class Out:
            pass

        out = Out()
        out.logits = logits
        return out


def test_token_logprobs_match_softmax():
    ids = torch.tensor([[0, 1, 2]])
    logp, entropy = token_logprobs(_Uniform(), ids, torch.ones_like(ids), with_entropy=True)
    z = math.e**2 + 3
    assert torch.allclose(logp, torch.tensor([[2 - math.log(z), -math.log(z)]]))
    p = torch.tensor([1, math.e**2, 1, 1]) / z
    assert torch.allclose(entropy, -(p * p.log()).sum().expand(1, 2), atol=1e-6)


def test_per_token_fields_are_placed_on_response_positions_and_read_back():
    from actors.learner.batch import place, response_slices

    s1 = TrainSample(
        (1, 2, 3),
        (4, 5),
        0.5,
        torch.tensor([-1.0, -2.0]),
        reward=1.0,
        token_rewards=torch.tensor([0.1, 0.2]),
        values=torch.tensor([0.3, 0.4]),
    )
    s2 = TrainSample((1,), (6, 7, 8), -0.5, torch.tensor([-3.0, -4.0, -5.0]))
    t = collate([s1, s2], pad_id=0)
    assert torch.allclose(t.values, torch.tensor([[0.0, 0.0, 0.3, 0.4], [0.0, 0.0, 0.0, 0.0]]))
    assert t.token_rewards[0, 2:].tolist() == [0.1, 0.2] or torch.allclose(
        t.token_rewards[0, 2:], torch.tensor([0.1, 0.2])
    )
    assert t.rewards.tolist() == [1.0, 0.0]
    back = response_slices(t, t.behaviour_logprobs)
    assert [b.tolist() for b in back] == [[-1.0, -2.0], [-3.0, -4.0, -5.0]]
    assert torch.equal(place(t.action_mask, back), t.behaviour_logprobs)
    assert len(t.select(torch.tensor([1]))) == 1
