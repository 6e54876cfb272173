"""What every DeepSpeed-trained role's rank shares: rendezvous address, setup timing, and the one optimizer-step
loop (micro-batches, loss scaling, accumulation boundaries, clipping) that policy, critic, DPO and reward-model
training all run. A step whose loss or gradients are inf/NaN is not applied, and is counted (nonfinite_steps).
"""

from __future__ import annotations

import ctypes
import os
import resource
from collections.abc import Callable
from pathlib import Path

import torch

from troupe.actors.hardware import node_id, resolve_dtype
from troupe.actors.learner.batch import RolloutBatch
from troupe.actors.learner.config import RankSetup
from troupe.actors.learner.engine import init_process_group, local_fraction, open_store
from troupe.actors.learner.logprobs import response_logprobs
from troupe.actors.learner.step import (
    StepNorm,
    all_reduce_sum,
    global_counts,
    group_lengths,
    group_rows,
    micro_batches,
    step_rows,
)

# micro_loss(rows, norm) -> (loss to backpropagate, {metric: this micro-batch's share of the step's value})
MicroLoss = Callable[[torch.Tensor, StepNorm], tuple[torch.Tensor, dict[str, torch.Tensor | float]]]


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return getattr(ctypes.CDLL("libc.so.6"), "malloc_trim", None)
    except OSError:  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim()


def release_free_heap() -> None:
    """Return the heap's free pages to the system (glibc's malloc_trim; elsewhere nothing). CPU learners keep every
    allocation on the heap within a step (runtime.CPU_MALLOC: no fresh, zeroed mmap per activation: 1.3-1.5x faster
    learn phases here), and without this the heap also kept each step's peak and the holes that batches of other
    shapes left: +1.3 GiB per iteration on GSM8K replies, until the node ran out of memory."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def memory_gib() -> dict[str, float]:
    """This process's resident memory in GiB, now and at its peak (host memory: activations on CPU learners, little
    on GPU ones)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])  # Linux; resident pages
    return {"rss_gib": pages * os.sysconf("SC_PAGE_SIZE") / 2**30, "peak_rss_gib": peak_rss_mb() / 1024}


