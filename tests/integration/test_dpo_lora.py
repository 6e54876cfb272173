"""Online iterative DPO with LoRA on real actors: pairs from each prompt's samples, DPO on the resident learners,
merged LoRA weights synced into vLLM."""

import pytest
import ray

from tests.integration.conftest import running_fleet, tiny_config
from troupe.actors.reward.aggregation import score_rollouts
from troupe.cluster.run.learn import build_pairs
from troupe.cluster.run.loop import run_iteration

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dpo_fleet(ray_session, tiny_model_path):
    cfg = tiny_config(
        "algo=dpo_online",
        "learner.lora.enabled=true",
        "learner.lora.r=8",
        "learner.lr=5e-3",
        "algo.dpo_beta=0.5",
    )
    with running_fleet(cfg, tiny_model_path) as f:
        yield f


def test_only_adapters_train(dpo_fleet):
    info = dpo_fleet.learners.wait_ready()
    assert all(0 < rank["trainable"] < 0.5 for rank in info)


def test_online_dpo_builds_pairs_trains_and_syncs_merged_lora_weights(dpo_fleet):
    gen = dpo_fleet.generators.healthy()[0].handle
    prompt = dpo_fleet.prompts.batch(999).prompts[0]
    probe = [28, 29, 30, 31, 32]
    before = ray.get(gen.sequence_logprobs.remote(list(prompt.token_ids), probe), timeout=120)
    records = [run_iteration(dpo_fleet, i) for i in range(2)]
    for r in records:
        assert r["algo"] == "dpo_online"
        assert r["pairs/built"] + r["pairs/skipped_ties"] == 4  # one pair or one counted tie per prompt
    trained = [r for r in records if r["pairs/built"]]
    assert trained, "no prompt group had a strict preference in two iterations"
    assert all(r["train/pairs"] % 2 == 0 for r in trained)  # padded to split evenly over 2 ranks
    assert dpo_fleet.version == len(trained)
    after = ray.get(gen.sequence_logprobs.remote(list(prompt.token_ids), probe), timeout=120)
    assert max(abs(a - b) for a, b in zip(before, after, strict=True)) > 1e-4, "LoRA sync did not reach vLLM"


def test_chosen_vs_rejected_margin_grows(dpo_fleet):
    pairs = []
    for seed in range(77, 82):  # a random tiny model rarely ties a whole group; collect a few pairs
        pairs += _pairs(dpo_fleet, seed)
        if len(pairs) >= 4:
            break
    assert len(pairs) >= 2, "five batches gave fewer than two prompt groups with a strict preference"
    pairs = pairs[: len(pairs) // 2 * 2]
    start = sum(dpo_fleet.learners.pair_margins(pairs)) / len(pairs)
    for _ in range(3):
        dpo_fleet.learners.train_dpo(pairs)
    end = sum(dpo_fleet.learners.pair_margins(pairs)) / len(pairs)
    assert end > start + 0.1, (start, end)


def _pairs(fleet, seed):
    batch = fleet.prompts.batch(seed)
    chunks = fleet.generators.map_chunks("generate", batch.prompts, fleet.sampling)
    rollouts = [r for c in chunks for r in c]
    values = fleet.rewards.score(rollouts)
    scored = score_rollouts(rollouts, values, fleet.aggregation)
    return build_pairs(scored, fleet.sampling.n, "max_min", fleet.rng, 0.0)[0]
