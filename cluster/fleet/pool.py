"""Pools of actors per role: spawn, health, replace on failure, resize while running, and fan-out calls.

A pool knows nothing about what its actors do; the loop asks it to split work across serving members.
A chunk whose actor dies is retried on a replacement, and one whose result is lost (ObjectLostError) is done
again, so accepted work is not lost.

Member states: STARTING (spawned, not ready) -> STALE (alive, without the current weights) -> HEALTHY (serving).
A new member goes through `on_join` (the generators' refit) before it serves, so it never generates with old
weights; a member that misses a sync is STALE until a later one, or `refit_stale` before the pool next serves,
reaches it. A member retired by a shrink while it
still has work in flight is DRAINING: it gets nothing new and is stopped when its last chunk is collected.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError

from troupe.actors.weight_buckets import WeightTransferError
from troupe.cluster.durability.faults import RetryBudget

log = logging.getLogger("troupe.fleet")


class Health(Enum):
    STARTING = "starting"
    HEALTHY = "healthy"
    STALE = "stale"  # alive but without the current weights: serves nothing until it takes them
    DRAINING = "draining"  # retired by a shrink; finishes the chunks it has, then stops
    DEAD = "dead"


@dataclass
class Member:
    index: int
    handle: Any
    health: Health = Health.STARTING
    info: dict = field(default_factory=dict)
    in_flight: int = 0  # chunks submitted and not yet collected
    slot: int = (
        0  # the lowest number no other member holds: a replacement takes its predecessor's (its bundle)
    )


class Pool:
    """Actors of one role, created by `factory(index, slot) -> actor handle` (`slot`: see Member).

    `timeout_s` bounds start-up (and calls without their own deadline); `budget` (faults.retries, under the role's
    first word: "reward-armo" spends "reward") limits how many members may be replaced. `on_join(member)` brings a
    started member up to date (the generators' latest weights) before it serves; None: members serve when ready.
    """

    def __init__(
        self,
        role: str,
        factory: Callable[[int], Any],
        timeout_s: float,
        budget: RetryBudget | None = None,
    ) -> None:
        self.role = role
        self.factory = factory
        self.timeout_s = timeout_s
        self.budget = budget
        self.members: list[Member] = []
        self.on_join: Callable[[Member], None] | None = None
        self._next_index = 0
        self.replacements = 0
        self.redone_chunks = 0  # chunks redone on another member after theirs died, hung or was retired
        self.objects_lost = 0  # finished chunks whose results were lost (their node's object store went)
        self.weights_group: str | None = None  # generators: the concurrency group that takes weights, if any

    def spawn(self, count: int) -> list[Member]:
        new: list[Member] = []
        for _ in range(count):
            held = {m.slot for m in self.members + new if m.health is not Health.DEAD}
            slot = min(set(range(len(held) + 1)) - held)
            new.append(Member(self._next_index, self.factory(self._next_index, slot), slot=slot))
            self._next_index += 1
        try:
            infos = ray.get([m.handle.ready.remote() for m in new], timeout=self.timeout_s)
        except Exception:
            for m in new:  # none of them joins: a half-started actor must not hold resources
                ray.kill(m.handle)
            raise
        for m, info in zip(new, infos, strict=True):
            m.health, m.info = Health.STALE, info
        self.members.extend(new)
        for k, m in enumerate(new):
            try:
                if self.on_join is not None:
                    self.on_join(m)
            except BaseException:
                for failed in new[k:]:  # not brought up to date: they must not linger, stale, in the pool
                    self._stop(failed)
                raise
            m.health = Health.HEALTHY
        log.info("%s: %d member(s) ready", self.role, len(new))
        return new

    def healthy(self) -> list[Member]:
        """The members that serve: alive and holding the current weights."""
        return [m for m in self.members if m.health is Health.HEALTHY]

    def live(self) -> list[Member]:
        """Alive members that a weight sync should reach: serving or stale."""
        return [m for m in self.members if m.health in (Health.HEALTHY, Health.STALE)]

    def resize(self, count: int) -> dict:
        """Grow by spawning (each new member joins through `on_join`), shrink by retiring the newest members.
        Returns how many were added and retired."""
        live = self.live()
        added = self.spawn(count - len(live)) if count > len(live) else []
        retired = live[count:][::-1]
        for m in retired:
            self.retire(m)
        if added or retired:
            log.info("%s: resized to %d (+%d, -%d)", self.role, count, len(added), len(retired))
        return {"added": len(added), "retired": len(retired)}

    def refit_stale(self, refit: Callable[[Member], None]) -> dict:
        """Members that missed a weight sync (STALE) take the current weights now (`refit`, the generators'
        on_join), before the pool is asked to serve: else a pool whose every member missed one has none to serve.
        A member that fails again is replaced (spending the role's budget); its replacement joins through
        `on_join`. Returns how many were refitted and replaced."""
        refitted = replaced = 0
        for m in [m for m in self.members if m.health is Health.STALE]:
            try:
                refit(m)
            except (RayActorError, GetTimeoutError, WeightTransferError) as e:
                self.replace(m, f"could not take the current weights ({type(e).__name__})")
                replaced += 1
                continue
            m.health = Health.HEALTHY
            refitted += 1
        if refitted or replaced:
            log.warning("%s: %d stale member(s) refitted, %d replaced", self.role, refitted, replaced)
        return {"refit": refitted, "replaced": replaced}

    def retire(self, member: Member) -> None:
        """Stop a member on purpose: at once when idle, else after its in-flight chunks are collected."""
        if member.in_flight:
            member.health = Health.DRAINING
            return
        self._stop(member)

    def _stop(self, member: Member) -> None:
        member.health = Health.DEAD
        try:
            ray.kill(member.handle)
        except Exception:  # already gone
            pass
        if member in self.members:
            self.members.remove(member)

    def replace(self, member: Member, cause: str = "died") -> Member:
        self._stop(member)
        self.replacements += 1
        while True:  # a replacement that fails to start spends the budget too, until RetriesExhausted
            log.warning("%s: member %d %s; starting a replacement", self.role, member.index, cause)
            if self.budget is not None:
                self.budget.spend(self.role.split("-")[0], f"{self.role} member {member.index} {cause}")
            try:
                return self.spawn(1)[0]
            except (RayActorError, GetTimeoutError, WeightTransferError) as e:
                if self.budget is None:
                    raise
                cause = f"replacement failed to start ({type(e).__name__})"

    def submit_chunks(self, method: str, items: Sequence, *args) -> PendingChunks:
        """Split `items` into one contiguous chunk per serving member and call `method(chunk, *args)` on each,
        without waiting: `collect()` on the result gathers them (in order)."""
        members = self.healthy()
        if not members:
            raise RuntimeError(f"{self.role}: no healthy members")
        chunks = split_evenly(items, len(members))
        refs = [getattr(m.handle, method).remote(c, *args) for m, c in zip(members, chunks, strict=True)]
        for m in members:
            m.in_flight += 1
        return PendingChunks(self, method, args, members, chunks, refs)

    def map_chunks(self, method: str, items: Sequence, *args, deadline_s: float | None = None) -> list:
        """`submit_chunks` then `collect`: the results of every chunk, concatenated in order."""
        return self.submit_chunks(method, items, *args).collect(deadline_s)

    def _done_with(self, member: Member) -> None:
        member.in_flight -= 1
        if member.health is Health.DRAINING and member.in_flight == 0:
            self._stop(member)

    def lost_result(self, member: Member, error: ObjectLostError) -> None:
        self.objects_lost += 1
        if self.budget is not None:
            self.budget.objects_lost += 1  # faults/objects_lost in the rows
        log.warning(
            "%s: member %d's result was lost (%s); its chunk is done again",
            self.role,
            member.index,
            type(error).__name__,
        )

    def _redo_target(self, member: Member, cause: str) -> Member:
        """Where a failed chunk goes: a replacement (spending the budget), or, for a member retired on purpose,
        any serving member."""
        self.redone_chunks += 1
        if member.health in (Health.DRAINING, Health.DEAD) and member not in self.live():
            serving = self.healthy()
            if serving:
                return serving[self.redone_chunks % len(serving)]
        return self.replace(member, cause)

    def shutdown(self) -> None:
        for m in list(self.members):
            try:
                ray.kill(m.handle)
            except Exception:
                pass
        self.members.clear()


@dataclass
class PendingChunks:
    """Chunks submitted to a pool's members, not yet collected."""

    pool: Pool
    method: str
    args: tuple
    members: list[Member]
    chunks: list[list]
    refs: list

    def collect(self, deadline_s: float | None = None) -> list:
        """Wait for every chunk, in order. A chunk whose actor dies, or does not answer within `deadline_s` (a
        hung member), is redone on a replacement member, until the role's retry budget runs out: accepted work is
        not lost. The deadline starts here, once for the call: work queued behind other calls is not penalised
        for waiting its turn before collect."""
        deadline = deadline_s or self.pool.timeout_s
        end = time.monotonic() + deadline
        results = []
        owners = list(self.members)
        try:
            for i, (chunk, ref) in enumerate(zip(self.chunks, self.refs, strict=True)):
                m, lost = owners[i], 0
                while True:
                    try:
                        results.append(ray.get(ref, timeout=max(0.0, end - time.monotonic())))
                        break
                    except (
                        ObjectLostError
                    ) as e:  # OwnerDied, ReconstructionFailed, FetchTimedOut: all subclasses
                        # The chunk finished but its result went with its node: it is done again, on the same
                        # member if it still serves (one that died with the node fails that call and is
                        # replaced then); a second loss of the same chunk goes to a replacement.
                        lost += 1
                        self.pool.lost_result(m, e)
                        if lost > 1 or m not in self.pool.live():
                            m = self.pool._redo_target(m, "lost its result")
                        ref = getattr(m.handle, self.method).remote(chunk, *self.args)
                        end = time.monotonic() + deadline
                    except (RayActorError, GetTimeoutError) as e:
                        cause = (
                            "died"
                            if isinstance(e, RayActorError)
                            else f"gave no answer within {deadline:.0f}s"
                        )
                        m = self.pool._redo_target(m, cause)
                        ref = getattr(m.handle, self.method).remote(chunk, *self.args)
                        end = time.monotonic() + deadline  # the redone chunk gets a full deadline
        finally:  # also when a redo fails: no member may stay counted as busy (a DRAINING one would never stop)
            self._release()
        return results

    def cancel(self) -> None:
        """Abandon the chunks (a rollback): calls still queued are cancelled, running ones finish unobserved."""
        for ref in self.refs:
            try:
                ray.cancel(ref)
            except Exception:  # already finished, or the actor is gone
                pass
        self._release()

    def _release(self) -> None:
        if self.members:
            for m in self.members:
                self.pool._done_with(m)
            self.members = []


def split_evenly(items: Sequence, parts: int) -> list[list]:
    """Contiguous, order-preserving split into `parts` chunks whose sizes differ by at most one."""
    base, extra = divmod(len(items), parts)
    out, lo = [], 0
    for i in range(parts):
        hi = lo + base + (1 if i < extra else 0)
        out.append(list(items[lo:hi]))
        lo = hi
    return out
