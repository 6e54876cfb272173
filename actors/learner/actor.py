"""The `Learner` actor: one rank of a DeepSpeed engine (ZeRO 0-3; gloo on CPU, NCCL on GPU) running GRPO.

Ranks rendezvous through MASTER_ADDR/PORT chosen by rank 0; the cluster side creates and drives them.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from actors.hardware import resolve_dtype
from actors.learner.batch import TrainSample, collate, token_logprobs
from actors.learner.grpo import aggregate, clipped_policy_loss, kl_penalty
from actors.learner.weights import full_state_dict
from actors.protocol import WeightBundle

log = logging.getLogger("troupe.learner")


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
    micro_batch_size: int = 4
    samples_per_rank: int = 8  # sequences each rank receives per iteration
    mini_batches: int = 1  # optimizer steps per epoch over the iteration's samples
    epochs: int = 1
    gradient_checkpointing: bool = False
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    loss_agg: str = "seq_mean_token_mean"
    export_dtype: str = "auto"  # dtype of the weights pushed to generators
    trust_remote_code: bool = False
    seed: int = 0

    def grad_accum_steps(self) -> int:
        per_step = self.samples_per_rank // self.mini_batches
        return per_step // self.micro_batch_size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class Learner:
    def __init__(self, spec: LearnerSpec, rank: int) -> None:
        self.spec = spec
        self.rank = rank
        self.engine = None
        self.reference = None
        self.steps = 0
        self.dtype = resolve_dtype(spec.dtype)
        self.export_dtype = resolve_dtype(spec.export_dtype)

    def address(self) -> tuple[str, int]:
        """Rank 0's reachable IP and a free port for the process-group rendezvous."""
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int) -> dict:
        import deepspeed
        from transformers import AutoModelForCausalLM

        spec = self.spec
        on_gpu = torch.cuda.is_available()
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(spec.world_size),
            LOCAL_RANK="0",
        )
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads and not on_gpu:
            torch.set_num_threads(int(threads))
        if on_gpu:
            torch.cuda.set_device(0)  # Ray gives each rank its own GPU through CUDA_VISIBLE_DEVICES
        start = time.perf_counter()
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_pretrained(
            spec.model_path, dtype=torch.float32, trust_remote_code=spec.trust_remote_code
        )
        if spec.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.config.use_cache = False
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=spec.lr, betas=spec.adam_betas, weight_decay=spec.weight_decay
        )
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self._ds_config())
        if spec.kl_coef > 0:
            ref_dtype = getattr(torch, self.dtype)
            self.reference = AutoModelForCausalLM.from_pretrained(
                spec.model_path, dtype=ref_dtype, trust_remote_code=spec.trust_remote_code
            ).to(self.engine.device)
            self.reference.eval().requires_grad_(False)
        tok_pad = self.engine.module.config.pad_token_id
        self.pad_id = tok_pad if tok_pad is not None else 0
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "dtype": self.dtype,
            "setup_s": time.perf_counter() - start,
        }

    def _ds_config(self) -> dict:
        spec = self.spec
        gas = spec.grad_accum_steps()
        return {
            "train_micro_batch_size_per_gpu": spec.micro_batch_size,
            "gradient_accumulation_steps": gas,
            "train_batch_size": spec.micro_batch_size * gas * spec.world_size,
            "gradient_clipping": spec.grad_clip,
            "zero_optimization": {"stage": spec.zero_stage},
            "bf16": {"enabled": self.dtype == "bfloat16"},
            "zero_force_ds_cpu_optimizer": False,  # plain torch AdamW: no JIT-built op needed on CPU
            "steps_per_print": 10**9,
        }

    def train(self, samples: Sequence[TrainSample]) -> dict:
        """One GRPO update over this rank's share: `epochs` x `mini_batches` optimizer steps."""
        spec = self.spec
        if len(samples) != spec.samples_per_rank:
            raise ValueError(
                f"learner rank {self.rank}: got {len(samples)} samples, configured for {spec.samples_per_rank}"
            )
        start = time.perf_counter()
        device = self.engine.device
        batch = collate(samples, self.pad_id)
        old_logp, ref_logp = self._frozen_logprobs(batch)
        mismatch = (
            (old_logp - batch.behaviour_logprobs).abs() * batch.action_mask
        ).sum() / batch.action_mask.sum()
        sums = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0}
        micro_count = 0
        grad_norms = []
        per_step = spec.samples_per_rank // spec.mini_batches
        self.engine.train()
        for _ in range(spec.epochs):
            order = torch.randperm(len(batch))
            for lo in range(0, len(batch), spec.micro_batch_size):
                rows = order[lo : lo + spec.micro_batch_size]
                mb = batch.select(rows)
                mask = mb.action_mask.to(device)
                logp, entropy = token_logprobs(
                    self.engine, mb.input_ids.to(device), mb.attention_mask.to(device), True
                )
                pg, clipped = clipped_policy_loss(
                    logp, old_logp[rows].to(device), mb.advantages.to(device), spec.clip_eps
                )
                loss = aggregate(pg, mask, spec.loss_agg)
                kl = torch.zeros((), device=device)
                if self.reference is not None:
                    kl = aggregate(
                        kl_penalty(logp, ref_logp[rows].to(device), spec.kl_estimator), mask, spec.loss_agg
                    )
                    loss = loss + spec.kl_coef * kl
                self.engine.backward(loss)
                self.engine.step()  # DeepSpeed only steps the optimizer at the accumulation boundary
                micro_count += 1
                if (lo + spec.micro_batch_size) % per_step == 0:
                    self.steps += 1
                    norm = self.engine.get_global_grad_norm()
                    if norm is not None:
                        grad_norms.append(float(norm))
                sums["loss"] += float(loss.detach())
                sums["pg_loss"] += float(aggregate(pg.detach(), mask, spec.loss_agg))
                sums["kl"] += float(kl.detach())
                sums["clip_frac"] += float(aggregate(clipped, mask, "token_mean"))
                sums["entropy"] += float(aggregate(entropy, mask, "token_mean"))
        metrics = {k: v / micro_count for k, v in sums.items()}
        if self.reference is None:
            metrics["kl"] = float("nan")  # not measured without a reference model (algo.kl_coef=0)
        metrics.update(
            grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
            logprob_mismatch=float(mismatch),
            optimizer_steps=self.steps,
            train_s=time.perf_counter() - start,
        )
        return metrics

    @torch.no_grad()
    def _frozen_logprobs(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logprobs before the update (the ratio's denominator) and under the reference model."""
        device = self.engine.device
        self.engine.eval()
        old, ref = [], []
        for lo in range(0, len(batch), self.spec.micro_batch_size):
            mb = batch.select(slice(lo, lo + self.spec.micro_batch_size))
            ids, att = mb.input_ids.to(device), mb.attention_mask.to(device)
            old.append(token_logprobs(self.engine, ids, att)[0].cpu())
            if self.reference is not None:
                ref.append(token_logprobs(self.reference, ids, att)[0].cpu())
        return torch.cat(old), (torch.cat(ref) if ref else None)

    def export_weights(self, version: int) -> WeightBundle | None:
        """Full HF-named state dict on rank 0 (every rank must call this: ZeRO-3 gathers collectively)."""
        tensors = full_state_dict(
            self.engine, self.spec.zero_stage, getattr(torch, self.export_dtype), self.rank == 0
        )
        return WeightBundle(version, tensors) if self.rank == 0 else None

    def save_hf(self, path: str, tokenizer_path: str) -> str | None:
        """Write an HF-format checkpoint (safetensors + tokenizer) from rank 0; all ranks must call it."""
        tensors = full_state_dict(
            self.engine, self.spec.zero_stage, getattr(torch, self.dtype), self.rank == 0
        )
        if self.rank != 0:
            return None
        from transformers import AutoTokenizer

        module = self.engine.module
        module.save_pretrained(path, state_dict=tensors, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(path)
        return path
