"""Translates the Hydra config into the plain specs actors are built from (actors never import cluster/)."""

from __future__ import annotations

from dataclasses import replace

from actors.generator.actor import GeneratorSpec
from actors.learner.engine import LearnerSpec, LoraSpec
from cluster.config import TroupeConfig

# How each algorithm turns rewards into per-token advantages (see actors/learner/pg_update.py).
ADVANTAGE_MODE = {
    "grpo": "sequence",
    "rloo": "sequence",
    "reinforce_pp": "returns",
    "reinforce_pp_baseline": "returns",
    "ppo": "gae",
}


def generator_spec(cfg: TroupeConfig, model_path: str) -> GeneratorSpec:
    g = cfg.generator
    return GeneratorSpec(
        model_path=model_path,
        backend=g.backend,
        dtype=g.dtype,
        max_model_len=g.max_model_len,
        seed=cfg.run.seed,
        enforce_eager=g.enforce_eager,
        gpu_memory_utilization=g.gpu_memory_utilization,
        tensor_parallel_size=g.tensor_parallel_size,
        trust_remote_code=cfg.model.trust_remote_code,
    )


def learner_spec(cfg: TroupeConfig, model_path: str, total_steps: int | None = None) -> LearnerSpec:
    lc, a = cfg.learner, cfg.algo
    samples = cfg.task.prompts_per_iteration * cfg.generator.samples_per_prompt
    if a.name.startswith("dpo"):
        samples = (
            cfg.task.prompts_per_iteration
        )  # at most one pair per prompt; only a nominal size for DeepSpeed
    if total_steps is None:
        total_steps = cfg.run.iterations * lc.epochs * lc.mini_batches
    return LearnerSpec(
        model_path=model_path,
        world_size=lc.world_size,
        zero_stage=lc.zero_stage,
        dtype=lc.dtype,
        lr=lc.lr,
        weight_decay=lc.weight_decay,
        grad_clip=lc.grad_clip,
        lr_schedule=lc.lr_schedule,
        warmup_steps=lc.warmup_steps,
        min_lr_ratio=lc.min_lr_ratio,
        total_steps=total_steps,
        offload_optimizer=lc.offload_optimizer,
        offload_params=lc.offload_params,
        micro_batch_size=lc.micro_batch_size,
        samples_per_rank=max(1, samples // lc.world_size),
        mini_batches=lc.mini_batches,
        epochs=lc.epochs,
        gradient_checkpointing=lc.gradient_checkpointing,
        clip_eps=a.clip_eps,
        kl_coef=a.kl_coef,
        kl_estimator=a.kl_estimator,
        loss_agg=a.loss_agg,
        advantage_mode=ADVANTAGE_MODE.get(a.name, "sequence"),
        kl_in_reward=a.kl_in_reward,
        gamma=a.gamma,
        lam=a.lam,
        whiten_advantages=a.whiten_advantages,
        dpo_beta=a.dpo_beta,
        dpo_loss=a.dpo_loss,
        dpo_label_smoothing=a.label_smoothing,
        dpo_reference=a.dpo_reference,
        lora=LoraSpec(
            enabled=lc.lora.enabled,
            r=lc.lora.r,
            alpha=lc.lora.alpha,
            dropout=lc.lora.dropout,
            target_modules=tuple(lc.lora.target_modules),
        ),
        export_dtype=cfg.generator.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        seed=cfg.run.seed,
    )


def needs_reference(cfg: TroupeConfig) -> bool:
    a = cfg.algo
    if a.name.startswith("dpo"):
        return a.dpo_reference == "initial"
    return a.kl_coef > 0


def critic_spec(cfg: TroupeConfig, policy: LearnerSpec) -> LearnerSpec:
    c = cfg.critic
    return replace(
        policy,
        world_size=c.world_size,
        zero_stage=c.zero_stage,
        lr=c.lr,
        micro_batch_size=c.micro_batch_size or policy.micro_batch_size,
        samples_per_rank=max(1, policy.samples_per_rank * policy.world_size // c.world_size),
        value_clip=c.value_clip,
        lora=LoraSpec(),  # the critic trains its full body
        offload_params=False,
    )
