"""Rule objectives, the weighted-sum aggregation and the shard's batching."""

import pytest
import torch

from troupe.actors.protocol import Prompt, Rollout
from troupe.actors.reward.aggregation import WeightedSum, score_rollouts
from troupe.actors.reward.rules import AnswerFormat, Brevity, Correctness, NonRepetition
from troupe.actors.reward.shard import RewardShard, ShardSpec


def _rollout(text: str, n_tokens: int = 10, reason: str = "stop", reference: str = "7") -> Rollout:
    prompt = Prompt("p0", (1, 2), "q", reference)
    return Rollout(prompt, 0, tuple(range(n_tokens)), text, torch.zeros(n_tokens), 0, reason, 1.0)


def test_rules_score_hand_cases():
    rs = [_rollout("3 + 4 = 7. Answer: 7"), _rollout("Answer: 8"), _rollout("it is 7", reason="length")]
    assert Correctness().score(rs).tolist() == [1.0, 0.0, 1.0]
    assert AnswerFormat().score(rs).tolist() == [1.0, 1.0, 0.0]
    b = Brevity(target_tokens=10, max_tokens=30)
    assert b.score(
        [_rollout("x", 10), _rollout("x", 20), _rollout("x", 40), _rollout("x", 5, "length")]
    ).tolist() == [1.0, 0.5, 0.0, 0.0]


def test_non_repetition_counts_distinct_ngrams():
    prompt = Prompt("p0", (1,), "q", "1")
    r = Rollout(prompt, 0, (5, 5, 6, 5), "", torch.zeros(4), 0, "stop", 1.0)
    assert NonRepetition(n=1).score([r]).tolist() == [0.5]
    assert NonRepetition(n=2).score([r]).tolist() == [1.0]  # (5,5) (5,6) (6,5)


def test_correctness_without_reference_names_the_prompt():
    with pytest.raises(ValueError, match="p0 has no reference"):
        Correctness().score([_rollout("Answer: 7", reference="")])


def test_weighted_sum_breakdown():
    rs = [_rollout("Answer: 7"), _rollout("nothing")]
    values = {
        "correctness": torch.tensor([1.0, 0.0]),
        "format": torch.tensor([1.0, 0.0]),
        "length": torch.tensor([0.5, 1.0]),
    }
    scored = score_rollouts(rs, values, WeightedSum({"correctness": 1.0, "format": 0.5}))
    assert [s.reward.scalar for s in scored] == [1.5, 0.0]
    assert scored[1].reward.objectives == {"correctness": 0.0, "format": 0.0, "length": 1.0}
    assert scored[0].reward.weights == {"correctness": 1.0, "format": 0.5}
    with pytest.raises(KeyError, match="quality"):
        score_rollouts(rs, values, WeightedSum({"quality": 1.0}))


def test_shard_batches_and_rejects_unknown_objectives():
    shard = RewardShard(ShardSpec({"correctness": {}, "format": {}}, batch_size=2))
    out = shard.score([_rollout("Answer: 7")] * 5)
    assert out["correctness"].tolist() == [1.0] * 5
    assert shard.get_stats()["batches"] == 3
    with pytest.raises(ValueError, match="'grammar' is unknown"):
        RewardShard(ShardSpec({"grammar": {}}))
    with pytest.raises(ValueError, match="'length': bad parameters"):
        RewardShard(ShardSpec({"length": {"goal": 3}}))
