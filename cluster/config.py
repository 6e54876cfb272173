"""Typed schema of the Hydra config (conf/): dataclasses registered as structured configs.

A wrong key or a value of the wrong type fails at start-up naming the key (OmegaConf struct mode); the cross-field
checks in `validate` name the keys they relate. No Ray imports here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class RunConfig:
    name: str = "troupe"
    output_dir: str = "outputs/${run.name}"
    iterations: int = 3
    seed: int = 0
    progress_bar: bool = True
    print_table: bool = True
    save_checkpoint: bool = True


@dataclass
class RayConfig:
    address: str | None = (
        None  # None: start an embedded local Ray; "auto" or "ray://host:port": join a cluster
    )
    num_cpus: int | None = None  # for the embedded local Ray only
    include_dashboard: bool = False
    dashboard_host: str = "127.0.0.1"  # loopback unless the user opts in
    object_store_memory: int | None = None
    actor_timeout_s: float = 600.0


@dataclass
class ModelConfig:
    policy: str = "builtin:smollm2-135m-instruct"  # hub id, local folder, or builtin:*
    trust_remote_code: bool = False


@dataclass
class TaskConfig:
    name: str = "arithmetic"
    prompts_per_iteration: int = 8
    min_operand: int = 1
    max_operand: int = 9
    operations: str = "+-"
    seed: int = 0


@dataclass
class GeneratorConfig:
    backend: str = "vllm"  # vllm | hf
    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    omp_threads: int = 1
    dtype: str = "auto"  # auto | bfloat16 | float32 (auto: bf16 on GPUs and AMX/AVX512-BF16 CPUs)
    max_model_len: int = 1024
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.5
    tensor_parallel_size: int = 1
    kv_cache_gib: int = 1  # vLLM-CPU KV cache size
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128


@dataclass
class RewardConfig:
    shards: int = 1  # replicas of the rule shard; a batch is split across them
    num_cpus: float = 0.0  # rule objectives are cheap; shards that host a backbone need real CPUs/GPUs
    batch_size: int = 64
    # {objective: {param: value}} hosted by the shards; see actors/reward/rules.py
    objectives: dict[str, Any] = field(
        default_factory=lambda: {
            "correctness": {},
            "format": {},
            "length": {"target_tokens": 64, "max_tokens": 256},
        }
    )
    weights: dict[str, float] = field(
        default_factory=lambda: {"correctness": 1.0, "format": 0.2, "length": 0.1}
    )


@dataclass
class LearnerConfig:
    world_size: int = 2
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    omp_threads: int = 1
    zero_stage: int = 2
    dtype: str = "auto"  # auto | bfloat16 | float32 (auto: bf16 on GPUs and AMX/AVX512-BF16 CPUs)
    lr: float = 1e-6
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 4
    mini_batches: int = 1
    epochs: int = 1
    gradient_checkpointing: bool = False


@dataclass
class AlgoConfig:
    name: str = "grpo"  # grpo | rloo | reinforce_pp | reinforce_pp_baseline (conf/algo/*.yaml)
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    loss_agg: str = "seq_mean_token_mean"
    scale_by_std: bool = True


@dataclass
class TroupeConfig:
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)


def register() -> None:
    ConfigStore.instance().store(name="troupe_schema", node=TroupeConfig)


class ConfigError(ValueError):
    pass


def validate(cfg: TroupeConfig) -> None:
    """Cross-field checks, each naming the keys involved."""
    g, lr, t = cfg.generator, cfg.learner, cfg.task
    _one_of("generator.backend", g.backend, ("vllm", "hf"))
    _one_of("learner.dtype", lr.dtype, ("auto", "bfloat16", "float32"))
    _one_of("generator.dtype", g.dtype, ("auto", "bfloat16", "float32", "float16"))
    _one_of("algo.name", cfg.algo.name, ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"))
    _one_of("algo.kl_estimator", cfg.algo.kl_estimator, ("k1", "k2", "k3"))
    _one_of("algo.loss_agg", cfg.algo.loss_agg, ("token_mean", "seq_mean_token_mean"))
    _one_of("task.name", t.name, ("arithmetic",))
    if lr.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"learner.zero_stage must be 0-3, got {lr.zero_stage}")
    for key, value in (
        ("run.iterations", cfg.run.iterations),
        ("task.prompts_per_iteration", t.prompts_per_iteration),
        ("generator.replicas", g.replicas),
        ("generator.samples_per_prompt", g.samples_per_prompt),
        ("reward.shards", cfg.reward.shards),
        ("learner.world_size", lr.world_size),
        ("learner.micro_batch_size", lr.micro_batch_size),
        ("learner.mini_batches", lr.mini_batches),
        ("learner.epochs", lr.epochs),
    ):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if cfg.algo.name == "grpo" and g.samples_per_prompt < 2:
        raise ConfigError(
            "generator.samples_per_prompt must be >= 2 for GRPO (advantages are relative within a group)"
        )
    samples = t.prompts_per_iteration * g.samples_per_prompt
    if samples % lr.world_size:
        raise ConfigError(
            f"task.prompts_per_iteration x generator.samples_per_prompt = {samples} must divide by learner.world_size={lr.world_size}"
        )
    per_rank = samples // lr.world_size
    if per_rank % (lr.mini_batches * lr.micro_batch_size):
        raise ConfigError(
            f"samples per learner rank ({per_rank}) must divide by learner.mini_batches x learner.micro_batch_size "
            f"= {lr.mini_batches} x {lr.micro_batch_size}"
        )
    unknown = sorted(set(cfg.reward.weights) - set(cfg.reward.objectives))
    if unknown:
        raise ConfigError(f"reward.weights names objectives not in reward.objectives: {unknown}")
    if g.max_new_tokens >= g.max_model_len:
        raise ConfigError(
            f"generator.max_new_tokens ({g.max_new_tokens}) must be < generator.max_model_len ({g.max_model_len})"
        )


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")
