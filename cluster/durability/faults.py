"""What counts as a lost member, how long a remote call may take, and how many losses a role may have.

A learner or critic rank that dies, or a group call that passes its deadline (a collective stalled because a peer
is gone), is a `RankLost`: the loop rebuilds the group from the last checkpoint. A role that loses more members
than `faults.retries.<role>` allows raises `RetriesExhausted`, naming the role.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import ray
from ray.exceptions import RayActorError, RayTaskError

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
    def __init__(self, role: str, used: int, budget: int, cause: str) -> None:
        super().__init__(
            f"{role}: lost {used} time(s), more than faults.retries.{role}={budget} allows; last: {cause}"
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
            except RayTaskError as e:
                if is_collective_failure(e):
                    raise RankLost(role, f"a collective failed: {str(e).splitlines()[0][:200]}") from e
                raise
    return ray.get(list(refs))


class RetryBudget:
    """Losses per role against faults.retries; counted for the metrics (faults/lost/<role>)."""

    def __init__(self, budgets: dict[str, int]) -> None:
        self.budgets, self.used = dict(budgets), {}

    def spend(self, role: str, cause: str) -> None:
        self.used[role] = self.used.get(role, 0) + 1
        budget = self.budgets.get(role, 0)
        if self.used[role] > budget:
            raise RetriesExhausted(role, self.used[role], budget, cause)

    def metrics(self) -> dict:
        return {f"faults/lost/{role}": n for role, n in sorted(self.used.items())}

    def state_dict(self) -> dict:
        return dict(self.used)

    def load_state_dict(self, state: dict) -> None:
        self.used = dict(state)
