"""Durable runs: the driver's state, run checkpoints, resume, and recovery from a lost learner or critic rank.

The driver's state (iteration, weight version, data cursor, KL controller, reward normaliser, RNG, fleet layout,
accounting, losses per role) goes in a checkpoint's state.json beside the ranks' DeepSpeed states. Recovery and
resume share one path: restore the state, give the ranks their DeepSpeed states, give the generators the restored
weights, and rewind the metrics so no iteration appears twice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from troupe.cluster.durability.checkpoint import checkpoint_name, verify, write_checkpoint
from troupe.cluster.durability.faults import RankLost
from troupe.cluster.durability.stop_signal import watch_stop_signals
from troupe.cluster.sync.object_store import push_weights

log = logging.getLogger("troupe.durable")


def driver_state(run, iteration: int) -> dict:
    return {
        "iteration": iteration,
        "weight_version": run.version,
        "data": run.pipeline.cursor_state(run.prompts),  # batches in flight (async) are served again
        "kl_coef": run.kl.coef,
        "reward_aggregation": run.aggregation.state_dict(),
        "rng": _jsonable(run.rng.getstate()),
        "fleet": {
            "generators": len(run.generators.live()),
            "reward": {name: len(pool.live()) for name, pool in run.rewards.pools.items()},
        },
        "ledger": run.ledger.state_dict(),
        "faults": run.budget.state_dict(),
    }


def restore_driver_state(run, state: dict, counters: bool) -> None:
    """Put `state` back; `counters` (a resume) also restores the accounting and the losses per role, which a
    recovery inside the run keeps counting instead."""
    run.version = state["weight_version"]
    run.pipeline.discard()  # sampled by weights that are undone; the restored cursor serves them again
    run.prompts.load_state_dict(state["data"])
    run.kl.coef = state["kl_coef"]
    run.aggregation.load_state_dict(state["reward_aggregation"])
    run.rng.setstate(_tuples(state["rng"]))
    if counters:
        run.ledger.load_state_dict(state["ledger"])
        run.budget.load_state_dict(state["faults"])


@dataclass
class RunCheckpoints:
    """Writes run checkpoints when due or asked to stop, and rolls a run back to the newest one."""

    out_dir: Path
    every: int
    keep: int
    tokenizer_path: str
    last: Path | None = None  # the newest complete checkpoint of this run
    initial: dict = field(default_factory=dict)  # the state before the first iteration: a rollback target
    stats: dict = field(default_factory=dict)  # the last write (bytes, write_s) and recovery (recover_s)
    stop_signal: int | None = None
    identity: dict = field(
        default_factory=dict
    )  # the run id and fingerprint every state.json carries (admit)

    def due(self, iteration: int) -> bool:
        return self.stop_signal is not None or (self.every > 0 and (iteration + 1) % self.every == 0)

    def save(self, run, iteration: int, state: dict | None = None) -> Path:
        def parts(tmp: Path) -> None:
            run.learners.save_hf(str(tmp / "policy"), self.tokenizer_path)
            run.learners.save_state(str(tmp / "policy-ds"))
            if run.critic is not None:
                run.critic.save_state(str(tmp / "critic-ds"))

        state = {**(state or driver_state(run, iteration)), **self.identity}
        self.last, written = write_checkpoint(self.out_dir, iteration, parts, state, self.keep)
        self.stats.update(written)
        log.info(
            "checkpoint %s (%.1f MB in %.1fs)", self.last, self.stats["bytes"] / 1e6, self.stats["write_s"]
        )
        return self.last

    def load_ranks(self, run, folder: Path) -> None:
        run.learners.load_state(str(folder / "policy-ds"))
        if run.critic is not None:
            run.critic.load_state(str(folder / "critic-ds"))

    def save_before_stopping(self, run, role: str, before: dict) -> None:
        """A generator or reward fleet out of retries: the learners did not step this iteration, so the state from
        before it is whole; its prompts are retried by the resume. (A lost learner's state is the last checkpoint.)"""
        if role in ("learner", "critic"):
            run.ledger.roll_back([])
        else:
            self._save_whole(run, before, recorded=False)
        log.error(
            "%s out of retries; the newest checkpoint is %s (resume=latest)",
            role,
            self.last or "none: start over",
        )

    def save_after_error(self, run, error: Exception, before: dict, recorded: bool) -> None:
        """An unexpected error ends the run: first the last whole state is written, if the learners still hold it
        and can write it. A save that fails too is logged; either way the caller re-raises `error`."""
        try:
            self._save_whole(run, before, recorded)
        except Exception as failed:  # learners gone, disk full: write_checkpoint leaves no complete folder
            log.error(
                "%s: %s; the checkpoint of the last whole state failed too (%s: %s); the newest checkpoint is %s",
                type(error).__name__,
                error,
                type(failed).__name__,
                failed,
                self.last or "none: start over",
            )
            return
        log.error(
            "%s: %s; the newest checkpoint is %s (resume=latest)",
            type(error).__name__,
            error,
            self.last or "none: start over",
        )

    def _save_whole(self, run, before: dict, recorded: bool) -> None:
        """The state a resume can continue from: the one after the iteration once its row is recorded; else the
        one before it while the learners have not been called (its prompts become retried); else none: the
        learners moved on and the iteration is not whole, so the newest checkpoint stays the last whole state."""
        if recorded:
            iteration, state = before["iteration"] + 1, None
        else:
            run.ledger.roll_back([])
            if run.learning or run.version != before["weight_version"]:
                return
            iteration, state = before["iteration"], {**before, "ledger": run.ledger.state_dict()}
        if iteration < 0 or (self.last is not None and self.last.name == checkpoint_name(iteration)):
            return  # nothing trained yet (a restart is the same), or written already
        self.save(run, iteration, state)

    def recover(self, run, lost: RankLost, job) -> int:
        """Rebuild the lost group (and its partner: policy and critic move together), roll everything back to the
        newest checkpoint (or the start), and return the iteration to continue from. A loss during the rebuild
        starts it again; every loss spends the role's retry budget, and RetriesExhausted ends the run."""
        start = time.perf_counter()
        while True:
            try:
                resume_at = self._recover(run, lost, job)
                self.stats["recover_s"] = time.perf_counter() - start
                return resume_at
            except RankLost as again:
                lost = again

    def _recover(self, run, lost: RankLost, job) -> int:
        run.budget.spend(lost.role, str(lost))
        log.warning("%s; rebuilding from %s", lost, self.last or "the initial weights")
        for group in (run.learners, run.critic):
            if group is not None:
                group.rebuild()
        # a new rank 0: an NCCL weight-update group is formed again at the next sync
        if run.gpu_sync is not None:
            run.gpu_sync.reset()
        if self.last is not None:
            state = verify(self.last)
            self.load_ranks(run, self.last)
        else:
            state = self.initial
        restore_driver_state(run, state, counters=False)
        rejoin_generators(run)
        removed = job.rewind(state["iteration"])
        retried = run.ledger.roll_back(removed)
        log.warning(
            "%s group rebuilt; continuing from iteration %d (%d prompts to retry)",
            lost.role,
            state["iteration"] + 1,
            retried,
        )
        return state["iteration"] + 1

    def watch_signals(self):
        """SIGTERM/SIGINT: finish the iteration, write a checkpoint, stop (durability/stop_signal.py)."""
        return watch_stop_signals(self, "iteration")


def rejoin_generators(run) -> None:
    """Every generator takes the learners' (restored) weights, even older ones than it holds."""
    run.last_bundle = run.learners.export_weights(run.version, run.sync_bucket_mb)
    stats = push_weights(run.generators, run.last_bundle, rollback=True, deadline_s=run.faults.sync_s)
    if stats["generators_stale"]:
        log.warning("%d generator(s) did not take the restored weights", stats["generators_stale"])


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
