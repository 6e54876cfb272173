"""Typed config of the trained roles (policy learner, PPO critic) and of the algorithm they run.

These dataclasses are the Hydra schema's `learner`, `critic` and `algo` groups (composed by cluster/config/schema.py) and
also what the ranks are built from: no field-by-field copies between config and actor. No Ray imports here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from troupe.actors.field_domains import bounded, one_of, resource

# how per-token losses become the step's loss (algo.loss_agg; actors/learner/step.py)
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
# off-policy corrections (actors/learner/off_policy.py); the masking ones take bounds, the others a cap
CORRECTIONS = ("token_tis", "seq_tis", "seq_mask", "geo_mask", "icepop")
MASKING = ("seq_mask", "geo_mask", "icepop")
# |log-ratio| bound before exp: e^20 ~ 5e8 is finite in fp32 and bf16 (verl and SkyRL clamp at 20 too)
LOG_RATIO_CLAMP = 20.0
# bound on k3's value: exp(20) - 21 ~ 5e8 is finite but lets one token steer the step (verl clamps k3 at 10)
KL_VALUE_CLAMP = 10.0


@dataclass
class LoraConfig:
    enabled: bool = False  # only adapter weights train; generators receive merged full weights
    r: int = bounded(16, ge=1)
    alpha: int = bounded(32, ge=1)
    # 0 for RL: with dropout the on-policy ratio is not exactly 1, and the old/current log-probs disagree.
    dropout: float = bounded(0.0, ge=0, lt=1)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class LearnerConfig:
    """DeepSpeed, optimiser and micro-batching of one trained role."""

    # One rank with both threads on a single CPU node: 1.16x faster than 2 ranks x 1 thread (bench/learn_phase.py:
    # bigger matmuls, no gradient reduction); GPUs and clusters set world_size and omp_threads for their devices.
    world_size: int = bounded(1, ge=1)
    num_cpus: float = resource(0.5)
    num_gpus: float = resource(0.0)
    omp_threads: int = bounded(2, ge=1)
    zero_stage: int = one_of(0, 1, 2, 3, default=2)
    dtype: str = one_of("auto", "bfloat16", "float32")  # auto: bf16 on GPUs and AMX/AVX512-BF16 CPUs
    lr: float = bounded(1e-6, gt=0)
    weight_decay: float = bounded(0.0, ge=0)
    adam_betas: list[float] = bounded(factory=lambda: [0.9, 0.999], ge=0, lt=1)  # each
    grad_clip: float = bounded(1.0, ge=0)  # 0: no clipping
    micro_batch_size: int = bounded(4, ge=1)
    mini_batches: int = bounded(1, ge=1)  # optimizer steps per epoch over the iteration's samples
    epochs: int = bounded(1, ge=1)
    gradient_checkpointing: bool = False
    # torch.compile each decoder layer (dynamic shapes: one graph for every batch length). On CPU it fuses the
    # elementwise work between matmuls (bench/learn_phase.py); the first step pays the compile (~30 s on 2 cores).
    compile: bool = False
    lr_schedule: str = one_of("constant", "linear", "cosine")  # (after warmup_steps of linear warm-up)
    warmup_steps: int = bounded(0, ge=0)
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)  # floor of the linear/cosine decay, as a fraction of lr
    offload_optimizer: bool = False  # ZeRO-Offload (DeepSpeedCPUAdam; JIT-built once, ~40 s)
    offload_params: bool = False  # ZeRO-3 only
    # ZeRO-3: build each weight already partitioned (deepspeed.zero.Init) and shard the frozen reference too, so no
    # rank holds a full copy; false: every rank loads the whole model first and keeps a whole reference (for models
    # whose own init code zero.Init cannot run)
    zero_init: bool = True
    # response tokens per chunk of the LM head + log-softmax (bounds logits memory)
    logprob_chunk: int = bounded(1024, ge=1)
    # Pack each prompt group into one sequence (the prompt once, then its responses, each attending to the prompt
    # and itself): the prompt's forward and backward run once per group. Checked against the unpacked result.
    # Micro-batches then hold whole groups: micro_batch_size // samples_per_prompt of them, at least one.
    share_prompts: bool = True
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class CriticConfig:
    """PPO's value model: its own DeepSpeed group, initialised from the policy's body plus a value head.

    Unset keys (None) take the learner's value."""

    world_size: int = bounded(1, ge=1)
    # phases run one after another on CPU; give it real CPUs/GPUs on a cluster
    num_cpus: float = resource(0.0)
    num_gpus: float = resource(0.0)
    colocate: bool = False  # GPU: share the learner ranks' placement bundles (fractional GPUs each)
    # CPU: the critic runs while the policy ranks wait, so it may use both cores
    omp_threads: int = bounded(2, ge=1)
    zero_stage: int = one_of(0, 1, 2, 3, default=2)
    lr: float = bounded(1e-5, gt=0)
    micro_batch_size: int | None = bounded(None, ge=1)
    value_clip: float = bounded(0.2, ge=0)  # 0: no clipping

    def train_config(self, policy: LearnerConfig) -> LearnerConfig:
        """The DeepSpeed settings the critic ranks run with: the policy's, with the critic's own keys."""
        return replace(
            policy,
            world_size=self.world_size,
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            omp_threads=self.omp_threads,
            zero_stage=self.zero_stage,
            lr=self.lr,
            micro_batch_size=self.micro_batch_size or policy.micro_batch_size,
            offload_params=False,
            lora=LoraConfig(),  # the critic trains its full body
        )


