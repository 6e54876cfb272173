"""The driver's side of GPU weight sync over NCCL (actors/nccl_weights.py).

The weight-update group is learner rank 0 plus every live generator; it is formed on the first sync and again
whenever the generator set changes (a replacement, a resize), since an NCCL group has a fixed size. Each sync sends
the generators the layout (once per group) with the version, starts the broadcast on the learner ranks, and checks
that every generator reports rank 0's digest. Any failure tears the group down and the sync falls back to the
object store (`push_weights`); the next sync forms a new group. New members are refitted through the object store
before they join (Pool.on_join), so a group only ever holds current generators.

Limits: NCCL has no timeout of its own, so a generator that dies in the middle of a broadcast stalls learner rank 0
until `faults.learn_s`, which the loop treats as a lost rank (rebuild from the newest checkpoint). Each generator
holds a second copy of the weights on its GPU while a version arrives (all buckets are checked before any loads).
Whole GPUs only: two group members on one GPU cannot share an NCCL communicator.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from troupe.actors.weight_buckets import WeightManifest
from troupe.cluster.durability.faults import RankLost
from troupe.cluster.fleet.learners import LearnerGroup
from troupe.cluster.fleet.pool import Health, Pool

log = logging.getLogger("troupe.nccl_sync")


@dataclass
class NcclSync:
    bucket_mb: float = 256
    deadline_s: float = 600.0
    members: tuple = ()  # the generator members (by index) the current group was formed with
    specs: list = field(default_factory=list)
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
            manifest = WeightManifest(version, tuple(self.specs))
            refs = [m.handle.receive_weights.remote(manifest, m.health is Health.STALE) for m in live]
            sent = learners.broadcast_weights(version, self.specs)
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
            "bytes": sum(s.nbytes for s in self.specs),
            "buckets": len(self.specs),
            "transport_nccl": 1,
            "generator_load_s": max((r["load_s"] for r in got), default=0.0),
            "generator_fetch_s": max((r["fetch_s"] for r in got), default=0.0),
        }

    def _form(self, live, learners: LearnerGroup, wait_s: float) -> None:
        self.close_group(live, learners)
        if not self.specs:
            self.specs = learners.weight_layout(int(self.bucket_mb * 2**20))
        host, port = learners.weight_group_address()
        world = 1 + len(live)
        refs = [m.handle.join_weight_group.remote(host, port, 1 + i, world) for i, m in enumerate(live)]
        learners.join_weight_group(host, port, world)
        ray.get(refs, timeout=wait_s)
        self.members = tuple(m.index for m in live)
        log.info("NCCL weight-update group formed: learner rank 0 + %d generators", len(live))

    def close(self, generators: Pool, learners: LearnerGroup) -> None:
        self.close_group(generators.live(), learners)

    def close_group(self, live, learners: LearnerGroup) -> None:
        if not self.members:
            return
        for m in live:  # a member stuck in a broadcast gets this after it (limits: see the module docstring)
            try:
                m.handle.leave_weight_group.remote()
            except Exception:
                pass
        try:
            learners.leave_weight_group()
        except Exception:  # a lost rank is the learner group's business
            pass
        self.members = ()


def nccl_enabled(
    transport: str, generator_gpus: float, learner_gpus: float, tensor_parallel: int, layout: str
) -> bool:
    """sync.transport=auto: NCCL when both sides are on GPUs, the engine runs in the generator's process (TP 1)
    and the layout is split (colocated generators share the learner's GPU: the object store serves them).
    `validate` refuses sync.transport=nccl where this is false."""
    gpu = generator_gpus >= 1 and learner_gpus >= 1 and tensor_parallel == 1 and layout == "split"
    return transport != "object_store" and gpu
