"""Weight transport learner -> generators: the rank-0 bundle goes through the object store once and every
healthy generator loads it; generators that fail to load are marked stale rather than silently skipped.
"""

from __future__ import annotations

import logging

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from cluster.fleet import Health, Pool

log = logging.getLogger("troupe.sync")


def push_weights(
    generators: Pool,
    bundle_ref: ray.ObjectRef,
    version: int,
    rollback: bool = False,
    deadline_s: float | None = None,
) -> dict:
    """`rollback`: after a rebuild from a checkpoint the version may be older than what generators hold."""
    members = generators.healthy()
    # Passing the ref (not the value) lets each generator pull the bundle straight from the object store.
    refs = [m.handle.update_weights.remote(bundle_ref, rollback) for m in members]
    loaded, stale = 0, 0
    for m, ref in zip(members, refs, strict=True):
        try:
            got = ray.get(ref, timeout=deadline_s or generators.timeout_s)
            m.health = Health.HEALTHY
            m.info["version"] = got
            loaded += 1
        except (RayActorError, GetTimeoutError):
            m.health = Health.STALE
            stale += 1
            log.warning("generator %d did not take weights v%d", m.index, version)
    return {"generators_synced": loaded, "generators_stale": stale}
