"""The `Learner` actor: one rank of the policy's DeepSpeed engine (ZeRO 0-3; gloo on CPU, NCCL on GPU).

It runs policy-gradient updates (pg_update.py) and DPO (dpo_update.py) on its share of the batch.
The cluster side creates the ranks and drives them in lock-step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from troupe.actors import weight_buckets
from troupe.actors.learner import lora
from troupe.actors.learner.batch import RolloutBatch, pair_batch
from troupe.actors.learner.config import RankSetup
from troupe.actors.learner.dpo import PreferencePair
from troupe.actors.learner.dpo_update import dpo_update
from troupe.actors.learner.engine import (
    build_engine,
    compiled_graphs,
    current_lr,
    frozen_reference,
    load_causal_lm,
    load_partitioned,
    local_fraction,
)
from troupe.actors.learner.pg_update import policy_gradient_update
from troupe.actors.learner.rank import DeepSpeedRank, peak_rss_mb
from troupe.actors.learner.weights import full_state_dict, iter_full_state
from troupe.actors.weight_buckets import BucketedWeights

log = logging.getLogger("troupe.learner")


class Learner(DeepSpeedRank):
    def __init__(self, spec: RankSetup, rank: int) -> None:
        super().__init__(spec, rank)
        self.reference = None

    def setup(self, master_addr: str, master_port: int) -> dict:
        spec = self.spec
        start = time.perf_counter()
        on_gpu = self.join_group(master_addr, master_port)
        model = load_partitioned(spec.train, self.dtype, on_gpu, lambda: load_causal_lm(spec))
        loaded_peak = peak_rss_mb()  # the policy loaded, before DeepSpeed's optimizer state and the reference
        if spec.train.lora.enabled:
            model = lora.wrap(model, spec.train.lora)
            if spec.train.gradient_checkpointing:
                model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need grads
        self.engine = build_engine(model, spec, self.dtype, on_gpu)
        if spec.algo.needs_reference() and not spec.train.lora.enabled:  # LoRA: the base, adapters off
            self.reference = frozen_reference(spec, self.dtype, self.engine.device, on_gpu)
        pad = self.engine.module.config.pad_token_id
        self.pad_id = pad if pad is not None else 0
        return self._info(
            time.perf_counter() - start,
            trainable=lora.trainable_fraction(self.engine.module),
            load_peak_rss_mb=loaded_peak,
            reference_held=local_fraction(self.reference) if self.reference is not None else None,
        )

    def has_reference(self) -> bool:
        return self.reference is not None or (
            self.spec.algo.needs_reference() and self.spec.train.lora.enabled
        )

    def frozen_logprobs(self, batch: RolloutBatch, reference: bool) -> torch.Tensor:
        """[B, L-1] log-probs of the current policy or of the reference, no grad."""
        self.engine.eval()
        if not reference:
            return self.batch_logprobs(self.engine, batch)
        if self.reference is not None:
            return self.batch_logprobs(self.reference, batch)
        with lora.base_model(self.engine.module):
            return self.batch_logprobs(self.engine.module, batch)

    def train(self, batch: RolloutBatch, kl_coef: float) -> tuple[dict, dict]:
        """One policy-gradient update over this rank's share; `kl_coef` is the (adaptive) KL coefficient. Returns
        the metrics and per-row outputs (advantages; returns for a critic)."""
        start = time.perf_counter()
        metrics, rows = policy_gradient_update(self, batch, kl_coef)
        metrics.update(
            optimizer_steps=self.steps, lr=current_lr(self.engine), train_s=time.perf_counter() - start
        )
        if self.spec.train.compile:
            metrics["compile/graphs"] = compiled_graphs()
        return metrics, rows

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
        batch = pair_batch(pairs, self.pad_id)
        sums = self.frozen_logprobs(batch, reference=False).sum(-1)
        return (sums[: len(pairs)] - sums[len(pairs) :]).tolist()

    def _exported(self):
        """Rank 0: an iterator over the weights to export (HF names, the generators' dtype, no copies). Other
        ranks take part in every ZeRO-3 gather here and get None: every rank must call it."""
        dtype = getattr(torch, self.export_dtype)
        tensors = iter_full_state(self.engine, self.spec.train.zero_stage, dtype, self.rank == 0)
        if self.rank == 0:
            return tensors
        for _ in tensors:
            pass
        return None

    def export_buckets(self, version: int, bucket_bytes: int) -> BucketedWeights | None:
        """The full weights packed into checksummed buckets, each put in the object store by rank 0 as it fills
        (rank 0 owns them: they live as long as it does); None on other ranks. Every rank must call it (ZeRO-3
        gathers collectively). The object store's copy is the only one: the buckets are views of the weights."""
        import ray

        tensors = self._exported()
        if tensors is None:
            return None
        specs, refs = weight_buckets.pack(tensors, bucket_bytes, put=ray.put)
        return BucketedWeights(weight_buckets.WeightManifest(version, tuple(specs)), tuple(refs))

    # GPU weight sync (actors/weight_transfer.py): rank 0 is rank 0 of the weight-update group.
    def weight_layout(self) -> dict | None:
        """vLLM's update info (names, dtypes, shapes) of the exported weights: rank 0; every rank takes part in
        ZeRO-3's gathers."""
        from troupe.actors.weight_transfer import update_info

        tensors = self._exported()
        return None if tensors is None else update_info(tensors)

    def open_weight_transfer(self) -> str | None:
        """Rank 0: a fresh NCCL unique id for the group, which the driver hands to every member."""
        from troupe.actors.weight_transfer import new_unique_id

        return new_unique_id() if self.rank == 0 else None

    def join_weight_transfer(self, unique_id: str, world_size: int) -> bool:
        if self.rank != 0:
            return False
        from troupe.actors.weight_transfer import WeightSender

        self.weight_sender = WeightSender(unique_id, world_size, self.engine.device)
        return True

    def send_weights(self, version: int, info: dict) -> str | None:
        """Rank 0 broadcasts the current weights over the weight-update group; returns the transfer's digest."""
        tensors = self._exported()
        return None if tensors is None else self.weight_sender.send(tensors, info, version)

    # Colocated GPUs (cluster/sync/ipc.py): every rank shares its weights with the generator on its GPU.
    def ipc_begin(self) -> None:
        """Start an export of this rank's full weights, chunk by chunk (every rank: ZeRO-3 gathers collectively,
        and each chunk's gathers happen in `ipc_next`, on every rank together)."""
        from troupe.actors.weight_transfer import IpcExport

        dtype = getattr(torch, self.export_dtype)
        largest = (
            max(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters()) * dtype.itemsize
        )
        tensors = iter_full_state(self.engine, self.spec.train.zero_stage, dtype, keep=True)
        self.ipc_export = IpcExport(tensors, self.engine.device, largest)

    def ipc_next(self) -> dict | None:
        """The next chunk's update info (vLLM's, with `checksums`), None after the last; the previous chunk must
        have been read by the generator (the buffer is reused)."""
        return self.ipc_export.next_chunk()

    def ipc_end(self) -> None:
        if getattr(self, "ipc_export", None) is not None:
            self.ipc_export.close()
        self.ipc_export = None

    def leave_weight_transfer(self) -> None:
        if getattr(self, "weight_sender", None) is not None:
            self.weight_sender.close()
        self.weight_sender = None

    def save_hf(self, path: str, tokenizer_path: str) -> str | None:
        """Write an HF-format checkpoint (safetensors + tokenizer) from rank 0; all ranks must call it.

        LoRA runs save the merged model, loadable without peft.
        """
        tensors = full_state_dict(
            self.engine, self.spec.train.zero_stage, getattr(torch, self.dtype), self.rank == 0
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
