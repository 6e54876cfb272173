"""DeepSpeed plumbing shared by every trained role (policy, critic, reward model): process group, config,
optimizer and learning-rate schedule.

Each rank is one Ray actor; they rendezvous at a TCP store that rank 0 opens on a port the OS picks.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Callable
from typing import TypeVar

import torch

from troupe.actors.learner.config import LearnerConfig, RankSetup

SCHEDULES = ("constant", "linear", "cosine")
T = TypeVar("T")


def config_without_dropout(path: str, trust_remote_code: bool = False):
    """The model's HF config with every dropout probability set to 0: RL ratios, KL and DPO references compare
    log-probs across forwards, and dropout would make an on-policy ratio differ from 1 (as TRL's disable_dropout)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    for key, value in list(vars(cfg).items()):
        if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float) and value > 0:
            setattr(cfg, key, 0.0)
    return cfg


def load_causal_lm(setup: RankSetup, dtype: str = "float32"):
    """The setup's model as a transformers causal LM in `dtype`, dropout off, KV cache off (training)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        setup.model_path,
        config=config_without_dropout(setup.model_path, setup.trust_remote_code),
        dtype=getattr(torch, dtype),
        trust_remote_code=setup.trust_remote_code,
    )
    model.config.use_cache = False
    return model


def sharded_at_load(spec: LearnerConfig) -> bool:
    return spec.zero_stage == 3 and spec.zero_init


def load_partitioned(spec: LearnerConfig, dtype: str, on_gpu: bool, load: Callable[[], T]) -> T:
    """`load()`'s model. With ZeRO-3 (and learner.zero_init), transformers' from_pretrained inside it creates each
    weight already partitioned over the ranks (deepspeed.zero.Init) and loads the checkpoint into the shards, so no
    rank ever holds the full model. transformers finds the config through a module-level weak reference, held here.
    zero.Init also turns the floating buffers made in __init__ into the training dtype (rotary `inv_freq` in bf16:
    phases off by up to ~0.5 rad at position 2048); DeepSpeed keeps buffers in fp32 for a model it partitions itself,
    so they are restored to fp32 here (`fp32_buffers`)."""
    if not sharded_at_load(spec):
        return load()
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    handle = HfDeepSpeedConfig(ds_config(spec, dtype, on_gpu))  # noqa: F841 (held: transformers keeps a weak ref)
    try:
        model = load()
    finally:
        unset_hf_deepspeed_config()
    fp32_buffers(model)
    return model


def fp32_buffers(model: torch.nn.Module) -> int:
    """Turn every floating buffer of `model` into fp32 and let its transformers model recompute those it knows
    (rotary frequencies, in fp32 from the config), as an unpartitioned load would have made them. Returns how many
    buffers changed."""
    from transformers import PreTrainedModel

    owners = {id(m): m for m in model.modules() if isinstance(m, PreTrainedModel)}
    changed = 0
    for module in model.modules():
        stale = [
            n
            for n, b in module.named_buffers(recurse=False)
            if b.is_floating_point() and b.dtype != torch.float32
        ]
        if not stale:
            continue
        for name in stale:
            module._buffers[name] = module._buffers[name].float()  # a new tensor: no "initialised" flag on it
        changed += len(stale)
        owner = next((o for o in owners.values() if any(m is module for m in o.modules())), None)
        if owner is not None and not list(module.parameters(recurse=False)):  # never re-draws a weight
            owner._init_weights(module)
    return changed


def frozen_reference(setup: RankSetup, dtype: str, device, on_gpu: bool = False) -> torch.nn.Module:
    """A frozen copy of the start model (KL / DPO / HaF reference) in the rank's compute dtype. Under ZeRO-3 with
    learner.zero_init it stays partitioned: a DeepSpeed ZeRO-3 engine without an optimizer gathers each layer's
    weights for its forward (all ranks call it together, as the policy's own forwards)."""
    spec = setup.train
    if not sharded_at_load(spec):
        return load_causal_lm(setup, dtype).to(device).eval().requires_grad_(False)
    import deepspeed

    model = load_partitioned(spec, dtype, on_gpu, lambda: load_causal_lm(setup, dtype)).requires_grad_(False)
    config = ds_config(spec, dtype, on_gpu)
    config["zero_optimization"].pop("offload_optimizer", None)  # no optimizer
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()  # DeepSpeedEngine.eval returns None
    return engine


def local_fraction(model: torch.nn.Module) -> float:
    """Share of `model`'s parameter elements this rank holds (1.0 unpartitioned; about 1/world under ZeRO-3)."""
    held = total = 0
    for p in model.parameters():
        full = getattr(
            p, "ds_numel", p.numel()
        )  # ZeRO-3: ds_numel is the full size, ds_tensor this rank's shard
        held += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        total += full
    return held / max(total, 1)


def open_store(host: str, setup: RankSetup):
    """Rank 0's rendezvous store, bound at once to a port the OS picks and held for the group's life. Probing
    for a free port and binding it later races with every other process on the node (CI saw EADDRINUSE)."""
    return torch.distributed.TCPStore(
        host,
        0,
        setup.train.world_size,
        is_master=True,
        timeout=datetime.timedelta(seconds=setup.collective_timeout_s),
        wait_for_workers=False,
    )


def init_process_group(setup: RankSetup, rank: int, master_addr: str, master_port: int, store=None) -> bool:
    """Join the group of this role's ranks at rank 0's store (`store` on rank 0, a client of it elsewhere);
    returns whether a GPU is used."""
    import deepspeed

    on_gpu = torch.cuda.is_available()
    os.environ.update(
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
        RANK=str(rank),
        WORLD_SIZE=str(setup.train.world_size),
        LOCAL_RANK="0",
    )
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and not on_gpu:
        torch.set_num_threads(int(threads))
    if on_gpu:
        torch.cuda.set_device(0)  # Ray gives each rank its own GPU through CUDA_VISIBLE_DEVICES
    timeout = datetime.timedelta(seconds=setup.collective_timeout_s)
    world_size = setup.train.world_size
    if store is None:
        store = torch.distributed.TCPStore(
            master_addr, master_port, world_size, is_master=False, timeout=timeout
        )
    backend = "nccl" if on_gpu else "gloo"
    # a bound device makes NCCL connect eagerly, as DeepSpeed's own init does for world_size > 1
    device = {"device_id": torch.device("cuda", 0)} if on_gpu and world_size > 1 else {}
    torch.distributed.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **device
    )
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # adopts the group above
    if setup.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(setup.seed)
    return on_gpu


