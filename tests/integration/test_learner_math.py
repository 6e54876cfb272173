"""The learner's math on real DeepSpeed ranks (tiny model), in bf16 and fp32 explicitly, whatever the host CPU:
one optimizer step's gradient does not depend on micro-batch size or world size (global token mean), and the
policy, critic and DPO paths run in both dtypes."""

import math
from dataclasses import replace

import pytest
import ray
import torch

from tests.integration.conftest import tiny_config
from troupe.actors.learner.batch import RolloutBatch, pad_sequences
from troupe.actors.learner.dpo import PreferencePair
from troupe.actors.weight_buckets import unpack
from troupe.cluster.fleet.learners import LearnerGroup, critic_group, critic_setup, policy_setup
from troupe.cluster.run.runtime import learner_env

pytestmark = pytest.mark.integration


def _batch(group_size: int = 4) -> RolloutBatch:
    gen = torch.Generator().manual_seed(0)
    # two prompt groups of 4 samples: the learner packs each group's shared prompt once
    prompts = [tuple(torch.randint(100, 1000, (5 + 3 * g,), generator=gen).tolist()) for g in range(2)]
    prompts = [p for p in prompts for _ in range(group_size)]
    lengths = [9, 2, 5, 1, 7, 3, 4, 6]  # uneven: a per-micro-batch mean would weigh tokens differently
    responses = [tuple(torch.randint(100, 1000, (n,), generator=gen).tolist()) for n in lengths]
    ids, att, action = pad_sequences(prompts, responses, pad_id=0)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 0.2, 0.0, 0.9])
    token_rewards = torch.zeros(action.shape)
    n = len(rewards)
    return RolloutBatch(
        ids,
        att,
        action,
        torch.zeros(action.shape),
        rewards,
        token_rewards,
        torch.full((n,), 0.8),
        torch.zeros(n, dtype=torch.long),
        group_size,
    )


def _group(cfg, model_path, role_critic=False):
    setup = policy_setup(cfg, model_path)
    if role_critic:
        setup = critic_setup(cfg, setup)
        group = critic_group(setup, learner_env(setup.train), cfg.ray.actor_timeout_s)
    else:
        group = LearnerGroup(setup, learner_env(setup.train), cfg.ray.actor_timeout_s)
    group.wait_ready()
    return group


