"""One real iteration on a tiny model: vLLM rollouts, reward shard scores, DeepSpeed GRPO step, weight sync."""

from dataclasses import replace

import pytest
import ray
import torch

from troupe.actors.weight_buckets import BucketedWeights
from troupe.cluster.fleet.pool import Health
from troupe.cluster.run.loop import run_iteration
from troupe.cluster.sync.object_store import push_weights

pytestmark = pytest.mark.integration


def _fixed_sequence(fleet):
    prompt = fleet.prompts.batch(999).prompts[0]
    return list(prompt.token_ids), [28, 29, 30, 31, 32, 33]


def test_iteration_generates_scores_learns_and_syncs(fleet):
    gen = fleet.generators.healthy()[0].handle
    prompt_ids, completion = _fixed_sequence(fleet)
    before = ray.get(gen.sequence_logprobs.remote(prompt_ids, completion), timeout=120)
    version_before = fleet.version

    record = run_iteration(fleet, iteration=0)

    assert record["samples"] == 4 * 4
    assert {"objective/correctness", "objective/format", "objective/length"} <= set(record)
    assert (
        record["behaviour_version/min"] == version_before
    )  # rollouts came from the weights before the update
    assert record["train/optimizer_steps"] >= 1
    assert record["train/grad_norm"] > 0
    # the learner's host memory after the step, and the high-water mark (two ranks: the larger one)
    assert 0.1 < record["train/rss_gib"] <= record["train/peak_rss_gib"] + 0.05
    assert record["sync/generators_synced"] == 1
    assert fleet.version == version_before + 1
    assert ray.get(gen.get_stats.remote(), timeout=60)["version"] == fleet.version
    after = ray.get(gen.sequence_logprobs.remote(prompt_ids, completion), timeout=120)
    assert max(abs(a - b) for a, b in zip(before, after, strict=True)) > 1e-4, (
        "generator logprobs unchanged after sync"
    )
    for name in ("time/generate", "time/score", "time/learn", "time/sync"):
        assert record[name] > 0


def test_next_iteration_samples_with_the_synced_weights(fleet):
    record = run_iteration(fleet, iteration=1)
    assert record["behaviour_version/min"] == fleet.version - 1
    assert record["weight_version"] == fleet.version


def test_learner_scores_rollouts_at_their_sampling_temperature(fleet, monkeypatch):
    """Sampled at T=0.5: the learner's log-probs (on-policy, so no extra forward) match the generator's far better
    than those of a learner that scores the same kind of rollouts at T=1 (the bug this guards against), whatever
    state the fleet is in."""
    train = fleet.learners.train

    def scored_at_t1(batch, kl_coef):  # the bug: the rollouts' temperature ignored
        return train(batch.with_columns(temperature=torch.ones_like(batch.temperature)), kl_coef)

    for warm_up in range(3):  # a few updates make the random tiny model peaked, where temperature matters
        run_iteration(fleet, iteration=10 + warm_up)
    fleet.sampling = replace(fleet.sampling, temperature=0.5)
    try:
        right = run_iteration(fleet, iteration=3)
        monkeypatch.setattr(fleet.learners, "train", scored_at_t1)
        wrong = run_iteration(fleet, iteration=4)
    finally:
        fleet.sampling = replace(fleet.sampling, temperature=1.0)
    assert right["train/old_logprobs_forward"] == 0.0
    mismatch, at_t1 = right["train/logprob_mismatch"], wrong["train/logprob_mismatch"]
    # the engines' own bf16/fp32 gap (~0.15 per token on the tiny model) is in both; the temperature error is not
    assert mismatch < 0.6 * at_t1, (mismatch, at_t1)


def test_generator_rejects_a_stale_weight_version(fleet):
    gen = fleet.generators.healthy()[0].handle
    held = ray.get(gen.get_stats.remote(), timeout=60)["version"]
    same = fleet.learners.export_weights(held)  # whatever ran before: the version it already holds
    with pytest.raises(ray.exceptions.RayTaskError, match="not newer"):
        ray.get(gen.update_weights.remote(same), timeout=60)


def test_generator_checks_every_bucket_before_loading(fleet):
    """A bucket that differs from its manifest (a torn or mixed-up transfer) is refused before any weight loads,
    naming the bucket; the generator keeps its version, and the driver marks it stale."""
    member = fleet.generators.healthy()[0]
    sent = fleet.learners.export_weights(fleet.version, bucket_mb=0.25)  # small buckets: several of them
    assert len(sent.manifest.buckets) > 1, "the tiny model must span several buckets for this test"
    buckets = list(sent.buckets)
    flipped = [a.copy() for a in ray.get(buckets[1])]
    flipped[0][flipped[0].size // 2] ^= 1  # one bit of bucket 1 changed in transit: same size, other bytes
    buckets[1] = ray.put(flipped)
    torn = BucketedWeights(replace(sent.manifest, version=sent.version + 1), tuple(buckets))
    with pytest.raises(ray.exceptions.RayTaskError, match="bucket 1 checksum"):
        ray.get(member.handle.update_weights.remote(torn), timeout=60)
    assert ray.get(member.handle.get_stats.remote(), timeout=60)["version"] == sent.version
    stats = push_weights(fleet.generators, torn, deadline_s=60)
    assert stats["generators_stale"] == 1 and member.health is Health.STALE
    assert member not in fleet.generators.healthy()  # a stale member serves nothing
    fleet.refit(member)  # the latest real weights reach it again
    member.health = Health.HEALTHY


def test_a_killed_reward_shard_is_replaced_and_its_chunk_rescored(fleet):
    before = fleet.rewards.pools["rules"].replacements
    victim = fleet.rewards.pools["rules"].healthy()[0]
    ray.kill(victim.handle)
    record = run_iteration(fleet, iteration=2)
    assert fleet.rewards.pools["rules"].replacements == before + 1
    assert record["samples"] == 16  # nothing lost: every rollout scored
    assert len(fleet.rewards.pools["rules"].healthy()) == 1
