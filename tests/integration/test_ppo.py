"""PPO with real actors on a tiny model: critic on its own DeepSpeed group, GAE, KL as a per-token reward penalty."""

import math

import pytest
import torch

from actors.learner.batch import TrainSample
from cluster.loop import run_iteration
from tests.integration.conftest import running_fleet, tiny_config

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
        assert math.isfinite(r["train/returns/mean"])
        assert r["train/entropy"] > 0
        assert "advantage/abs_mean" not in r  # advantages are per token, made by the learner
    assert records[-1]["train/optimizer_steps"] == 3
    assert records[-1]["weight_version"] == 3
    # After the first update the policy moves away from the reference, so the adaptive coefficient moves.
    assert records[-1]["train/kl_seq"] != 0
    assert ppo_fleet.kl.coef != 0.05


def test_critic_loss_decreases_on_a_fixed_batch(ppo_fleet):
    batch = ppo_fleet.prompts.batch(50)
    rollouts = ray_get_rollouts(ppo_fleet, batch)
    samples = [
        TrainSample(r.prompt.token_ids, r.response_ids, 0.0, r.logprobs, reward=float(i % 3))
        for i, r in enumerate(rollouts)
    ]
    returns = [torch.full((len(s.response_ids),), s.reward) for s in samples]
    critic = ppo_fleet.critic
    losses = [critic.value_loss_on(samples, returns)]
    for _ in range(3):
        values = critic.values(samples)
        fresh = [
            TrainSample(s.prompt_ids, s.response_ids, 0.0, s.behaviour_logprobs, values=v)
            for s, v in zip(samples, values, strict=True)
        ]
        critic.train_critic(fresh, returns)
        losses.append(critic.value_loss_on(samples, returns))
    assert losses[-1] < losses[0], losses


def ray_get_rollouts(fleet, batch):
    chunks = fleet.generators.map_chunks("generate", batch.prompts, fleet.sampling)
    return [r for c in chunks for r in c]