def _one_step(model_path, dtype, world, micro, zero=2, share_prompts=True, batch=None, extra=()):
    """One optimizer step on the fixed batch: (metrics, the updated weights as float32)."""
    cfg = tiny_config(
        *extra,
        f"learner.dtype={dtype}",
        f"learner.world_size={world}",
        f"learner.micro_batch_size={micro}",
        f"learner.zero_stage={zero}",
        "learner.num_cpus=0.5",
        "learner.lr=1e-3",
        "learner.grad_clip=1000.0",
        "algo.kl_coef=0.0",
        "algo.loss_agg=token_mean",
        f"generator.dtype={dtype}",
        f"learner.share_prompts={share_prompts}",
    )
    group = _group(cfg, model_path)
    try:
        metrics, _ = group.train(batch or _batch(), kl_coef=0.0)
        bundle = group.export_weights(1)
        weights = dict(unpack(bundle.manifest, ray.get(list(bundle.buckets), timeout=300)))
    finally:
        group.shutdown()
    metrics = {**metrics, "compiled_layers": group.info[0]["compiled_layers"]}
    return metrics, {k: v.float() for k, v in weights.items()}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_token_mean_gradient_same_for_micro_batch_and_world_size_bf16_and_fp32(
    ray_session, tiny_model_path, dtype
):
    whole, w_whole = _one_step(tiny_model_path, dtype, world=1, micro=8)
    runs = {
        "micro-batch 1": _one_step(tiny_model_path, dtype, world=1, micro=1),
        "2 ranks": _one_step(tiny_model_path, dtype, world=2, micro=1),
        "2 ranks, ZeRO-3": _one_step(tiny_model_path, dtype, world=2, micro=3, zero=3),  # full-logits path
        "unpacked prompts": _one_step(tiny_model_path, dtype, world=1, micro=2, share_prompts=False),
    }
    assert whole["grad_norm"] > 0 and math.isfinite(whole["grad_norm"])
    # on-policy (one epoch, one mini-batch, version 0): no extra forward for the old log-probs
    assert whole["old_logprobs_forward"] == 0.0
    assert whole["prompts_packed"] == 1.0 and runs["unpacked prompts"][0]["prompts_packed"] == 0.0
    tol = 2e-2 if dtype == "bfloat16" else 1e-4
    for name, (metrics, weights) in runs.items():
        assert metrics["grad_norm"] == pytest.approx(whole["grad_norm"], rel=tol), name
        # Adam's first step moves each weight by ~lr * sign(g): equal weights mean equal gradient directions.
        moved = torch.cat([(weights[k] - w_whole[k]).abs().flatten() for k in w_whole])
        limit = 5e-3 if dtype == "bfloat16" else 1e-4  # bf16 weights round at ~4e-3 near 1
        assert float((moved > limit).float().mean()) < 1e-3, name


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_compiled_layers_give_the_eager_update_bf16_and_fp32(ray_session, tiny_model_path, dtype):
    """learner.compile=true compiles every decoder layer with dynamic shapes: micro-batches of 3 rows (packed
    groups and a remainder of other lengths) run through one compiled graph. In fp32 the step equals eager's. In
    bf16 the tiny model's peaky logits (std ~8) make any two roundings differ by nats (eager bf16's gradient norm
    is off fp32's by ~40% here), so compiled bf16 must land as close to fp32 as eager bf16 does."""
    from transformers import AutoConfig

    eager, w_eager = _one_step(tiny_model_path, dtype, world=1, micro=8)
    compiled, w_compiled = _one_step(
        tiny_model_path, dtype, world=1, micro=3, extra=("learner.compile=true",)
    )
    assert eager["compiled_layers"] == 0
    assert compiled["compiled_layers"] == AutoConfig.from_pretrained(tiny_model_path).num_hidden_layers
    assert (
        compiled["compile/graphs"] >= 1 and "compile/graphs" not in eager
    )  # compiled, not an eager fallback
    assert compiled["prompts_packed"] == 1.0 and math.isfinite(compiled["grad_norm"])
    if dtype == "float32":
        assert compiled["grad_norm"] == pytest.approx(eager["grad_norm"], rel=1e-4)
        moved = torch.cat([(w_compiled[k] - w_eager[k]).abs().flatten() for k in w_eager])
        assert float((moved > 1e-4).float().mean()) < 1e-3
    else:
        exact = _one_step(tiny_model_path, "float32", world=1, micro=8)[0]["grad_norm"]
        eager_off = abs(eager["grad_norm"] - exact)
        assert abs(compiled["grad_norm"] - exact) <= 2 * eager_off + 0.05 * exact


def _kl_after_one_update(model_path, dtype, world, zero, extra=()):
    """(each rank's setup info, the metrics of a second on-policy update, whose KL to the reference is > 0)."""
    cfg = tiny_config(
        *extra,
        f"learner.dtype={dtype}",
        f"learner.world_size={world}",
        f"learner.zero_stage={zero}",
        "learner.micro_batch_size=2",
        "learner.num_cpus=0.5",
        "learner.lr=1e-3",
        "learner.grad_clip=1000.0",
        "algo.kl_coef=0.1",
        "algo.loss_agg=token_mean",
        f"generator.dtype={dtype}",
    )
    group = _group(cfg, model_path)
    try:
        group.train(_batch(), kl_coef=0.1)
        second, _ = group.train(
            replace(_batch(), weight_version=torch.ones(8, dtype=torch.long)), kl_coef=0.1
        )
        return group.info, second
    finally:
        group.shutdown()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_zero3_shards_policy_and_reference_from_the_start_bf16_and_fp32(ray_session, tiny_model_path, dtype):
    """ZeRO-3 (learner.zero_init, the default): each of 2 ranks holds about half of the policy's and of the frozen
    reference's weights, and the KL to that sharded reference after one update is the KL to a whole one (ZeRO-2, one
    rank). learner.zero_init=false keeps the old layout: a whole reference on every rank."""
    whole_info, whole = _kl_after_one_update(tiny_model_path, dtype, world=1, zero=2)
    sharded_info, sharded = _kl_after_one_update(tiny_model_path, dtype, world=2, zero=3)
    legacy_info, legacy = _kl_after_one_update(
        tiny_model_path, dtype, world=2, zero=3, extra=("learner.zero_init=false",)
    )
    assert whole_info[0]["held"] == 1.0 and whole_info[0]["reference_held"] == 1.0
    for rank in sharded_info:
        assert 0.4 < rank["held"] < 0.6 and 0.4 < rank["reference_held"] < 0.6, rank
    for rank in legacy_info:
        assert 0.4 < rank["held"] < 0.6 and rank["reference_held"] == 1.0, rank
    assert whole["kl"] > 1e-4, "no KL after an update: the comparison would say nothing"
    tol = 2e-2 if dtype == "bfloat16" else 1e-3  # bf16 before the buffers fix: 0.56 vs 0.85
    assert sharded["kl"] == pytest.approx(whole["kl"], rel=tol)
    assert legacy["kl"] == pytest.approx(whole["kl"], rel=tol)