def ds_config(spec: LearnerConfig, dtype: str, on_gpu: bool) -> dict:
    zero: dict = {"stage": spec.zero_stage}
    if spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if spec.offload_params:
        if spec.zero_stage != 3:
            raise ValueError("offload_params needs ZeRO stage 3 (parameters are only partitioned there)")
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        # Nominal sizes: troupe decides where a step ends and scales each micro-batch's loss itself.
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": spec.micro_batch_size * spec.world_size,
        "gradient_clipping": spec.grad_clip,
        "zero_optimization": zero,
        "managed_gradient_accumulation": False,
        # ZeRO-1/2 in bf16 skip a step whose gradients are inf/NaN (rank._step counts it); its default was False
        # before DeepSpeed PR #8035
        "bf16": {"enabled": dtype == "bfloat16", "check_grad_overflow": True},
        # Without offload, plain torch AdamW: no JIT-built op is needed on CPU.
        "zero_force_ds_cpu_optimizer": spec.offload_optimizer,
        "steps_per_print": 10**9,
    }


def lr_factor(step: int, spec: LearnerConfig, total_steps: int) -> float:
    """Multiplier of spec.lr after `step` optimizer steps: linear warm-up, then constant/linear/cosine decay."""
    if spec.lr_schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {spec.lr_schedule!r}")
    if step < spec.warmup_steps:
        return (step + 1) / (spec.warmup_steps + 1)
    if spec.lr_schedule == "constant":
        return 1.0
    span = max(1, total_steps - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / span)
    decay = 1.0 - progress if spec.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * decay


def make_optimizer(params, spec: LearnerConfig, on_gpu: bool) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]  # LoRA: only the adapters
    if spec.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(
            params, lr=spec.lr, betas=tuple(spec.adam_betas), weight_decay=spec.weight_decay
        )
    return torch.optim.AdamW(
        params, lr=spec.lr, betas=tuple(spec.adam_betas), weight_decay=spec.weight_decay, fused=True
    )


def decoder_layers(model: torch.nn.Module, count: int) -> torch.nn.ModuleList:
    """The model's stack of `count` decoder layers, wherever a wrapper (value head, reward head, LoRA) put it."""
    for module in model.modules():
        if (
            isinstance(module, torch.nn.ModuleList)
            and len(module) == count
            and type(module[0]).__name__.endswith(("Layer", "Block"))
        ):
            return module
    raise ValueError(f"{type(model).__name__} has no list of {count} decoder layers to compile")


def compile_layers(model: torch.nn.Module, on_gpu: bool) -> int:
    """torch.compile each decoder layer in place, with dynamic shapes; returns how many."""
    from torch._inductor import config as inductor_config

    if not on_gpu:
        inductor_config.compile_threads = 1  # compile workers would fight the rank's own threads
    layers = decoder_layers(model, model.config.num_hidden_layers)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process (0: every compiled call fell back to eager)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def build_engine(model: torch.nn.Module, setup: RankSetup, dtype: str, on_gpu: bool):
    """Wrap `model` in a DeepSpeed engine with the optimizer and schedule of `setup.train`."""
    import deepspeed

    spec = setup.train
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.compile and spec.zero_stage == 3:
        raise ValueError(
            "learner.compile supports ZeRO stages 0-2 (ZeRO-3 gathers weights inside each layer)"
        )
    compiled = compile_layers(model, on_gpu) if spec.compile else 0
    if spec.zero_stage == 3:
        # Parameters made after a partitioned load (a value or reward head, LoRA adapters) are partitioned by the
        # engine in the dtype they have, and ZeRO-3 needs one dtype for all: give them the training dtype.
        for p in model.parameters():
            if not hasattr(p, "ds_id"):
                p.data = p.data.to(getattr(torch, dtype))
    optimizer = make_optimizer(model.parameters(), spec, on_gpu)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, spec, setup.total_steps)
        ),
        config=ds_config(spec, dtype, on_gpu),
    )
    engine.compiled_layers = compiled  # reported in each rank's setup info
    return engine


def current_lr(engine) -> float:
    return float(engine.get_lr()[0])
