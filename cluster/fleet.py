"""Pools of actors per role: spawn, health, replace on failure, resize while running, and fan-out calls.

A pool knows nothing about what its actors do; the loop asks it to split work across healthy members.
A chunk whose actor dies is retried on a replacement, so accepted work is not lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from cluster.faults import RetryBudget

log = logging.getLogger("troupe.fleet")


class Health(Enum):
    STARTING = "starting"
    HEALTHY = "healthy"
    STALE = "stale"  # alive but holds old weights until the next sync
    DEAD = "dead"


@dataclass
class Member:
    index: int
    handle: Any
    health: Health = Health.STARTING
    info: dict = field(default_factory=dict)


class Pool:
    """Actors of one role, created by `factory(index) -> actor handle`.

    `timeout_s` bounds start-up (and calls without their own deadline); `budget` (faults.retries, under the role's
    first word: "reward-armo" spends "reward") limits how many members may be replaced.
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
        self._next_index = 0
        self.replacements = 0

    def spawn(self, count: int) -> list[Member]:
        new = []
        for _ in range(count):
            new.append(Member(self._next_index, self.factory(self._next_index)))
            self._next_index += 1
        try:
            infos = ray.get([m.handle.ready.remote() for m in new], timeout=self.timeout_s)
        except Exception:
            for m in new:  # none of them joins: a half-started actor must not hold resources
                ray.kill(m.handle)
            raise
        for m, info in zip(new, infos, strict=True):
            m.health, m.info = Health.HEALTHY, info
        self.members.extend(new)
        log.info("%s: %d member(s) ready", self.role, len(new))
        return new

    def healthy(self) -> list[Member]:
        return [m for m in self.members if m.health in (Health.HEALTHY, Health.STALE)]

    def resize(self, count: int) -> None:
        """Grow by spawning, shrink by retiring the newest members."""
        live = self.healthy()
        if count > len(live):
            self.spawn(count - len(live))
        for m in live[count:][::-1]:
            self.retire(m)

    def retire(self, member: Member) -> None:
        ray.kill(member.handle)
        member.health = Health.DEAD
        self.members.remove(member)

    def replace(self, member: Member, cause: str = "died") -> Member:
        member.health = Health.DEAD
        try:
            ray.kill(member.handle)
        except Exception:  # already gone
            pass
        self.members.remove(member)
        self.replacements += 1
        while True:  # a replacement that fails to start spends the budget too, until RetriesExhausted
            log.warning("%s: member %d %s; starting a replacement", self.role, member.index, cause)
            if self.budget is not None:
                self.budget.spend(self.role.split("-")[0], f"{self.role} member {member.index} {cause}")
            try:
                return self.spawn(1)[0]
            except (RayActorError, GetTimeoutError) as e:
                if self.budget is None:
                    raise
                cause = f"replacement failed to start ({type(e).__name__})"

    def map_chunks(
        self,
        method: str,
        items: Sequence,
        *args,
        on_replace: Callable[[Member], None] | None = None,
        deadline_s: float | None = None,
    ) -> list:
        """Split `items` into one contiguous chunk per healthy member, call `method(chunk, *args)`, concatenate.

        Order is preserved. A chunk whose actor dies, or does not answer within `deadline_s` (a hung member), is
        retried on a replacement member, until the role's retry budget runs out: accepted work is not lost.
        """
        members = self.healthy()
        if not members:
            raise RuntimeError(f"{self.role}: no healthy members")
        deadline = deadline_s or self.timeout_s
        end = time.monotonic() + deadline  # one deadline for the call, not one per member waited on
        chunks = split_evenly(items, len(members))
        refs = [getattr(m.handle, method).remote(c, *args) for m, c in zip(members, chunks, strict=True)]
        results = []
        for m, chunk, ref in zip(members, chunks, refs, strict=True):
            while True:
                try:
                    results.append(ray.get(ref, timeout=max(0.0, end - time.monotonic())))
                    break
                except (RayActorError, GetTimeoutError) as e:
                    cause = (
                        "died" if isinstance(e, RayActorError) else f"gave no answer within {deadline:.0f}s"
                    )
                    m = self.replace(m, cause)
                    if on_replace is not None:
                        on_replace(m)
                    ref = getattr(m.handle, method).remote(chunk, *args)
                    end = time.monotonic() + deadline  # the redone chunk gets a full deadline
        return results

    def shutdown(self) -> None:
        for m in list(self.members):
            try:
                ray.kill(m.handle)
            except Exception:
                pass
        self.members.clear()


def split_evenly(items: Sequence, parts: int) -> list[list]:
    """Contiguous, order-preserving split into `parts` chunks whose sizes differ by at most one."""
    base, extra = divmod(len(items), parts)
    out, lo = [], 0
    for i in range(parts):
        hi = lo + base + (1 if i < extra else 0)
        out.append(list(items[lo:hi]))
        lo = hi
    return out
