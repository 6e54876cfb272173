"""Rollouts generated ahead of learning, with bounded staleness (run.mode=async).

`depth` batches are kept in flight beyond the one being trained: while the learners train on batch i, the
generators already sample batch i+1 with the weights they hold. A batch's staleness is how many weight versions
the learner is ahead of the weights that sampled it; groups past `max_staleness` (after a failure or a rollback)
are sampled again with the current weights and counted. depth 0 is the synchronous loop.

The data cursor moves ahead of training by the batches in flight; `cursor_state` is the state before the oldest
of them, so a checkpoint resumes with those prompts, and a rollback (`discard`) serves them again.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from troupe.actors.generator.sampling import Sampling
from troupe.actors.protocol import PromptBatch, Rollout
from troupe.cluster.fleet.pool import PendingChunks, Pool


@dataclass
class InFlight:
    batch: PromptBatch
    sampling: Sampling
    pending: PendingChunks
    cursor_before: dict  # the data cursor before this batch was drawn


class RolloutPipeline:
    def __init__(self, depth: int = 0, max_staleness: int = 0) -> None:
        self.depth = depth
        self.max_staleness = max_staleness
        self.queue: deque[InFlight] = deque()
        self.regenerated = 0  # samples regenerated for staleness, over the run

    def next_batch(
        self,
        prompts,
        generators: Pool,
        sampling_for: Callable[[PromptBatch], Sampling],
        version: int,
        deadline_s: float | None,
        remaining: int,
        top_up: bool = True,
    ) -> tuple[PromptBatch, list[Rollout], dict]:
        """The next batch and its rollouts, each group at most `max_staleness` versions behind `version` (the
        weights the learners hold now). Tops the pipeline up before waiting, so the generators stay busy, but
        never beyond the `remaining` batches the run still trains after this one; `top_up=False` leaves that to
        a later `top_up` call (dynamic sampling draws its refill batches first)."""
        if not self.queue:
            self._submit(prompts, generators, sampling_for)
        head = self.queue[0]
        if top_up:  # the head is still queued
            self.top_up(prompts, generators, sampling_for, 1 + min(self.depth, remaining))
        chunks = head.pending.collect(deadline_s)
        self.queue.popleft()  # only now: a failure above leaves it to discard(), with the cursor state before it
        rollouts = [r for chunk in chunks for r in chunk]
        n = head.sampling.n
        _check_groups(rollouts, len(head.batch), n)
        stale = stale_groups(rollouts, n, version, self.max_staleness)
        regenerated = 0
        if stale:  # sample those prompts again with the current weights (they queue behind work in flight)
            wait = None if deadline_s is None else deadline_s * (1 + len(self.queue))
            again = generators.map_chunks(
                "generate", [rollouts[g * n].prompt for g in stale], head.sampling, deadline_s=wait
            )
            fresh = [r for chunk in again for r in chunk]
            for k, g in enumerate(stale):
                rollouts[g * n : (g + 1) * n] = fresh[k * n : (k + 1) * n]
            regenerated = len(stale) * n
            self.regenerated += regenerated
        return head.batch, rollouts, self._stats(rollouts, version, regenerated)

    def top_up(self, prompts, generators: Pool, sampling_for, in_flight: int) -> None:
        """Submit batches until `in_flight` are queued (after a head was taken: min(depth, batches remaining))."""
        while len(self.queue) < in_flight:
            self._submit(prompts, generators, sampling_for)

    def cursor_state(self, prompts) -> dict:
        """The cursor as if no batch were in flight: what a checkpoint records."""
        return self.queue[0].cursor_before if self.queue else prompts.state_dict()

    def discard(self) -> None:
        """A rollback: batches in flight were sampled by weights being undone; the restored cursor serves their
        prompts again."""
        for item in self.queue:
            item.pending.cancel()
        self.queue.clear()

    def _submit(self, prompts, generators: Pool, sampling_for) -> None:
        before = prompts.state_dict()
        batch = prompts.next_batch()
        sampling = sampling_for(batch)
        pending = generators.submit_chunks("generate", batch.prompts, sampling)
        self.queue.append(InFlight(batch, sampling, pending, before))

    def _stats(self, rollouts: list[Rollout], version: int, regenerated: int) -> dict:
        lags = Counter(version - r.weight_version for r in rollouts)
        total = sum(lags.values())
        stats = {
            "staleness/mean": sum(k * v for k, v in lags.items()) / total,
            "staleness/max": max(lags),
            "rollouts/regenerated": regenerated,
            "pipeline/in_flight": len(self.queue),
        }
        stats.update({f"staleness/frac_{k}": v / total for k, v in sorted(lags.items())})
        return stats


def stale_groups(rollouts: list[Rollout], n: int, version: int, max_staleness: int) -> list[int]:
    """Indices of prompt groups with any sample more than `max_staleness` versions behind `version`, or ahead of
    it (weights a rollback undid)."""
    return [
        g
        for g in range(len(rollouts) // n)
        if any(not 0 <= version - r.weight_version <= max_staleness for r in rollouts[g * n : (g + 1) * n])
    ]


def _check_groups(rollouts, num_prompts: int, n: int) -> None:
    if len(rollouts) != num_prompts * n:
        raise RuntimeError(f"expected {num_prompts} x {n} rollouts, got {len(rollouts)}")
    for i in range(0, len(rollouts), n):
        uids = {r.prompt.uid for r in rollouts[i : i + n]}
        if len(uids) != 1:
            raise RuntimeError(
                f"rollouts {i}..{i + n - 1} mix prompts {sorted(uids)}: groups must be contiguous"
            )
