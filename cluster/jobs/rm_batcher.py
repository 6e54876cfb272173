"""Merges concurrent scoring requests into fleet batches for the reward service.

One thread owns the reward fleet. It takes the oldest request and every request that queued meanwhile (while the
previous batch was on the fleet), waiting up to `serve.batch_wait_ms` for more when that is set, until the batch
holds `serve.max_batch_items` items; the fleet scores the whole batch at once and each request gets its own
slice. At most `serve.max_queued` items wait: `submit` refuses more (QueueFull) instead of queueing without bound.

A batch may cost `serve.retries` shard losses (each loss replaces the shard and rescores its chunk, Pool.collect);
past that, or on any other error, its requests are scored one at a time, each with a budget of its own, so the
request whose item kills shards fails alone, with its error, and the others are scored. Every pool is then topped
back up to the size it started with: a loss past the budget is not replaced (Pool.replace), and the service must
not shrink for every later request.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from troupe.actors.protocol import Rollout
from troupe.actors.reward.aggregation import TOKEN_PREFIX, split_tokens
from troupe.cluster.config.reward_schema import ServeConfig
from troupe.cluster.durability.faults import RetryBudget

log = logging.getLogger("troupe.rm_serve")


class QueueFull(RuntimeError):
    """More items would wait for the fleet than `max_queued`."""


@dataclass
class Job:
    rollouts: list[Rollout]
    future: Future


class Batcher:
    def __init__(self, fleet, serve: ServeConfig, deadline_s: float | None) -> None:
        """`serve.max_batch_items` per fleet batch, `serve.batch_wait_ms` for more, `serve.retries` shard losses per
        batch, `serve.max_queued` items waiting; `deadline_s` per fleet call (faults.score_s)."""
        self.fleet, self.serve, self.deadline_s = fleet, serve, deadline_s
        self.sizes = {name: len(pool.live()) for name, pool in fleet.pools.items()}
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.queued = 0  # items in `jobs`; the lock guards only this count
        self.lock = threading.Lock()
        self.stats = {"batches": 0, "items": 0, "requests": 0, "split_batches": 0, "refused": 0}
        self.thread = threading.Thread(target=self._run, daemon=True, name="rm-batcher")
        self.thread.start()

    def submit(self, rollouts: list[Rollout]) -> Future:
        with self.lock:
            if self.queued + len(rollouts) > self.serve.max_queued:
                self.stats["refused"] += 1
                raise QueueFull(
                    f"{self.queued} items wait for the fleet; {len(rollouts)} more would pass "
                    f"serve.max_queued={self.serve.max_queued}"
                )
            self.queued += len(rollouts)
        future: Future = Future()
        self.jobs.put(Job(rollouts, future))
        return future

    def close(self) -> None:
        """Stop after the batch in flight; requests still queued are cancelled (their clients get an error)."""
        self.jobs.put(None)
        self.thread.join(timeout=30)
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.future.cancel()

    def _take(self, job: Job | None) -> Job | None:
        if job is not None:
            with self.lock:
                self.queued -= len(job.rollouts)
        return job

    def _run(self) -> None:
        while True:
            first = self._take(self.jobs.get())
            if first is None:
                return
            batch, size = [first], len(first.rollouts)
            wait_s = self.serve.batch_wait_ms / 1000
            while size < self.serve.max_batch_items:
                try:
                    job = self.jobs.get(timeout=wait_s) if wait_s > 0 else self.jobs.get_nowait()
                    job = self._take(job)
                except queue.Empty:
                    break
                if job is None:
                    self.jobs.put(None)  # stop after this batch
                    break
                batch.append(job)
                size += len(job.rollouts)
            self._score(batch)

    def _score(self, batch: list[Job]) -> None:
        batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
        if not batch:
            return
        try:
            parts = self._fleet_score(
                [r for j in batch for r in j.rollouts], [len(j.rollouts) for j in batch]
            )
        except Exception as e:  # noqa: BLE001 (isolate the request at fault)
            self._top_up()
            if len(batch) == 1:
                batch[0].future.set_exception(e)
                return
            log.warning("a batch of %d requests failed (%r); scoring them one by one", len(batch), e)
            self.stats["split_batches"] += 1
            for job in batch:
                try:
                    job.future.set_result(self._fleet_score(job.rollouts, [len(job.rollouts)])[0])
                except Exception as one:  # noqa: BLE001
                    self._top_up()
                    job.future.set_exception(one)
            return
        for job, values in zip(batch, parts, strict=True):
            job.future.set_result(values)

    def _top_up(self) -> None:
        """Restart the members a failed batch lost past its budget, so the next batch finds every pool whole."""
        for name, pool in self.fleet.pools.items():
            missing = self.sizes[name] - len(pool.live())
            if missing > 0:
                try:
                    pool.spawn(missing)
                except Exception:  # noqa: BLE001 (the next failed batch tries again)
                    log.exception("%s: could not restart %d lost member(s)", name, missing)

    def _fleet_score(self, rollouts: list[Rollout], sizes: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """The fleet's values for `rollouts`, cut into `sizes`; each batch has its own shard-loss budget."""
        budget = RetryBudget({"reward": self.serve.retries})
        for pool in self.fleet.pools.values():
            pool.budget = budget
        values = self.fleet.score(rollouts, deadline_s=self.deadline_s)
        self.stats["batches"] += 1
        self.stats["items"] += len(rollouts)
        self.stats["requests"] += len(sizes)
        return cut(values, rollouts, sizes)


def cut(values: dict[str, torch.Tensor], rollouts: Sequence[Rollout], sizes: Sequence[int]) -> list[dict]:
    """Split merged values (per-token channels included) back into per-request parts of `sizes` rollouts."""
    out: list[dict] = [{} for _ in sizes]
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    for name, v in values.items():
        if name.startswith(TOKEN_PREFIX):
            per_rollout = split_tokens(v, rollouts)
            for k in range(len(sizes)):
                chunk = per_rollout[bounds[k] : bounds[k + 1]]
                out[k][name] = torch.cat(chunk) if chunk else v[:0]
        else:
            for k in range(len(sizes)):
                out[k][name] = v[bounds[k] : bounds[k + 1]]
    return out
