"""vLLM sleep mode around the learn phase (`generator.sleep_level`, colocated GPUs).

The generators free their GPU memory before the learners train (level 1: weights to CPU memory, KV cache freed;
level 2: both freed) and get it back with the weight sync that follows: weights first, the new version loaded,
then the KV cache, then a prefix-cache reset (actors/generator/vllm_backend.py). A generator the sync did not
reach (nothing trained this iteration, or its transfer failed) wakes in `wake_all` on the weights it held; after a
level-2 sleep it holds none, so it is STALE and refits (RunState.refit) before it serves again.
"""

from __future__ import annotations

import logging

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from troupe.cluster.fleet.pool import Health, Pool

log = logging.getLogger("troupe.sleep")


def sleep_all(generators: Pool, deadline_s: float) -> dict:
    """Put the serving generators to sleep; one that fails to is STALE (the next sync or refit reaches it)."""
    members = generators.healthy()
    refs = [m.handle.sleep.remote() for m in members]
    freed, failed = 0.0, 0
    for m, ref in zip(members, refs, strict=True):
        try:
            freed += ray.get(ref, timeout=deadline_s)["freed_gib"]
        except RayActorError:
            generators.replace(m, "died going to sleep")
            failed += 1
        except (GetTimeoutError, RayTaskError) as e:
            log.warning("generator %d could not sleep (%s): stale until refitted", m.index, e)
            m.health, failed = Health.STALE, failed + 1
    return {"sleep/freed_gib": freed, "sleep/failed": failed}


def wake_all(generators: Pool, deadline_s: float) -> dict:
    """Wake the generators a weight sync did not wake; those whose weights sleep freed are STALE, to refit."""
    members = generators.live()
    refs = [m.handle.wake.remote() for m in members]
    refit = 0
    for m, ref in zip(members, refs, strict=True):
        try:
            awake = ray.get(ref, timeout=deadline_s)
        except RayActorError:
            generators.replace(m, "died waking up")
            continue
        except (GetTimeoutError, RayTaskError) as e:
            log.warning("generator %d could not wake (%s): stale until refitted", m.index, e)
            awake = False
        if not awake:
            m.health, m.info["weights_lost"], refit = Health.STALE, True, refit + 1
    return {"sleep/woke_without_weights": refit}
