"""ALaRM completeness: token-level placement through `score_rollouts`, the holistic normaliser's warm-up, its
near-zero-std refusal, and its statistics saved, restored and carried by a reward bundle."""

import json

import pytest
import torch

from troupe.actors.protocol import Prompt, Rollout
from troupe.actors.reward.aggregation import score_rollouts, token_key
from troupe.actors.reward.alarm import HierarchyAggregation, Normalizer
from troupe.actors.reward.bundle import BundleInfo, load_bundle, save_bundle, store_normalizer
from troupe.actors.reward.shard import RewardShard, ShardSpec
from troupe.cluster.config.schema import ExpertConfig, HierarchyConfig, RewardConfig
from troupe.cluster.fleet.reward_model import build_aggregation


def _rollout(ids, i=0):
    return Rollout(
        Prompt(f"p{i}", (1, 2), "q", "7"), i, tuple(ids), "text", torch.zeros(len(ids)), 0, "stop", 1.0
    )


def test_token_level_hierarchy_puts_the_whole_reward_on_response_tokens():
    rollouts = [_rollout([5, 5, 6, 5], 0), _rollout([7, 8], 1), _rollout([9, 9, 9], 2)]
    shard = RewardShard(ShardSpec(objectives={"repetition": {}, "format": {}}, token_values=True))
    values = shard.score(rollouts)
    # the per-token channel: the values of all response tokens, rollouts concatenated in order
    assert values[token_key("repetition")].shape == (9,)
    per_token = values[token_key("repetition")].split([4, 2, 3])
    for seq, tok in zip(values["repetition"], per_token, strict=True):
        assert float(tok.sum()) == pytest.approx(
            float(seq)
        )  # credit on new tokens sums to the sequence value
    values["armo"] = torch.tensor([0.0, 3.0, 1.0])
    agg = HierarchyAggregation(
        "armo", {"repetition": 2.0, "format": 1.0}, threshold=0.5, holistic_weight=3.0,
        normalizer=Normalizer(1.0, 1.0), token_level=True,
    )  # fmt: skip
    scored = score_rollouts(rollouts, values, agg)
    for s in scored:
        tr = s.reward.token_rewards
        assert tr is not None and len(tr) == len(s.rollout.response_ids)
        assert sum(tr) == pytest.approx(s.reward.scalar, abs=1e-6)
    # rollout 0: z = -1 < 0.5: only the holistic part, on the last token
    assert scored[0].reward.token_rewards == pytest.approx((0.0, 0.0, 0.0, -3.0))
    assert scored[0].reward.branch == "holistic"
    # rollout 1: z = 2: aspects per token (repetition) and on the last token (format = 0: no answer line)
    assert scored[1].reward.token_rewards == pytest.approx((2.0 * 0.5, 2.0 * 0.5 + 6.0))
    # rollout 2: z = 0 < 0.5
    assert scored[2].reward.token_rewards == pytest.approx((0.0, 0.0, 0.0))
    assert token_key("repetition") not in scored[1].reward.objectives
    # sequence-level mode: the same scalars where every aspect's tokens sum to its sequence value, no placement
    agg.token_level = False
    plain = score_rollouts(rollouts, values, agg)
    assert [p.reward.token_rewards for p in plain] == [None] * 3
    assert [p.reward.scalar for p in plain] == pytest.approx([s.reward.scalar for s in scored])


def test_normaliser_fits_on_a_warm_up_then_freezes():
    norm = Normalizer(warmup_samples=6, objective="armo")
    first = torch.tensor([1.0, 2.0, 3.0, 4.0])
    norm.observe(first)  # before the warm-up is complete: the statistics of the samples seen so far
    assert (
        not norm.frozen and norm.mean == pytest.approx(2.5) and norm.std == pytest.approx(float(first.std()))
    )
    second = torch.tensor([10.0, 20.0, 30.0, 40.0])
    norm.observe(second)  # 8 >= 6 samples: fitted on all eight, frozen
    both = torch.cat([first, second])
    assert norm.frozen and norm.mean == pytest.approx(float(both.mean()))
    assert norm.std == pytest.approx(float(both.std()))
    norm.observe(torch.tensor([1000.0, 2000.0]))
    assert norm.mean == pytest.approx(float(both.mean()))  # frozen: later samples change nothing


def test_normaliser_refuses_a_near_zero_std_naming_the_objective():
    agg = HierarchyAggregation("armo", {}, normalizer=Normalizer(warmup_samples=4))
    with pytest.raises(ValueError, match="'armo'"):
        agg.combine({"armo": torch.full((4,), 0.7)}, [None] * 4)
    with pytest.raises(ValueError, match="'helpful'"):
        Normalizer(objective="helpful").fit(torch.tensor([2.0, 2.0, 2.0]))
    with pytest.raises(ValueError, match="reward.hierarchy.std"):
        Normalizer(0.0, 0.0, objective="armo")


def test_aggregation_state_round_trips_through_json():
    agg = HierarchyAggregation("armo", {"format": 1.0}, normalizer=Normalizer(warmup_samples=8))
    agg.combine({"armo": torch.tensor([1.0, 2.0, 4.0]), "format": torch.ones(3)}, [None] * 3)
    state = json.loads(json.dumps(agg.state_dict()))
    fresh = HierarchyAggregation("armo", {"format": 1.0}, normalizer=Normalizer(warmup_samples=8))
    fresh.load_state_dict(state)
    batch = {"armo": torch.tensor([0.0, 5.0, 9.0, 3.0, 3.5, 1.0]), "format": torch.ones(6)}
    torch.testing.assert_close(fresh.combine(batch, [None] * 6).scalar, agg.combine(batch, [None] * 6).scalar)
    assert fresh.normalizer.frozen and fresh.state_dict() == agg.state_dict()
    configured = HierarchyAggregation("armo", {}, normalizer=Normalizer(0.0, 2.0))
    configured.load_state_dict(state)  # configured reward.hierarchy.mean/std win over saved statistics
    assert (configured.normalizer.mean, configured.normalizer.std) == (0.0, 2.0)
    with pytest.raises(ValueError, match="'other'"):
        HierarchyAggregation("other", {}).load_state_dict(state)


def test_a_bundle_carries_normaliser_statistics_to_the_served_aggregation(tmp_path):
    folder = save_bundle(
        tmp_path / "b", BundleInfo("armo", "x", objectives=["q"]), {"regression": torch.ones(1, 4)}
    )
    norm = Normalizer(objective="armo").fit(torch.tensor([1.0, 3.0, 5.0]))
    store_normalizer(folder, "armo", norm.state_dict())
    info, _ = load_bundle(folder)
    assert info.normalizers["armo"]["mean"] == pytest.approx(3.0)
    cfg = RewardConfig(
        experts={"armo": ExpertConfig(bundle=str(folder))},
        aggregation="hierarchy",
        hierarchy=HierarchyConfig(holistic="armo", warmup_samples=100),
    )
    agg = build_aggregation(cfg)
    assert agg.normalizer.frozen and agg.normalizer.mean == pytest.approx(3.0)
    assert agg.normalizer.std == pytest.approx(2.0)
    cfg.hierarchy.mean, cfg.hierarchy.std = 0.0, 1.0  # configured statistics win over the bundle's
    assert build_aggregation(cfg).normalizer.mean == 0.0
    cfg.hierarchy.token_level, cfg.hierarchy.mean, cfg.hierarchy.std = True, None, None
    assert build_aggregation(cfg).token_level
