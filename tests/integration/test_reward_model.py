"""The hierarchical reward model with a real (tiny) backbone: stage-1 ridge heads with a resumable feature cache,
stage-2 gate with verbosity debiasing, served by sharded reward actors (an expert pool with two replicas beside a
rules pool) whose scores equal the single-process model's, and the RLHF loop running on the token-level ALaRM
hierarchy with a warm-up normaliser."""

import json
import random

import pytest
import ray
import torch

from tests.integration.conftest import running_fleet, tiny_config
from troupe.actors.protocol import Prompt, Rollout
from troupe.actors.reward.aggregation import score_rollouts, token_key
from troupe.actors.reward.bundle import BundleScorer
from troupe.actors.reward.shard import RewardShard, ShardSpec
from troupe.cluster.data.preferences import Preference
from troupe.cluster.data.ratings import load_ratings
from troupe.cluster.fleet.pool import Pool
from troupe.cluster.fleet.reward_pools import RewardFleet
from troupe.cluster.jobs.rm_training import train_gating_stage, train_regression
from troupe.cluster.run.loop import run_iteration

pytestmark = pytest.mark.integration

WORDS = ["please", "thanks", "the", "answer", "is", "seven", "maybe", "numbers", "kindly", "sure"]


def _response(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_model_path):
    tmp = tmp_path_factory.mktemp("rm")
    rng = random.Random(0)
    rows = []
    for i in range(40):
        n = rng.randint(1, 12)
        text = _response(rng, n)
        row = {"prompt": f"Question {i}?", "response": text, "verbosity": min(5, 1 + n // 3)}
        if i % 4:  # politeness is unlabelled on a quarter of the rows: ignored for that objective only
            row["polite"] = 1 + 4 * ("please" in text)
        rows.append(row)
    ratings_file = tmp / "ratings.jsonl"
    ratings_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ratings = load_ratings(str(ratings_file), {"verbosity": (1, 5), "polite": (1, 5)})
    cache = tmp / "cache"
    stage1, stats = train_regression(tiny_model_path, ratings, "armo", tmp / "stage1", cache, max_length=64)
    assert stats["rows"] == {"verbosity": 40, "polite": 30}
    _, again = train_regression(tiny_model_path, ratings, "armo", tmp / "stage1b", cache, max_length=64)
    assert again["cache"]["computed"] == 0 and again["cache"]["reused"] >= 1  # features came from disk
    prefs = []
    for i in range(24):
        short, long = _response(rng, 2), _response(rng, 10)
        prefs.append(Preference([{"role": "user", "content": f"Q{i}?"}], "please " + short, long, f"p:{i}"))
    stage2, gate_stats = train_gating_stage(
        stage1,
        prefs,
        tmp / "stage2",
        cache,  # the same cache root as stage 1: the pairs get their own fingerprint folder
        verbosity="verbosity",
        steps=30,
        batch_size=16,
        hidden=16,
        n_hidden=1,
        dropout=0.0,
        allow_chance=True,  # 30 steps on 24 pairs: this checks the debiasing and the bundle, not the gate's fit
    )
    assert gate_stats["cache"]["folder"] != stats["cache"]["folder"]
    assert (
        gate_stats["cut"] == 24
    )  # max_length 64: SmolLM2's default system block fills the 32-token prompt budget
    debias = gate_stats["debias"]
    assert debias["verbosity"]["lambda"] == 1.0
    assert abs(debias["polite"]["corr_after"]) <= max(0.03, abs(debias["polite"]["corr_before"]))
    return stage1, stage2


def _rollouts(n=10):
    rng = random.Random(3)
    out = []
    for i in range(n):
        text = _response(rng, rng.randint(1, 8))
        prompt = Prompt(f"u{i // 2}", (1, 2, 3), f"What is {i} + 1?", str(i + 1))
        out.append(
            Rollout(prompt, i % 2, (5,) * 3, f"{text}\nAnswer: {i + 1}", torch.zeros(3), 0, "stop", 1.0)
        )
    return out


def test_sharded_scores_equal_the_single_process_model(ray_session, bundles):
    _, stage2 = bundles
    rules = ray.remote(RewardShard).options(num_cpus=0)
    expert = ray.remote(RewardShard).options(num_cpus=0)
    rule_spec = ShardSpec(objectives={"format": {}, "repetition": {}})
    expert_spec = ShardSpec(bundles=(str(stage2),), batch_size=3)
    fleet = RewardFleet(
        {
            "rules": Pool("rules", lambda i, _slot: rules.remote(rule_spec, i), 120),
            "armo": Pool("armo", lambda i, _slot: expert.remote(expert_spec, i), 120),
        }
    )
    try:
        fleet.spawn({"rules": 1, "armo": 2})  # the expert is replicated: the batch is split across both
        rollouts = _rollouts()
        sharded = fleet.score(rollouts)
    finally:
        fleet.shutdown()
    local = BundleScorer(stage2).score(
        [[{"role": "user", "content": r.prompt.text}] for r in rollouts], [r.response_text for r in rollouts]
    )
    assert {"format", "repetition", "armo", "armo/verbosity", "armo/polite", "gate/polite"} <= set(sharded)
    for key, values in local.items():
        torch.testing.assert_close(sharded[key], values, rtol=1e-4, atol=1e-5)
    assert torch.allclose(sharded["armo/verbosity"], torch.zeros(len(rollouts)), atol=1e-6)  # debiased away


CHAT_PROMPTS = [
    {
        "messages": [
            {"role": "system", "content": "You are kind."},
            {"role": "user", "content": f"Tell me about {t}."},
        ]
    }
    for t in ("rivers", "bread", "owls", "tea", "trains", "snow")
]


@pytest.fixture(scope="module")
def hierarchy_fleet(ray_session, tiny_model_path, bundles, tmp_path_factory):
    _, stage2 = bundles
    chat = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    chat.write_text("".join(json.dumps(row) + "\n" for row in CHAT_PROMPTS))
    cfg = tiny_config(
        f"data.train={chat}",  # chat prompts (message lists) scored by the ArmoRM bundle through ALaRM
        f"data.eval={chat}",
        "data.prompt_key=messages",
        "~reward.objectives.correctness",  # chat prompts have no checkable answer
        "eval.every=1",
        "eval.prompts=4",
        f"+reward.experts={{armo: {{bundle: '{stage2}', replicas: 2}}}}",
        "reward.aggregation=hierarchy",
        "reward.hierarchy.holistic=armo",
        "reward.hierarchy.threshold=0.0",
        "+reward.hierarchy.aspects={format: 1.0, repetition: 0.5}",
        "reward.hierarchy.token_level=true",  # repetition's per-token channel travels through the rules pool
        "reward.hierarchy.warmup_samples=24",  # 16 samples per iteration: frozen during the second
    )
    with running_fleet(cfg, tiny_model_path) as f:
        yield f


def test_loop_runs_on_the_hierarchical_reward(hierarchy_fleet):
    record = run_iteration(hierarchy_fleet, 0)
    assert record["weight_version"] == 1
    assert {"objective/armo", "objective/armo/polite", "objective/format", "objective/gate/polite"} <= set(
        record
    )
    branches = {k: v for k, v in record.items() if k.startswith("branch/")}
    assert set(branches) <= {"branch/holistic", "branch/holistic+aspects"} and branches
    assert sum(branches.values()) == pytest.approx(1.0)
    assert 0.0 <= record["objective/gate/polite"] <= 1.0  # a softmax weight, averaged
    assert {"eval/greedy/reward/mean", "eval/greedy/objective/armo"} <= set(record)
    assert record["data/prompts"] == len(CHAT_PROMPTS)
    agg = hierarchy_fleet.aggregation
    assert agg.normalizer.fitted  # z-statistics fitted on the initial policy's own samples
    # warm-up still collecting, and on training samples only: evaluation scores with a copy
    assert agg.normalizer.count == 16 and not agg.normalizer.frozen
    record = run_iteration(hierarchy_fleet, 1)
    assert record["train/optimizer_steps"] == 2
    assert agg.normalizer.count == 32 and agg.normalizer.frozen
    rollouts = _rollouts()
    values = hierarchy_fleet.rewards.score(rollouts)
    assert values[token_key("repetition")].shape == (sum(len(r.response_ids) for r in rollouts),)
    for s in score_rollouts(rollouts, values, agg):
        assert len(s.reward.token_rewards) == len(s.rollout.response_ids)
        assert sum(s.reward.token_rewards) == pytest.approx(s.reward.scalar, abs=1e-5)