@dataclass
class AlgoConfig:
    """An algorithm as typed data (conf/algo/*.yaml sets these); adding one is a YAML file plus, if its
    advantages are new math, one function registered in actors/learner/advantages.py."""

    name: str = "grpo"  # a label for metrics and logs; behaviour comes from the fields below
    update: str = one_of("policy_gradient", "dpo")
    # rollouts (generate + score each iteration) | dataset (offline preference file)
    source: str = one_of("rollouts", "dataset")
    # How rewards become per-token advantages: a name registered in actors/learner/advantages.py
    # (group, rloo, returns, gae, ...). gae needs critic=true.
    # a registered name (actors/learner/advantages.py), an import path, or (Python API) an Estimator / function
    estimator: Any = "group"
    estimator_args: dict[str, float] = field(
        default_factory=dict
    )  # extra numbers a registered estimator reads
    critic: bool = False
    scale_by_std: bool = True  # group: divide by the group's std (false: Dr. GRPO)
    group_baseline: bool = (
        False  # returns: remove each prompt group's mean reward first (REINFORCE++-baseline)
    )
    whiten_advantages: bool = False  # (x - mean) / std over the global batch, after the estimator
    gamma: float = bounded(1.0, ge=0, le=1)
    lam: float = bounded(0.95, ge=0, le=1)
    clip_eps: float = bounded(0.2, gt=0)
    # DAPO's clip-higher: the ratio's upper clip 1 + clip_eps_high (None: clip_eps); DAPO uses 0.28 with 0.2
    clip_eps_high: float | None = bounded(None, gt=0)
    # dual clip (Ye et al. 2020): a negative advantage's loss is capped at -dual_clip * A (None: off; verl uses 3)
    dual_clip: float | None = bounded(None, gt=1)
    # |log pi - log pi_other| bound before exp, in the ratio, every KL estimator and the off-policy weights
    log_ratio_clamp: float = bounded(LOG_RATIO_CLAMP, gt=0, le=LOG_RATIO_CLAMP)
    kl_coef: float = bounded(0.0, ge=0)  # 0: no reference model is loaded
    kl_estimator: str = one_of("k1", "k2", "k3", default="k3")  # Schulman's estimators
    # loss (a loss term) | reward (-kl_coef * KL_t in each token's reward)
    kl_placement: str = one_of("loss", "reward")
    kl_target: float | None = bounded(None, gt=0)  # adaptive KL (Ziegler et al.): None keeps kl_coef fixed
    kl_horizon: int = bounded(10000, ge=1)
    # token_mean: over every response token of the optimizer step (all micro-batches and ranks);
    # seq_mean_token_mean: each sequence's token mean, averaged over the step's sequences;
    # seq_mean_token_sum_norm: token sums / (sequences x generator.max_new_tokens), a constant (Dr. GRPO).
    loss_agg: str = one_of(*LOSS_AGGREGATIONS, default="seq_mean_token_mean")
    # Off-policy correction (actors/learner/off_policy.py): each token's policy loss is weighted by a function of
    # rho = pi_old / pi_behaviour, pi_old being the learner's log-probs before this update and pi_behaviour the
    # generator's. It corrects rollouts from older weights (run.mode=async) and the engine/learner mismatch.
    # token_tis: min(rho_t, tis_cap) | seq_tis: min(prod rho_t, tis_cap) per row | seq_mask: prod rho_t per row, or
    # 0 outside [correction_low, correction_high] (TRL's sequence_mask) | geo_mask: a row whose geometric mean rho is
    # outside the bounds is left out | icepop: rho_t, or 0 outside the bounds.
    correction: str = one_of(*CORRECTIONS)
    tis_cap: float = bounded(2.0, ge=0)  # token_tis / seq_tis; 0: no correction
    # seq_mask / geo_mask / icepop bounds on rho (None: the mode's default, off_policy.DEFAULT_BOUNDS)
    correction_low: float | None = bounded(None, gt=0)
    correction_high: float | None = bounded(None, gt=0)
    tis_scope: str = one_of("stale", "all")  # the rows corrected: stale (from older weights) | all
    dpo_beta: float = bounded(0.1, gt=0)
    dpo_loss: str = one_of("sigmoid", "ipo")
    # conservative DPO (RLHFlow run_loop2 uses 0.1); 0.5 would make chosen and rejected interchangeable
    label_smoothing: float = bounded(0.0, ge=0, lt=0.5)
    pair_strategy: str = one_of("max_min", "max_random", "max_min_length")
    # max_min_length: reward - length_penalty * response characters
    length_penalty: float = bounded(0.0, ge=0)
    # previous: the policy at the start of each call (RLHFlow's code); initial: the frozen start model
    dpo_reference: str = one_of("previous", "initial")

    def corrects(self) -> bool:
        """Whether any off-policy correction applies (the masking modes have no cap)."""
        return self.tis_cap > 0 or self.correction in MASKING

    def needs_reference(self) -> bool:
        if self.update == "dpo":
            return self.dpo_reference == "initial"
        return self.kl_coef > 0


@dataclass(frozen=True)
class RankSetup:
    """What one DeepSpeed rank is built from: its role's config plus the facts the driver resolved."""

    model_path: str
    train: LearnerConfig
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    total_steps: int = 1  # optimizer steps of the whole run (the LR schedule's horizon)
    response_budget: int = 1  # generator.max_new_tokens: Dr. GRPO's constant normaliser
    export_dtype: str = "auto"  # dtype of the weights pushed to generators
    trust_remote_code: bool = False
    seed: int = 0
    value_clip: float | None = None  # critic ranks: critic.value_clip
    haf_alpha: float = 0.0  # reward-model training: weight of HaF's DPO-style policy loss (0: plain BT)
    haf_beta: float = 0.1
    deterministic: bool = False  # run.deterministic: deterministic torch kernels where available
    collective_timeout_s: float = 1800.0  # faults.learn_s: a collective whose peer is gone fails, not hangs
