"""The driver's side of GPU weight sync by CUDA IPC (`placement.layout=colocated`, actors/weight_transfer.py).

Generator i shares its GPU with learner rank i (its placement bundle, `Member.slot`). Each sync, every rank packs its
full weights chunk by chunk into one buffer shared by a CUDA IPC handle; the driver hands generator i each of rank
i's chunks in turn (the next only after every generator has read the last, since the buffer is reused), and the
generator's vLLM engine copies it out, checks every tensor against rank i's checksums and loads it. At the end each
generator reports the version and the transfer's digest, which the driver compares with rank i's checksums. A
generator that fails or reports another digest is STALE and refits through the object store (the others are
unaffected); a failure of the learners ends the step and the sync falls back to the object store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from troupe.actors.weight_transfer import transfer_digest
from troupe.cluster.durability.faults import RankLost
from troupe.cluster.fleet.learners import LearnerGroup
from troupe.cluster.fleet.pool import Health, Pool

log = logging.getLogger("troupe.ipc_sync")


@dataclass
class IpcSync:
    deadline_s: float = 600.0
    failures: int = 0

    def push(
        self, generators: Pool, learners: LearnerGroup, version: int, wait_s: float | None = None
    ) -> dict | None:
        """Share `version` with the live generators; None when the learners' side failed (the caller falls back to
        the object store)."""
        deadline = wait_s or self.deadline_s
        taking = list(generators.live())
        expected: dict[int, list[int]] = {m.index: [] for m in taking}
        try:
            learners.ipc_begin()
            taking = self._each(taking, lambda m: m.handle.begin_weights.remote(), deadline)
            while (chunks := learners.ipc_next())[0] is not None:
                for m in taking:
                    expected[m.index] += chunks[m.slot]["checksums"]
                taking = self._each(taking, lambda m: m.handle.receive_chunk.remote(chunks[m.slot]), deadline)
        except (RayActorError, RayTaskError, GetTimeoutError, RankLost) as e:
            self.failures += 1
            log.warning("IPC weight sync v%d failed (%s); falling back to the object store", version, e)
            return None
        finally:
            try:
                learners.ipc_end()
            except RankLost:  # the fallback's export finds out and rebuilds
                pass
        reports = {}
        for m in taking:
            try:
                rollback = m.health is Health.STALE
                reports[m.index] = ray.get(
                    m.handle.finish_weights.remote(version, rollback), timeout=deadline
                )
            except (RayActorError, RayTaskError, GetTimeoutError) as e:
                log.warning("generator %d: IPC weights v%d not taken (%s)", m.index, version, e)
        synced = 0
        for m in generators.live():
            report = reports.get(m.index)
            if report and report["checksum"] == transfer_digest(version, expected[m.index]):
                m.health, m.info["version"], synced = Health.HEALTHY, version, synced + 1
            else:
                m.health = Health.STALE  # serves nothing until a refit through the object store
        return {
            "generators_synced": synced,
            "generators_stale": len(generators.live()) - synced,
            "tensors": sum(len(v) for v in expected.values()) // max(len(expected), 1),
            "transport_ipc": 1,
            "generator_load_s": max((r["load_s"] for r in reports.values()), default=0.0),
        }

    @staticmethod
    def _each(members: list, call, deadline: float) -> list:
        """`call` on each member at once; those whose call fails drop out of this sync (they end STALE)."""
        refs = [(m, call(m)) for m in members]
        kept = []
        for m, ref in refs:
            try:
                ray.get(ref, timeout=deadline)
                kept.append(m)
            except (RayActorError, RayTaskError, GetTimeoutError) as e:
                log.warning("generator %d dropped out of an IPC weight sync (%s)", m.index, e)
        return kept

    def reset(self) -> None:
        """Learner ranks were rebuilt: nothing is held between syncs."""