class DeepSpeedRank:
    def __init__(self, spec: RankSetup, rank: int) -> None:
        self.spec = spec
        self.rank = rank
        self.engine = None
        self.steps = 0
        self.version = (
            0  # policy updates applied: equals the weight version generators get after the next sync
        )
        self.dtype = resolve_dtype(spec.train.dtype)
        self.export_dtype = resolve_dtype(spec.export_dtype)
        self.pad_id = 0
        self._shuffle = torch.Generator().manual_seed(spec.seed + rank)
        self._store = None

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0 opens the process group's store; returns its reachable IP and bound port."""
        import ray

        host = ray.util.get_node_ip_address()
        self._store = open_store(host, self.spec)
        return host, self._store.port

    def join_group(self, master_addr: str, master_port: int) -> bool:
        """Join this role's process group at rank 0's store; returns whether a GPU is used."""
        return init_process_group(self.spec, self.rank, master_addr, master_port, self._store)

    def save_state(self, folder: str) -> None:
        """DeepSpeed's checkpoint of this rank (weights, optimizer, LR schedule) under `folder`, plus this rank's
        RNG streams and counters in rank<r>.safetensors. Every rank must call it (ZeRO states are per rank)."""
        from safetensors.torch import save_file

        self.engine.save_checkpoint(folder, tag="ds", save_latest=False)
        rng = {"torch": torch.get_rng_state(), "shuffle": self._shuffle.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        meta = {"steps": str(self.steps), "version": str(self.version), "rank": str(self.rank)}
        save_file(rng, os.path.join(folder, f"rank{self.rank}.safetensors"), metadata=meta)

    def load_state(self, folder: str) -> dict:
        """Restore `save_state` output (the caller has checked the checkpoint's checksums first)."""
        from safetensors import safe_open

        path, _ = self.engine.load_checkpoint(
            folder, tag="ds", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {folder}/ds")
        with safe_open(os.path.join(folder, f"rank{self.rank}.safetensors"), "pt") as f:
            meta = f.metadata()
            torch.set_rng_state(f.get_tensor("torch"))
            self._shuffle.set_state(f.get_tensor("shuffle"))
            if torch.cuda.is_available() and "cuda" in f.keys():
                torch.cuda.set_rng_state(f.get_tensor("cuda"))
        self.steps, self.version = int(meta["steps"]), int(meta["version"])
        return {"rank": self.rank, "steps": self.steps, "version": self.version}

    def _info(self, setup_s: float, **extra) -> dict:
        info = {"rank": self.rank, "pid": os.getpid(), "node": node_id(), "dtype": self.dtype}
        info["compiled_layers"] = self.engine.compiled_layers
        info["held"] = local_fraction(self.engine.module)  # share of the model's weights on this rank
        info["peak_rss_mb"] = peak_rss_mb()
        return {**info, "setup_s": setup_s, **extra}

    def optimize(
        self,
        lengths: torch.Tensor,
        token_counts: torch.Tensor,
        micro_loss: MicroLoss,
        shuffle: bool = True,
        group_size: int = 1,
    ) -> dict:
        """`epochs` passes of `mini_batches` optimizer steps over this rank's rows; returns per-step means.

        With `group_size` > 1, steps and micro-batches hold whole prompt groups (so they can be packed).
        Every rank must call it with the same number of rows (ZeRO-3 gathers parameters collectively).
        """
        t = self.spec.train
        self.engine.train()
        sums: dict[str, float] = {}
        grad_norms: list[float] = []
        steps = skipped = 0
        units = self.units(lengths, group_size)
        for _ in range(t.epochs):
            for step_units in step_rows(len(units.lengths), t.mini_batches, shuffle, self._shuffle):
                rows = units.rows(step_units)
                # a row without response tokens (dropped, or empty) adds no loss, so it is no sequence either
                tokens, sequences = global_counts(
                    float(token_counts[rows].sum()), float((token_counts[rows] > 0).sum()), t.world_size > 1
                )
                norm = StepNorm(tokens, sequences, t.world_size, self.spec.response_budget)
                finite = True
                step_sums: dict[str, float] = {}
                for mb in units.micro_batches(step_units, t.micro_batch_size):
                    loss, stats = micro_loss(mb, norm)
                    if not bool(torch.isfinite(loss.detach()).all()):
                        # every gradient becomes NaN, so no optimizer can apply part of this step (_step)
                        finite, loss = False, loss * float("nan")
                    # The caller owns the accumulation boundary (managed_gradient_accumulation=false).
                    self.engine.backward(loss, scale_wrt_gas=False)
                    for key, value in stats.items():
                        step_sums[key] = step_sums.get(key, 0.0) + float(value)
                applied = self._step(finite)
                self.steps += 1
                steps += 1
                skipped += not applied
                if applied:  # a skipped step's NaN stats would make the whole call's means NaN
                    for key, value in step_sums.items():
                        sums[key] = sums.get(key, 0.0) + value
                norm_value = self.engine.get_global_grad_norm()
                if applied and norm_value is not None:
                    grad_norms.append(float(norm_value))
        metrics = {k: v / max(steps - skipped, 1) for k, v in sums.items()}
        metrics["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
        metrics["nonfinite_steps"] = float(
            skipped
        )  # optimizer steps not applied: an inf/NaN loss or gradient
        if steps:
            self.version += 1
        if self.spec.train.num_gpus == 0:
            release_free_heap()
        metrics.update(memory_gib())
        return metrics

    def _step(self, finite: bool) -> bool:
        """The optimizer step, unless a micro-batch loss was inf/NaN on any rank (the ranks agree, so ZeRO's
        collectives stay in step) or DeepSpeed finds the gradients inf/NaN. Returns whether it was applied."""
        engine, skipped = self.engine, self.engine.skipped_steps
        checked_by_deepspeed = engine.zero_optimization() or engine.bfloat16_enabled()
        if finite and not checked_by_deepspeed:  # plain fp32 has no overflow check: a finite loss can still
            grads = [
                p.grad for p in engine.module.parameters() if p.grad is not None
            ]  # give inf/NaN gradients
            finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if self.spec.train.world_size > 1:
            finite = float(all_reduce_sum(torch.tensor([0.0 if finite else 1.0]))[0]) == 0.0
        if finite or checked_by_deepspeed:
            # ZeRO's optimizers and the bf16 one drop a step whose gradient norm is inf/NaN (skipped_steps)
            engine.step()
            if not finite and engine.skipped_steps == skipped:
                raise RuntimeError(
                    "DeepSpeed applied an optimizer step with a non-finite loss: weights unusable"
                )
        else:  # DeepSpeed's plain fp32 path would apply NaN gradients: they are the parameters' own, drop them
            engine.zero_grad()
        return finite and engine.skipped_steps == skipped

    @torch.no_grad()
    def batch_logprobs(self, model, batch: RolloutBatch) -> torch.Tensor:
        """[B, L-1] log-probs of `batch` under `model` (no grad), in length-grouped (packed) micro-batches."""
        device, t = self.engine.device, self.spec.train
        units = self.units(batch.lengths, batch.group_size if t.share_prompts else 1)
        out = torch.zeros(batch.action_mask.shape)
        for rows in units.micro_batches(torch.arange(len(units.lengths)), t.micro_batch_size):
            mb = batch.select(rows)
            logp, _ = response_logprobs(
                model,
                mb.input_ids.to(device),
                mb.attention_mask.to(device),
                mb.action_mask.to(device),
                mb.temperature,
                chunk=t.logprob_chunk,
                group_size=units.group_size,
            )
            out[rows, : logp.shape[1]] = logp.cpu()
        return out

    @staticmethod
    def units(lengths: torch.Tensor, group_size: int) -> Units:
        return Units(lengths, group_size if group_size > 1 and len(lengths) % group_size == 0 else 1)


class Units:
    """What steps and micro-batches are cut from: rows, or whole prompt groups of `group_size` rows."""

    def __init__(self, row_lengths: torch.Tensor, group_size: int) -> None:
        self.group_size = group_size
        self.lengths = group_lengths(row_lengths, group_size) if group_size > 1 else row_lengths

    def rows(self, units: torch.Tensor) -> torch.Tensor:
        return group_rows(units, self.group_size) if self.group_size > 1 else units

    def micro_batches(self, units: torch.Tensor, rows_per_micro_batch: int) -> list[torch.Tensor]:
        per = max(1, rows_per_micro_batch // self.group_size)
        return [self.rows(mb) for mb in micro_batches(units, self.lengths, per)]
