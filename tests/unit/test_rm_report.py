"""rm_eval's report groups `family/subset` names by family, and a section may name a whole group."""

import pytest
import torch

from troupe.cluster.jobs.rm_eval import pairwise_report

CHOSEN = torch.tensor([1.0, 2.0, 0.0, 2.0, 5.0, 0.0])
REJECTED = torch.tensor([0.0, 1.0, 1.0, 3.0, 1.0, 0.0])
SUBSETS = ["chat/easy", "chat/easy", "chat/hard", "chat/hard", "safety", "safety"]


def test_groups_are_the_part_before_the_slash():
    rep = pairwise_report(CHOSEN, REJECTED, SUBSETS)
    assert rep["groups"] == {"chat": {"accuracy": 0.5, "n": 4}, "safety": {"accuracy": 0.5, "n": 2}}
    assert rep["subsets"]["chat/easy"] == {"accuracy": 1.0, "n": 2}
    assert rep["subsets"]["chat/hard"] == {"accuracy": 0.0, "n": 2}
    assert rep["ties"] == 1  # the tie in "safety" counts as wrong


def test_a_section_may_name_a_group_or_a_subset():
    rep = pairwise_report(CHOSEN, REJECTED, SUBSETS, {"chat": ["chat"], "mixed": ["chat/easy", "safety"]})
    assert rep["sections"]["chat"] == pytest.approx(0.5)  # all four chat pairs, example-weighted
    assert rep["sections"]["mixed"] == pytest.approx(0.75)  # (2 + 1) / 4
    assert rep["score"] == pytest.approx(0.625)
    with pytest.raises(KeyError, match="nope"):
        pairwise_report(CHOSEN, REJECTED, SUBSETS, {"x": ["nope"]})
