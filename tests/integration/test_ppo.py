"""PPO with real actors on a tiny model: critic on its own DeepSpeed group, GAE, KL as a per-token reward penalty."""

import math

import pytest

from tests.integration.conftest import running_fleet, tiny_config
from troupe.actors.learner.batch import from_scored
from troupe.actors.protocol import RewardBreakdown, ScoredRollout
from troupe.cluster.run.loop import run_iteration

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ppo_fleet(ray_session, tiny_model_path):
    cfg = tiny_config(
        "algo=ppo", "critic.lr=1e-3", "algo.kl_coef=0.05", "algo.kl_target=1.0", "algo.kl_horizon=100"
    )
    with running_fleet(cfg, tiny_model_path) as f:
        yield f


def test_ppo_runs_three_iterations_with_critic_and_adaptive_kl(ppo_fleet):
    records = [run_iteration(ppo_fleet, i) for i in range(3)]
    for r in records:
        assert r["algo"] == "ppo"
        assert math.isfinite(r["critic/value_loss"]) and r["critic/value_loss"] > 0
        assert r["critic/rss_gib"] > 0.1  # the critic's ranks report their memory too
        assert math.isfinite(r["train/returns/mean"])
        assert r["train/entropy"] > 0
        assert "advantage/abs_mean" not in r  # advantages are per token, made by the learner
    assert records[-1]["train/optimizer_steps"] == 3
    assert records[-1]["weight_version"] == 3
    # After the first update the policy moves away from the reference, so the adaptive coefficient moves.
    assert records[-1]["train/kl_seq"] != 0
    assert ppo_fleet.kl.coef != 0.05


def test_critic_loss_decreases_on_a_fixed_batch(ppo_fleet):
    rollouts = ray_get_rollouts(ppo_fleet, ppo_fleet.prompts.batch(50))
    scored = [ScoredRollout(r, RewardBreakdown(float(i % 3), {})) for i, r in enumerate(rollouts)]
    batch = from_scored(scored, ppo_fleet.pad_id, ppo_fleet.sampling.n)
    batch = batch.with_columns(returns=batch.action_mask * batch.rewards[:, None])
    critic = ppo_fleet.critic
    losses = [critic.value_loss_on(batch)]
    for _ in range(3):
        critic.train_critic(batch.with_columns(values=batch.place(critic.values(batch))))
        losses.append(critic.value_loss_on(batch))
    assert losses[-1] < losses[0], losses


def ray_get_rollouts(fleet, batch):
    chunks = fleet.generators.map_chunks("generate", batch.prompts, fleet.sampling)
    return [r for c in chunks for r in c]
