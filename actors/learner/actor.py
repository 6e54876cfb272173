"""The `Learner` actor: one rank of the policy's DeepSpeed engine (ZeRO 0-3; gloo on CPU, NCCL on GPU).

It runs policy-gradient updates (GRPO, RLOO, REINFORCE++, PPO; see pg_update.py) and DPO (dpo_update.py).
The cluster side creates the ranks and drives them in lock-step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from actors.learner import lora
from actors.learner.batch import TrainSample, pad_sequences, token_logprobs
from actors.learner.dpo import PreferencePair
from actors.learner.dpo_update import dpo_update
from actors.learner.engine import LearnerSpec, build_engine, current_lr, init_process_group
from actors.learner.pg_update import policy_gradient_update
from actors.learner.rank import DeepSpeedRank
from actors.learner.weights import full_state_dict
from actors.protocol import WeightBundle

log = logging.getLogger("troupe.learner")

__all__ = ["Learner", "LearnerSpec"]


class Learner(DeepSpeedRank):
    def __init__(self, spec: LearnerSpec, rank: int, use_reference: bool = False) -> None:
        super().__init__(spec, rank)
        self.use_reference = use_reference  # KL to the reference, or a DPO reference fixed at the start
        self.reference = None

    def setup(self, master_addr: str, master_port: int) -> dict:
        from transformers import AutoModelForCausalLM

        spec = self.spec
        start = time.perf_counter()
        on_gpu = init_process_group(spec, self.rank, master_addr, master_port)
        model = AutoModelForCausalLM.from_pretrained(
            spec.model_path, dtype=torch.float32, trust_remote_code=spec.trust_remote_code
        )
        model.config.use_cache = False
        if spec.lora.enabled:
            model = lora.wrap(model, spec.lora)
            if spec.gradient_checkpointing:
                model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need grads
        self.engine = build_engine(model, spec, self.dtype, on_gpu)
        if self.use_reference and not spec.lora.enabled:  # LoRA's reference is the base with adapters off
            self.reference = AutoModelForCausalLM.from_pretrained(
                spec.model_path, dtype=getattr(torch, self.dtype), trust_remote_code=spec.trust_remote_code
            ).to(self.engine.device)
            self.reference.eval().requires_grad_(False)
        pad = self.engine.module.config.pad_token_id
        self.pad_id = pad if pad is not None else 0
        return self._info(time.perf_counter() - start, trainable=lora.trainable_fraction(self.engine.module))

    def has_reference(self) -> bool:
        return self.reference is not None or (self.use_reference and self.spec.lora.enabled)

    @torch.no_grad()
    def logprobs(self, input_ids, attention_mask, reference: bool) -> torch.Tensor:
        """Per-token logprobs of the current policy, or of the frozen reference (no grad, eval mode)."""
        device = self.engine.device
        ids, att = input_ids.to(device), attention_mask.to(device)
        self.engine.eval()
        if not reference:
            return token_logprobs(self.engine, ids, att)[0].cpu()
        if self.reference is not None:
            return token_logprobs(self.reference, ids, att)[0].cpu()
        with lora.base_model(self.engine.module):
            return token_logprobs(self.engine.module, ids, att)[0].cpu()

    def train(self, samples: Sequence[TrainSample], kl_coef: float | None = None) -> dict:
        """One policy-gradient update over this rank's share; `kl_coef` overrides the spec (adaptive KL)."""
        if len(samples) != self.spec.samples_per_rank:
            raise ValueError(
                f"learner rank {self.rank}: got {len(samples)} samples, configured for {self.spec.samples_per_rank}"
            )
        start = time.perf_counter()
        metrics = policy_gradient_update(self, samples, self.spec.kl_coef if kl_coef is None else kl_coef)
        metrics.update(
            optimizer_steps=self.steps, lr=current_lr(self.engine), train_s=time.perf_counter() - start
        )
        return metrics

    def train_dpo(self, pairs: Sequence[PreferencePair]) -> dict:
        """DPO epochs over this rank's pairs (all ranks must get the same count)."""
        start = time.perf_counter()
        metrics = dpo_update(self, pairs)
        metrics.update(
            optimizer_steps=self.steps, lr=current_lr(self.engine), train_s=time.perf_counter() - start
        )
        return metrics

    @torch.no_grad()
    def pair_margins(self, pairs: Sequence[PreferencePair]) -> list[float]:
        """log pi(chosen) - log pi(rejected) per pair under the current policy (evaluation, no update)."""
        prompts = [p.prompt_ids for p in pairs] * 2
        input_ids, attention, action = pad_sequences(
            prompts, [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs], self.pad_id
        )
        sums = (self.logprobs(input_ids, attention, reference=False) * action).sum(-1)
        return (sums[: len(pairs)] - sums[len(pairs) :]).tolist()

    def export_weights(self, version: int) -> WeightBundle | None:
        """Full HF-named state dict on rank 0 (every rank must call this: ZeRO-3 gathers collectively)."""
        tensors = full_state_dict(
            self.engine, self.spec.zero_stage, getattr(torch, self.export_dtype), self.rank == 0
        )
        return WeightBundle(version, tensors) if self.rank == 0 else None

    def save_hf(self, path: str, tokenizer_path: str) -> str | None:
        """Write an HF-format checkpoint (safetensors + tokenizer) from rank 0; all ranks must call it.

        LoRA runs save the merged model, loadable without peft.
        """
        tensors = full_state_dict(
            self.engine, self.spec.zero_stage, getattr(torch, self.dtype), self.rank == 0
        )
        if self.rank != 0:
            return None
        from transformers import AutoModelForCausalLM, AutoTokenizer

        module = self.engine.module
        if lora.is_lora(module):
            with torch.device("meta"):
                module = AutoModelForCausalLM.from_config(module.get_base_model().config)
        module.save_pretrained(path, state_dict=tensors, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(path)
        return path
