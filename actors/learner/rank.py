"""What every DeepSpeed-trained role's rank shares: rendezvous address, setup timing, and the one optimizer-step
loop (micro-batches, loss scaling, accumulation boundaries, clipping) that policy, critic, DPO and reward-model
training all run.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from actors.hardware import resolve_dtype
from actors.learner.config import RankSetup
from actors.learner.engine import free_port
from actors.learner.step import StepNorm, global_counts, micro_batches, step_rows

# micro_loss(rows, norm) -> (loss to backpropagate, {metric: this micro-batch's share of the step's value})
MicroLoss = Callable[[torch.Tensor, StepNorm], tuple[torch.Tensor, dict[str, torch.Tensor | float]]]


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

    def address(self) -> tuple[str, int]:
        """Rank 0's reachable IP and a free port for the process-group rendezvous."""
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def _info(self, setup_s: float, **extra) -> dict:
        return {"rank": self.rank, "pid": os.getpid(), "dtype": self.dtype, "setup_s": setup_s, **extra}

    def optimize(
        self, lengths: torch.Tensor, token_counts: torch.Tensor, micro_loss: MicroLoss, shuffle: bool = True
    ) -> dict:
        """`epochs` passes of `mini_batches` optimizer steps over this rank's rows; returns per-step means.

        Every rank must call it with the same number of rows (ZeRO-3 gathers parameters collectively).
        """
        t = self.spec.train
        self.engine.train()
        sums: dict[str, float] = {}
        grad_norms: list[float] = []
        steps = 0
        for _ in range(t.epochs):
            for rows in step_rows(len(lengths), t.mini_batches, shuffle, self._shuffle):
                tokens, sequences = global_counts(
                    float(token_counts[rows].sum()), float(len(rows)), t.world_size > 1
                )
                norm = StepNorm(tokens, sequences, t.world_size, self.spec.response_budget)
                for mb in micro_batches(rows, lengths, t.micro_batch_size):
                    loss, stats = micro_loss(mb, norm)
                    # The caller owns the accumulation boundary (managed_gradient_accumulation=false).
                    self.engine.backward(loss, scale_wrt_gas=False)
                    for key, value in stats.items():
                        sums[key] = sums.get(key, 0.0) + float(value)
                self.engine.step()
                self.steps += 1
                steps += 1
                norm_value = self.engine.get_global_grad_norm()
                if norm_value is not None:
                    grad_norms.append(float(norm_value))
        metrics = {k: v / max(steps, 1) for k, v in sums.items()}
        metrics["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
        if steps:
            self.version += 1
        return metrics
