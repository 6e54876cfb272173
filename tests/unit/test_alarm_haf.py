"""ALaRM hierarchy (piecewise rule, token placement, consistency selection) and the HaF-RM loss, by hand."""

import math

import pytest
import torch

from troupe.actors.reward.alarm import (
    HierarchyAggregation,
    Normalizer,
    consistency_rates,
    hierarchical_reward,
    select_aspects,
    token_level_reward,
)
from troupe.actors.reward.haf import haf_loss, last_index
from troupe.cluster.jobs.rm_eval import pairwise_report


def test_hierarchy_adds_aspects_only_above_threshold():
    z = torch.tensor([-1.0, 0.5, 0.6, 2.0])
    aspects = {"fact": torch.tensor([1.0, 1.0, 1.0, -1.0]), "len": torch.tensor([0.5, 0.5, 0.5, 0.5])}
    r, gate = hierarchical_reward(z, aspects, {"fact": 2.0, "len": 1.0}, threshold=0.6, holistic_weight=5.0)
    assert gate.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert torch.allclose(r, torch.tensor([-5.0, 2.5, 3.0 + 2.5, 10.0 - 2.0 + 0.5]))
    with pytest.raises(KeyError, match="grammar"):
        hierarchical_reward(z, aspects, {"grammar": 1.0}, 0.0)


def test_token_level_placement():
    out = token_level_reward(
        1.0, {"fact": [0.1, 0.0, 0.2], "comp": 0.5}, {"fact": 1.0, "comp": 2.0}, 3, 0.5, 3.0
    )
    assert out == pytest.approx([0.1, 0.0, 0.2 + 1.0 + 3.0])
    below = token_level_reward(0.2, {"fact": [0.1, 0.0, 0.2]}, {"fact": 1.0}, 3, 0.5, 3.0)
    assert below == pytest.approx([0.0, 0.0, 0.6])
    with pytest.raises(ValueError, match="token values"):
        token_level_reward(1.0, {"fact": [0.1]}, {"fact": 1.0}, 3, 0.5)


def test_consistency_rates_and_selection():
    h = torch.arange(20.0)
    rates = consistency_rates(h, {"same": h * 2, "reversed": -h, "const": torch.zeros(20)}, n_pairs=200)
    assert rates["same"] == 1.0 and rates["reversed"] == 0.0 and math.isnan(rates["const"])
    assert select_aspects(rates, 0.7) == ["same"]


def test_hierarchy_aggregation_fits_normaliser_on_first_batch():
    agg = HierarchyAggregation("armo", {"format": 1.0}, threshold=0.0, holistic_weight=1.0)
    values = {
        "armo": torch.tensor([1.0, 3.0]),
        "format": torch.tensor([1.0, 1.0]),
        "gate/help": torch.tensor([0.3, 0.7]),
    }
    out = agg.combine(values, [None, None])
    scalar, weights, branches = out.scalar, out.weights, out.branches
    assert out.token_rewards is None  # sequence-level unless token_level
    z = (torch.tensor([1.0, 3.0]) - 2.0) / torch.tensor([1.0, 3.0]).std()
    assert torch.allclose(scalar, z + torch.tensor([0.0, 1.0]))
    assert branches == ["holistic", "holistic+aspects"]
    assert weights["gate/help"].tolist() == pytest.approx([0.3, 0.7])
    assert agg.normalizer.mean == 2.0
    with pytest.raises(RuntimeError):
        Normalizer()(torch.zeros(2))


def test_haf_loss_is_bt_plus_alpha_dpo():
    rc, rr = torch.tensor([1.0]), torch.tensor([0.0])
    lc, lr_, fc, fr = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.5))
    total, r_part, p_part = haf_loss(rc, rr, lc, lr_, fc, fr, alpha=0.2, beta=0.1)
    bt = math.log1p(math.exp(-1.0))
    dpo = math.log1p(math.exp(-0.15))
    assert r_part.item() == pytest.approx(bt) and p_part.item() == pytest.approx(dpo)
    assert total.item() == pytest.approx(bt + 0.2 * dpo)
    plain, _, zero = haf_loss(rc, rr, None, None, None, None, alpha=0.0, beta=0.1)
    assert plain.item() == pytest.approx(bt) and zero.item() == 0.0


def test_reward_is_read_at_last_non_pad_token():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert last_index(mask).tolist() == [2, 4]


def test_pairwise_report_counts_ties_wrong_and_weights_sections():
    chosen = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0])
    rejected = torch.tensor([0.0, 2.0, 1.0, 1.0, 0.0])
    rep = pairwise_report(chosen, rejected, ["a", "a", "b", "b", "c"], {"s1": ["a", "b"], "s2": ["c"]})
    assert rep["ties"] == 1 and rep["accuracy"] == pytest.approx(3 / 5)
    assert rep["subsets"]["a"] == {"accuracy": 0.5, "n": 2}
    assert rep["sections"]["s1"] == pytest.approx(0.5) and rep["sections"]["s2"] == 1.0
    assert rep["score"] == pytest.approx(0.75)
    with pytest.raises(KeyError, match="zzz"):
        pairwise_report(chosen, rejected, ["a"] * 5, {"x": ["zzz"]})
