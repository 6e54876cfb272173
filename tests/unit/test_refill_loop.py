"""The loop's refill step (cluster/run/loop.py:_refill) with stand-ins for the pools: which rewards the variance
test sees (data.dynamic_sampling_on), what it draws, and what the batch carries. The real actors are
tests/integration/test_dynamic_sampling.py's ground."""

from types import SimpleNamespace

import pytest
import torch

from troupe.actors.protocol import Prompt, Rollout
from troupe.actors.reward.aggregation import WeightedSum
from troupe.cluster.run import loop
from troupe.cluster.run.dynamic_sampling import SURPLUS, ZERO_VARIANCE
from troupe.cluster.run.scoring import ErrorPolicy
from troupe.cluster.run.shaping import OverlongShaping

# Groups of 2 (reply lengths, correctness). a: all wrong, one reply cut at 8 tokens (varies only once shaped);
# b: all wrong, same lengths; c and d (the refill): one right, one wrong.
GROUPS = {
    "a": ((3, 0.0), (8, 0.0)),
    "b": ((3, 0.0), (3, 0.0)),
    "c": ((3, 1.0), (3, 0.0)),
    "d": ((3, 0.0), (3, 1.0)),
}


def _rollouts(uids):
    return [
        Rollout(Prompt(uid, (1,), uid), i, (5,) * k, "r", torch.zeros(k), 0, "stop", 1.0)
        for uid in uids
        for i, (k, _) in enumerate(GROUPS[uid])
    ]


class Cursor:
    """The data cursor's two calls the refill makes: batches of prompt uids, recorded as drawn."""

    per_batch = 2

    def __init__(self, *batches):
        self.batches, self.drawn = list(batches), []

    def next_batch(self):
        self.drawn.append(self.batches.pop(0))
        return Batch(self.drawn[-1])


class Batch(list):
    """A drawn batch: its prompts (here uids), and its length for the ledger."""

    @property
    def prompts(self):
        return list(self)


def _run(judge_shaped, cursor):
    acc = {(uid, i): right for uid, group in GROUPS.items() for i, (_, right) in enumerate(group)}
    return SimpleNamespace(
        sampling=SimpleNamespace(n=2),
        prompts=cursor,
        max_batches_drawn=3,
        judge_shaped=judge_shaped,
        ledger=SimpleNamespace(enter=lambda n: None),
        generators=SimpleNamespace(
            map_chunks=lambda method, prompts, sampling, deadline_s: [_rollouts(prompts)]
        ),
        sampling_for=lambda batch: None,
        faults=SimpleNamespace(generate_s=1.0, score_s=1.0),
        rewards=SimpleNamespace(
            score=lambda rollouts, deadline_s: {
                "acc": torch.tensor([acc[r.prompt.uid, r.sample_index] for r in rollouts])
            }
        ),
        aggregation=WeightedSum({"acc": 1.0}),
        on_error=ErrorPolicy(),
        overlong=OverlongShaping(max_tokens=8, buffer_tokens=4, penalty=1.0),
    )


@pytest.mark.parametrize("judge_shaped", [False, True])
def test_refill_judges_the_reward_or_the_shaped_reward_and_trains_the_shaped_one(judge_shaped):
    cursor = Cursor(["c", "d"], ["c", "d"])
    run = _run(judge_shaped, cursor)
    first, shaped = loop._score(run, _rollouts(["a", "b"]))
    batch, left_out, stats = loop._refill(run, first, shaped)
    trained = [(s.rollout.prompt.uid, s.reward.scalar) for s in batch.scored]
    assert cursor.drawn == [["c", "d"]]  # one refill either way: 0 or 1 informative groups first, 2 needed
    if judge_shaped:  # a's cut reply (-1 shaped) makes it informative: a, then c
        assert trained == [("a", 0.0), ("a", -1.0), ("c", 1.0), ("c", 0.0)]
        assert left_out == {ZERO_VARIANCE: 1, SURPLUS: 1} and stats["dynamic/informative_groups"] == 3
    else:  # on the reward a varies not: c and d
        assert trained == [("c", 1.0), ("c", 0.0), ("d", 0.0), ("d", 1.0)]
        assert left_out == {ZERO_VARIANCE: 2} and stats["dynamic/informative_groups"] == 2
    assert not any(s.reward.dropped for s in batch.scored)
