"""DeepSpeed plumbing shared by every trained role (policy, critic, reward model): process group, config,
optimizer and learning-rate schedule.

Each rank is one Ray actor; they rendezvous through MASTER_ADDR/PORT chosen by rank 0.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass, field

import torch

SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class LoraSpec:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class LearnerSpec:
    model_path: str
    world_size: int = 2
    zero_stage: int = 2
    dtype: str = "auto"  # bfloat16 (DeepSpeed bf16, fp32 master weights), float32, or auto (hardware decides)
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    lr_schedule: str = "constant"  # constant | linear | cosine, after `warmup_steps` of linear warm-up
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # floor of the linear/cosine decay, as a fraction of lr
    total_steps: int = 1  # optimizer steps of the whole run (the schedule's horizon)
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on the CPU (DeepSpeedCPUAdam)
    offload_params: bool = False  # ZeRO-3 only: parameters live on the CPU between uses
    micro_batch_size: int = 4
    samples_per_rank: int = 8  # sequences (or pairs, for DPO) each rank receives per iteration
    mini_batches: int = 1  # optimizer steps per epoch over the iteration's samples
    epochs: int = 1
    gradient_checkpointing: bool = False
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    loss_agg: str = "seq_mean_token_mean"
    # How per-token advantages are made: "sequence" (the driver's scalar per sample), "gae" (critic values),
    # "returns" (REINFORCE++: discounted reward-to-go, no critic), the last two whitened over the global batch.
    advantage_mode: str = "sequence"
    kl_in_reward: bool = False  # KL to the reference as a per-token reward penalty instead of a loss term
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    value_clip: float = 0.2  # critic only
    dpo_beta: float = 0.1
    dpo_loss: str = "sigmoid"  # sigmoid | ipo
    dpo_label_smoothing: float = 0.0
    # initial (frozen start model) | previous (policy at the start of each call)
    dpo_reference: str = "initial"
    haf_alpha: float = 0.0  # reward-model training: weight of HaF's DPO-style policy loss (0: plain BT)
    lora: LoraSpec = field(default_factory=LoraSpec)
    export_dtype: str = "auto"  # dtype of the weights pushed to generators
    trust_remote_code: bool = False
    seed: int = 0

    def grad_accum_steps(self) -> int:
        per_step = self.samples_per_rank // self.mini_batches
        return max(1, per_step // self.micro_batch_size)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_process_group(spec: LearnerSpec, rank: int, master_addr: str, master_port: int) -> bool:
    """Join the group of this role's ranks; returns whether a GPU is used."""
    import deepspeed

    on_gpu = torch.cuda.is_available()
    os.environ.update(
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
        RANK=str(rank),
        WORLD_SIZE=str(spec.world_size),
        LOCAL_RANK="0",
    )
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and not on_gpu:
        torch.set_num_threads(int(threads))
    if on_gpu:
        torch.cuda.set_device(0)  # Ray gives each rank its own GPU through CUDA_VISIBLE_DEVICES
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    torch.manual_seed(spec.seed)
    return on_gpu


def ds_config(spec: LearnerSpec, dtype: str, on_gpu: bool) -> dict:
    gas = spec.grad_accum_steps()
    zero: dict = {"stage": spec.zero_stage}
    if spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if spec.offload_params:
        if spec.zero_stage != 3:
            raise ValueError("offload_params needs ZeRO stage 3 (parameters are only partitioned there)")
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": spec.micro_batch_size * gas * spec.world_size,
        "gradient_clipping": spec.grad_clip,
        "zero_optimization": zero,
        # troupe decides where a step ends: pair counts (DPO) vary per call, so a fixed count cannot.
        "managed_gradient_accumulation": False,
        "bf16": {"enabled": dtype == "bfloat16"},
        # Without offload, plain torch AdamW: no JIT-built op is needed on CPU.
        "zero_force_ds_cpu_optimizer": spec.offload_optimizer,
        "steps_per_print": 10**9,
    }


def lr_factor(step: int, spec: LearnerSpec) -> float:
    """Multiplier of spec.lr after `step` optimizer steps: linear warm-up, then constant/linear/cosine decay."""
    if spec.lr_schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {spec.lr_schedule!r}")
    if step < spec.warmup_steps:
        return (step + 1) / (spec.warmup_steps + 1)
    if spec.lr_schedule == "constant":
        return 1.0
    span = max(1, spec.total_steps - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / span)
    decay = 1.0 - progress if spec.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * decay


def make_optimizer(params, spec: LearnerSpec, on_gpu: bool) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]  # LoRA: only the adapters
    if spec.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=spec.lr, betas=spec.adam_betas, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(
        params, lr=spec.lr, betas=spec.adam_betas, weight_decay=spec.weight_decay, fused=on_gpu or None
    )


def build_engine(model: torch.nn.Module, spec: LearnerSpec, dtype: str, on_gpu: bool):
    """Wrap `model` in a DeepSpeed engine with the optimizer and schedule from `spec`."""
    import deepspeed

    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = make_optimizer(model.parameters(), spec, on_gpu)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, spec)),
        config=ds_config(spec, dtype, on_gpu),
    )
    return engine


def current_lr(engine) -> float:
    return float(engine.get_lr()[0])
