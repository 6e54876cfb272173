"""One optimizer step over micro-batches, shared by every trained role (policy, critic, DPO, reward model):
which rows form each step, how they are grouped into micro-batches, and how a micro-batch's loss is scaled.

A micro-batch's loss is its *sum* over tokens (or sequences) divided by the count in the whole optimizer step,
over every micro-batch and every rank. So a token's weight never depends on how the step was cut into
micro-batches or ranks (the length bias of per-micro-batch means that HF and verl fixed). DeepSpeed averages
gradients over ranks, so each rank's sum is multiplied by the world size. No Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from troupe.actors.learner.config import LOSS_AGGREGATIONS


@dataclass(frozen=True)
class StepNorm:
    """Global counts of one optimizer step."""

    tokens: float  # response tokens (or any per-token mask's ones) over all ranks
    sequences: float  # rows (sequences or pairs) over all ranks
    world: int
    budget: int = 1  # Dr. GRPO's constant: generator.max_new_tokens

    def per_token(self, summed: torch.Tensor) -> torch.Tensor:
        return summed * (self.world / max(self.tokens, 1.0))

    def per_sequence(self, summed: torch.Tensor) -> torch.Tensor:
        return summed * (self.world / max(self.sequences, 1.0))

    def reduce(self, per_token: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
        """This micro-batch's share of the step loss for a [B, T] per-token quantity."""
        mask = mask.to(per_token.dtype)
        if mode == "token_mean":
            return self.per_token((per_token * mask).sum())
        if mode == "seq_mean_token_mean":
            return self.per_sequence(((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum())
        if mode == "seq_mean_token_sum_norm":
            return self.per_sequence((per_token * mask).sum()) / self.budget
        raise ValueError(f"loss aggregation must be one of {LOSS_AGGREGATIONS}, got {mode!r}")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks of the default process group, on the device its backend needs (NCCL: CUDA only)."""
    import torch.distributed as dist

    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else values.device
    )
    reduced = values.to(device)
    dist.all_reduce(reduced)
    return reduced.to(values.device)


def global_counts(tokens: float, sequences: float, distributed: bool) -> tuple[float, float]:
    counts = torch.tensor([tokens, sequences], dtype=torch.float64)
    if distributed:
        counts = all_reduce_sum(counts)
    return float(counts[0]), float(counts[1])


def step_rows(n: int, mini_batches: int, shuffle: bool, generator: torch.Generator | None = None):
    """Row indices of each optimizer step of one epoch: `mini_batches` near-equal parts of n rows."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    steps = max(1, min(mini_batches, n))
    bounds = [round(n * k / steps) for k in range(steps + 1)]
    return [order[bounds[k] : bounds[k + 1]] for k in range(steps)]


def micro_batches(rows: torch.Tensor, lengths: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Rows of one step grouped by length into micro-batches of `size`, so each pads only to its own longest."""
    ordered = rows[torch.argsort(lengths[rows], stable=True)]
    return [ordered[lo : lo + size] for lo in range(0, len(ordered), size)]


def group_rows(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """Row indices of whole prompt groups (rows g * group_size ... g * group_size + group_size - 1)."""
    return (groups[:, None] * group_size + torch.arange(group_size)).reshape(-1)


def group_lengths(lengths: torch.Tensor, group_size: int) -> torch.Tensor:
    return lengths.view(-1, group_size).sum(-1)
