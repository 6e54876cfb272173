"""What every DeepSpeed-trained role's rank shares: rendezvous address, setup timing, and micro-batch order."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from actors.hardware import resolve_dtype
from actors.learner.engine import LearnerSpec, free_port


class DeepSpeedRank:
    def __init__(self, spec: LearnerSpec, rank: int) -> None:
        self.spec = spec
        self.rank = rank
        self.engine = None
        self.steps = 0
        self.dtype = resolve_dtype(spec.dtype)
        self.export_dtype = resolve_dtype(spec.export_dtype)
        self.pad_id = 0

    def address(self) -> tuple[str, int]:
        """Rank 0's reachable IP and a free port for the process-group rendezvous."""
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def _info(self, setup_s: float, **extra) -> dict:
        return {"rank": self.rank, "pid": os.getpid(), "dtype": self.dtype, "setup_s": setup_s, **extra}

    def micro_batches(self, n: int) -> Iterator[tuple[torch.Tensor, bool, float]]:
        """(rows, steps_after, loss_scale) of each micro-batch over `epochs` shuffled passes of n rows.

        Each pass is cut into `mini_batches` optimizer steps; a micro-batch's loss is scaled by 1/(micro-batches
        in its step) so that a step averages over its micro-batches whatever their count (DPO pair counts vary).
        """
        spec = self.spec
        chunks = max(1, -(-n // spec.micro_batch_size))
        steps = min(spec.mini_batches, chunks)
        bounds = [round(chunks * (k + 1) / steps) for k in range(steps)]
        for _ in range(spec.epochs):
            order = torch.randperm(n)
            first = 0
            for end in bounds:
                for c in range(first, end):
                    rows = order[c * spec.micro_batch_size : (c + 1) * spec.micro_batch_size]
                    yield rows, c == end - 1, 1.0 / (end - first)
                first = end

    def _step(self, loss: torch.Tensor, boundary: bool, scale: float, grad_norms: list[float]) -> None:
        # The caller owns the accumulation boundary (managed_gradient_accumulation=false in ds_config).
        self.engine.backward(loss * scale, scale_wrt_gas=False)
        if boundary:
            self.engine.step()
            self.steps += 1
            norm = self.engine.get_global_grad_norm()
            if norm is not None:
                grad_norms.append(float(norm))
