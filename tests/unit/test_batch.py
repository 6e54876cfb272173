"""The columnar batch: response positions, per-token rewards, row subsets trimmed to their own length."""

import torch

from troupe.actors.learner.batch import from_scored, pad_sequences
from troupe.actors.protocol import Prompt, RewardBreakdown, Rollout, ScoredRollout


def _scored(prompt_ids, response_ids, reward, token_rewards=None, temperature=0.7, version=0):
    prompt = Prompt("p", tuple(prompt_ids), "q")
    lp = -torch.arange(1, len(response_ids) + 1, dtype=torch.float32) / 10
    rollout = Rollout(prompt, 0, tuple(response_ids), "", lp, version, "stop", temperature)
    return ScoredRollout(rollout, RewardBreakdown(reward, {}, token_rewards=token_rewards))


def test_pad_sequences_aligns_response_positions():
    ids, att, action = pad_sequences([(5, 6), (5, 6, 7)], [(7, 8, 9), (8,)], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 8, 0]]
    assert att.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert action.tolist() == [[0, 1, 1, 1], [0, 0, 1, 0]]  # position t predicts token t+1


def test_from_scored_places_scalar_on_last_token_or_uses_token_rewards():
    a = _scored((1, 2), (3, 4, 5), 2.0)
    b = _scored((1, 2, 3), (4,), 1.5, token_rewards=(1.5,), temperature=1.0, version=3)
    c = _scored((1,), (2, 3), 1.0, token_rewards=(0.25, 0.75))
    batch = from_scored([a, b, c], pad_id=0, group_size=1)
    assert batch.token_rewards[0].tolist() == [0.0, 0.0, 0.0, 2.0]
    assert batch.token_rewards[1].tolist() == [0.0, 0.0, 1.5, 0.0]
    assert batch.token_rewards[2].tolist() == [0.25, 0.75, 0.0, 0.0]
    assert torch.allclose(batch.behaviour_logprobs[0], torch.tensor([0.0, -0.1, -0.2, -0.3]))
    assert batch.temperature.tolist() == [0.7, 1.0, 0.7] or torch.allclose(
        batch.temperature, torch.tensor([0.7, 1, 0.7])
    )
    assert batch.weight_version.tolist() == [0, 3, 0]
    assert [r.tolist() for r in batch.response_rows(batch.token_rewards)] == [[0, 0, 2], [1.5], [0.25, 0.75]]


def test_select_trims_to_the_rows_longest_sequence_and_shares_keep_groups():
    long = _scored((1, 2), (3, 4, 5, 6, 7), 1.0)
    short = _scored((1,), (2,), 0.0)
    batch = from_scored([long, short, short, short], pad_id=0, group_size=2)
    sub = batch.select([2, 3])
    assert sub.input_ids.shape == (2, 2) and sub.action_mask.shape == (2, 1)
    assert sub.token_rewards.shape == (2, 1)
    shares = batch.shares(2)
    assert [len(s) for s in shares] == [2, 2] and shares[1].input_ids.shape[1] == 2
    try:
        from_scored([long, short, short, short], 0, group_size=4).shares(2)
    except ValueError as e:
        assert "prompt groups" in str(e)
    else:
        raise AssertionError("a prompt group was split across ranks")


def test_mismatched_token_rewards_fail_naming_the_rollout():
    bad = _scored((1,), (2, 3), 1.0, token_rewards=(1.0,))
    try:
        from_scored([bad], 0, 1)
    except ValueError as e:
        assert "p#0" in str(e)
    else:
        raise AssertionError("token rewards of the wrong length were accepted")
