"""The driver's side of GPU weight sync on vLLM's weight-transfer engine (actors/weight_transfer.py).

The weight-update group is learner rank 0 plus every vLLM worker of every live generator (one rank per
tensor-parallel GPU); it is formed on the first sync and again whenever the generator set changes (a replacement, a
resize), since an NCCL group has a fixed size. Rank 0 mints the group's NCCL unique id and every member joins with
it at once (no port is probed). Each sync sends the generators the layout (once per group) with the version, starts
the broadcast on the learner ranks, and checks that every generator reports rank 0's digest (each tensor checked on
arrival). Any failure tears the group down and the sync falls back to the object store (`push_weights`); the next
sync forms a new group. New members are refitted through the object store before they join (Pool.on_join), so a
group only ever holds current generators.

Limits: NCCL has no timeout of its own, so a generator that dies in the middle of a broadcast stalls learner rank 0
until `faults.learn_s`, which the loop treats as a lost rank (rebuild from the newest checkpoint); so does a
failure on rank 0 in the middle of a broadcast (the generators wait in theirs), and one of a generator before it
enters the broadcast or the group's init (a unique-id group has no barrier to time out at). vLLM loads each
tensor as it arrives (in place, layer by layer): a generator whose transfer fails holds a mix of versions, and is
STALE until the object store refits it. Whole GPUs only: two group members on one GPU cannot share an NCCL
communicator.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from troupe.actors.weight_transfer import rank_offsets
from troupe.cluster.durability.faults import RankLost
from troupe.cluster.fleet.learners import LearnerGroup
from troupe.cluster.fleet.pool import Health, Pool

log = logging.getLogger("troupe.nccl_sync")


@dataclass
class NcclSync:
    deadline_s: float = 600.0
    tensor_parallel: int = 1  # vLLM workers per generator: each is a rank of the group
    members: tuple = ()  # the generator members (by index) the current group was formed with
    info: dict = field(default_factory=dict)  # the weights' layout (vLLM's update info), fixed for a model
    failures: int = 0

    def push(
        self, generators: Pool, learners: LearnerGroup, version: int, wait_s: float | None = None
    ) -> dict | None:
        """Broadcast `version` to the live generators; None when it failed (the caller falls back to the object
        store, whose export raises RankLost if a learner rank is really gone). `wait_s` covers generate calls
        queued before the sync (async mode)."""
        live = generators.live()
        try:
            if tuple(m.index for m in live) != self.members:
                self._form(live, learners, wait_s or self.deadline_s)
            refs = [
                m.handle.receive_weights.remote(version, self.info, m.health is Health.STALE) for m in live
            ]
            sent = learners.send_weights(version, self.info)
            got = ray.get(refs, timeout=wait_s or self.deadline_s)
        except (RayActorError, RayTaskError, GetTimeoutError, RankLost) as e:
            self.failures += 1
            log.warning("NCCL weight sync v%d failed (%s); falling back to the object store", version, e)
            self.close(generators, learners)
            return None
        stale = 0
        for m, report in zip(live, got, strict=True):
            if report["version"] != version or report["checksum"] != sent:
                m.health, stale = Health.STALE, stale + 1
            else:
                m.health, m.info["version"] = Health.HEALTHY, version
        return {
            "generators_synced": len(live) - stale,
            "generators_stale": stale,
            "tensors": len(self.info["names"]),
            "transport_nccl": 1,
            "generator_load_s": max((r["load_s"] for r in got), default=0.0),
        }

    def _form(self, live, learners: LearnerGroup, wait_s: float) -> None:
        self.close_group(live, learners)
        if not self.info:
            self.info = learners.weight_layout()
        offsets, world = rank_offsets([self.tensor_parallel] * len(live))
        unique_id = learners.open_weight_transfer()
        # every member enters NCCL's init at once (a unique-id group has no store to wait at)
        refs = [
            m.handle.join_weight_transfer.remote(unique_id, at, world)
            for m, at in zip(live, offsets, strict=True)
        ]
        learners.join_weight_transfer(unique_id, world)
        ray.get(refs, timeout=wait_s)
        self.members = tuple(m.index for m in live)
        log.info(
            "NCCL weight-update group formed: learner rank 0 + %d generators (%d ranks)", len(live), world
        )

    def reset(self) -> None:
        """Learner rank 0 was rebuilt: the next sync forms a new group (generators leave their old one on joining)."""
        self.members = ()

    def close(self, generators: Pool, learners: LearnerGroup) -> None:
        self.close_group(generators.live(), learners)

    def close_group(self, live, learners: LearnerGroup) -> None:
        if not self.members:
            return
        for m in live:  # a member stuck in a broadcast gets this after it (limits: see the module docstring)
            try:
                m.handle.leave_weight_transfer.remote()
            except Exception:
                pass
        try:
            learners.leave_weight_transfer()
        except Exception:  # a lost rank is the learner group's business
            pass
        self.members = ()