def _critic_losses(model_path, dtype, world, zero):
    cfg = tiny_config(
        f"learner.dtype={dtype}",
        "learner.micro_batch_size=2",
        "learner.num_cpus=0.5",
        "algo=ppo",
        "critic.lr=1e-3",
        f"critic.world_size={world}",
        f"critic.zero_stage={zero}",
    )
    critic = _group(cfg, model_path, role_critic=True)
    try:
        batch = _batch()
        returns = batch.action_mask * batch.rewards[:, None]
        losses = []
        for _ in range(2):
            values = batch.place(critic.values(batch))
            losses.append(
                critic.train_critic(batch.with_columns(values=values, returns=returns))["value_loss"]
            )
        return critic.info, losses
    finally:
        critic.shutdown()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_zero3_critic_is_built_partitioned_bf16_and_fp32(ray_session, tiny_model_path, dtype):
    """The critic's body is loaded under zero.Init and its value head (made after it) partitioned by DeepSpeed:
    each of 2 ranks holds about half, and two updates give the value losses of one whole ZeRO-2 rank."""
    whole_info, whole = _critic_losses(tiny_model_path, dtype, world=1, zero=2)
    sharded_info, sharded = _critic_losses(tiny_model_path, dtype, world=2, zero=3)
    assert whole_info[0]["held"] == 1.0 and all(0.4 < r["held"] < 0.6 for r in sharded_info), sharded_info
    assert whole[1] != whole[0], "the first update must change the values for the second loss to say anything"
    tol = 2e-2 if dtype == "bfloat16" else 1e-4
    assert sharded == pytest.approx(whole, rel=tol)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_stale_rows_are_weighted_by_the_truncated_importance_ratio_bf16_and_fp32(
    ray_session, tiny_model_path, dtype
):
    """Rows from older weights (async) whose behaviour log-probs are far below the learner's: every token's weight
    is the cap, so the policy loss is exactly tis_cap times the uncorrected one; fresh rows are not weighted."""
    base = _batch()
    stale = replace(
        base,
        weight_version=torch.full((8,), -1),
        behaviour_logprobs=torch.full(base.action_mask.shape, -1000.0),
    )
    corrected, _ = _one_step(tiny_model_path, dtype, 1, 8, batch=stale, extra=("algo.tis_cap=2.0",))
    plain, _ = _one_step(tiny_model_path, dtype, 1, 8, batch=stale, extra=("algo.tis_cap=0",))
    fresh, _ = _one_step(
        tiny_model_path, dtype, 1, 8, batch=replace(stale, weight_version=torch.zeros(8, dtype=torch.long))
    )
    assert corrected["stale_rows_frac"] == 1.0 and corrected["old_logprobs_forward"] == 1.0
    assert corrected["tis/weight_mean"] == pytest.approx(2.0) and corrected[
        "tis/truncated_frac"
    ] == pytest.approx(1.0)
    assert abs(plain["pg_loss"]) > 1e-4, "the uncorrected loss is ~0: the comparison would say nothing"
    assert corrected["pg_loss"] == pytest.approx(
        2.0 * plain["pg_loss"], rel=1e-3 if dtype == "float32" else 2e-2
    )
    assert "tis/weight_mean" not in plain  # algo.tis_cap=0: no correction
    # tis_scope=stale: fresh rows are not corrected
    assert fresh["tis/weight_mean"] == 1.0 and fresh["tis/truncated_frac"] == 0.0
    assert fresh["stale_rows_frac"] == 0.0


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_critic_and_dpo_train_in_bf16_and_fp32(ray_session, tiny_model_path, dtype):
    cfg = tiny_config(
        f"learner.dtype={dtype}",
        "learner.world_size=1",
        "learner.micro_batch_size=2",
        "algo=ppo",
        "critic.lr=1e-3",
        "learner.num_cpus=0.5",
    )
    critic = _group(cfg, tiny_model_path, role_critic=True)
    try:
        batch = _batch()
        values = batch.place(critic.values(batch))
        assert torch.isfinite(values).all()
        returns = batch.action_mask * batch.rewards[:, None]
        stats = critic.train_critic(batch.with_columns(values=values, returns=returns))
        assert math.isfinite(stats["value_loss"]) and stats["value_loss"] > 0
    finally:
        critic.shutdown()
    dpo_cfg = replace(
        tiny_config(
            f"learner.dtype={dtype}", "learner.world_size=1", "algo=dpo_online", "learner.num_cpus=0.5"
        )
    )
    learner = _group(dpo_cfg, tiny_model_path)
    try:
        pairs = [PreferencePair((5, 6, 7), (8, 9, 10), (11, 12)), PreferencePair((5, 6), (13,), (14, 15, 16))]
        first = learner.train_dpo(pairs)
        second = learner.train_dpo(pairs)
        assert math.isfinite(first["loss"]) and first["loss"] == pytest.approx(math.log(2), abs=1e-3)
        assert second["loss"] < first["loss"] + 1e-6
    finally:
        learner.shutdown()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_correction_modes_on_real_ranks_bf16_and_fp32(ray_session, tiny_model_path, dtype):
    """Rows whose behaviour log-probs are far below the learner's (ratio ~e^20 after the clamp): sequence TIS
    weighs every token by the cap; geometric masking and IcePop leave every token out, so the step has no
    gradient; with the dual clip and clip-higher on, the step stays finite."""
    base = _batch()
    stale = replace(
        base,
        weight_version=torch.full((8,), -1),
        behaviour_logprobs=torch.full(base.action_mask.shape, -1000.0),
    )
    off = ("algo.tis_cap=0",)
    plain, _ = _one_step(tiny_model_path, dtype, 1, 8, batch=stale, extra=off)
    seq, _ = _one_step(tiny_model_path, dtype, 1, 4, batch=stale, extra=("algo.correction=seq_tis",))
    assert seq["tis/weight_mean"] == pytest.approx(2.0) and seq["tis/truncated_frac"] == pytest.approx(1.0)
    assert seq["pg_loss"] == pytest.approx(2.0 * plain["pg_loss"], rel=1e-3 if dtype == "float32" else 2e-2)
    for mode in ("seq_mask", "geo_mask", "icepop"):
        extra = (f"algo.correction={mode}", "algo.tis_scope=all")
        masked, _ = _one_step(tiny_model_path, dtype, 1, 4, batch=stale, extra=extra)
        assert masked["tis/masked_frac"] == pytest.approx(1.0), mode
        assert masked["pg_loss"] == 0.0 and masked["grad_norm"] == 0.0, mode  # no token has a gradient
        assert masked["mismatch/kl"] > 1e6, mode  # the clamped k3 of a log-ratio of 20
    clipped, _ = _one_step(
        tiny_model_path, dtype, 1, 4, batch=stale,
        extra=(*off, "algo.clip_eps_high=0.28", "algo.dual_clip=3.0"),
    )  # fmt: skip
    assert math.isfinite(clipped["pg_loss"]) and math.isfinite(clipped["grad_norm"])  # the math: test_grpo.py
