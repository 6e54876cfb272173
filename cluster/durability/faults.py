"""What counts as a lost member, how long a remote call may take, and how many losses a role may have.

A learner or critic rank that dies, or a group call that passes its deadline (a collective stalled because a peer
is gone), is a `RankLost`: the loop rebuilds the group from the last checkpoint. A role that loses more members
than `faults.retries.<role>` allows within `faults.retry_window_iterations` raises `RetriesExhausted`, naming the
role.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

# Messages of a collective whose peer is gone (gloo on CPU, NCCL on GPU, torch.distributed's wrappers).
_COLLECTIVE = (
    "gloo",
    "nccl",
    "connection closed by peer",
    "connection reset",
    "distbackenderror",
    "processgroup",
    "timed out",
)


class RankLost(RuntimeError):
    def __init__(self, role: str, reason: str) -> None:
        super().__init__(f"{role}: {reason}")
        self.role, self.reason = role, reason


class RetriesExhausted(RuntimeError):
    def __init__(self, role: str, used: int, budget: int, cause: str, window: int = 0) -> None:
        within = f" in the last {window} iterations (faults.retry_window_iterations)" if window else ""
        super().__init__(
            f"{role}: lost {used} time(s){within}, more than faults.retries.{role}={budget} allows; last: {cause}"
        )
        self.role = role


def is_collective_failure(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return any(mark in text for mark in _COLLECTIVE)


def gather(refs: Sequence[ray.ObjectRef], deadline_s: float, role: str) -> list:
    """ray.get of a group call, failing fast: a dead rank, or a rank whose collective failed, is a RankLost at
    once (not after the others' deadline); no answer from every rank within `deadline_s` is a RankLost too."""
    pending, end = list(refs), time.monotonic() + deadline_s
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, end - time.monotonic()))
        if not ready:
            raise RankLost(role, f"{len(pending)} rank(s) gave no answer within {deadline_s:.0f}s (stalled)")
        for ref in ready:
            try:
                ray.get(ref)
            except RayActorError as e:
                raise RankLost(role, f"a rank died ({type(e).__name__})") from e
            except ObjectLostError as e:  # its answer went with its node: the rank went too
                raise RankLost(role, f"a rank's answer was lost ({type(e).__name__})") from e
            except RayTaskError as e:
                if is_collective_failure(e):
                    raise RankLost(role, f"a collective failed: {str(e).splitlines()[0][:200]}") from e
                raise
    return ray.get(list(refs))


class RetryBudget:
    """Losses per role against faults.retries, over a window of the run's last `window` iterations (0: the whole
    run): a loss older than that no longer counts, so a long run's rare losses do not add up to a stop. The loop
    ticks the clock once per iteration (a redone one too); each loss keeps the clock it happened at. Metrics:
    faults/lost/<role> (all losses) and faults/window/<role> (those that count now)."""

    def __init__(self, budgets: dict[str, int], window: int = 0) -> None:
        self.budgets, self.window = dict(budgets), window
        self.clock = 0
        self.lost: dict[str, int] = {}  # every loss of the run, per role
        self.clocks: dict[str, list[int]] = {}  # the clocks of the losses still in the window
        self.objects_lost = 0  # finished chunks whose results were lost and were done again (Pool.collect)

    def tick(self) -> None:
        self.clock += 1
        self._forget()

    def spend(self, role: str, cause: str) -> None:
        self.lost[role] = self.lost.get(role, 0) + 1
        self.clocks.setdefault(role, []).append(self.clock)
        used, budget = len(self.clocks[role]), self.budgets.get(role, 0)
        if used > budget:
            raise RetriesExhausted(role, used, budget, cause, self.window)

    def _forget(self) -> None:
        if self.window > 0:
            for role, clocks in self.clocks.items():
                self.clocks[role] = [c for c in clocks if self.clock - c < self.window]

    def metrics(self) -> dict:
        out = {}
        for role in sorted(self.lost):
            out[f"faults/lost/{role}"] = self.lost[role]
            out[f"faults/window/{role}"] = len(self.clocks.get(role, []))
        if self.objects_lost:
            out["faults/objects_lost"] = self.objects_lost
        return out

    def state_dict(self) -> dict:
        return {
            "clock": self.clock,
            "lost": dict(self.lost),
            "clocks": {r: list(c) for r, c in self.clocks.items()},
            "objects_lost": self.objects_lost,
        }

    def load_state_dict(self, state: dict) -> None:
        if "clocks" not in state:  # a checkpoint of an older troupe: {role: losses}, all counted from now on
            state = {"clock": 0, "lost": state, "clocks": {role: [0] * n for role, n in state.items()}}
        self.clock, self.lost = int(state["clock"]), dict(state["lost"])
        self.objects_lost = int(state.get("objects_lost", 0))  # absent before troupe counted them
        self.clocks = {role: [int(c) for c in clocks] for role, clocks in state["clocks"].items()}
        self._forget()
