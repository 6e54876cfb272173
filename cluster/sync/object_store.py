"""Weight transport learner -> generators.

Learner rank 0 packs the weights into checksummed buckets in the object store (`LearnerGroup.export_weights`);
the driver sends the small manifest-and-refs object to every live generator, which fetches the buckets (on its own
node without a copy; from rank 0's node otherwise), checks each bucket and the version, and only then loads them.
The driver checks what each generator reports (version and checksum): one that fails is STALE and serves nothing
until a later sync or a refit reaches it. A generator call in flight finishes on the old weights first (calls on
an actor run one at a time); the new version loads after it.
"""

from __future__ import annotations

import logging

import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError

from troupe.actors.weight_buckets import BucketedWeights, WeightTransferError
from troupe.cluster.durability.faults import RankLost
from troupe.cluster.fleet.pool import Health, Member, Pool

log = logging.getLogger("troupe.sync")


WEIGHTS_GROUP = "weights"  # a generator's second thread for weights (partial rollouts, cluster/run/driver.py)


def _update(generators: Pool, member: Member):
    """The member's update_weights, on its weights thread when it has one (it may be generating meanwhile)."""
    method = member.handle.update_weights
    return method.options(concurrency_group=generators.weights_group) if generators.weights_group else method


def push_weights(
    generators: Pool,
    bundle: BucketedWeights,
    rollback: bool = False,
    deadline_s: float | None = None,
) -> dict:
    """`rollback`: after a rebuild from a checkpoint the version may be older than what generators hold."""
    members = generators.live()
    # A stale member may hold weights a rollback undid (newer than these): it takes these whatever it holds.
    refs = [_update(generators, m).remote(bundle, rollback or m.health is Health.STALE) for m in members]
    loaded, stale, replaced, load_s, fetch_s = 0, 0, 0, 0.0, 0.0
    for m, ref in zip(members, refs, strict=True):
        try:
            got = ray.get(ref, timeout=deadline_s or generators.timeout_s)
            _check(m, got, bundle)
        except RayActorError:  # dead: its replacement refits to this bundle before it serves (Pool.on_join)
            generators.replace(m, "died during a weight sync")
            replaced += 1
            continue
        except (GetTimeoutError, WeightTransferError, RayTaskError) as e:
            cause = getattr(e, "cause", None) or e  # a RayTaskError carries the generator's exception
            if isinstance(cause, ObjectLostError):
                raise _lost(e) from e
            if not isinstance(cause, (GetTimeoutError, WeightTransferError)):
                raise
            m.health = Health.STALE  # serves nothing until a later sync or a refit reaches it
            stale += 1
            log.warning("generator %d did not take weights v%d: %s", m.index, bundle.version, cause)
            continue
        m.health = Health.HEALTHY
        loaded += 1
        load_s, fetch_s = max(load_s, got["load_s"]), max(fetch_s, got["fetch_s"] + got["verify_s"])
    return {
        "generators_synced": loaded,
        "generators_stale": stale,
        "generators_replaced": replaced,
        "bytes": bundle.manifest.nbytes,
        "buckets": len(bundle.manifest.buckets),
        "generator_load_s": load_s,  # the slowest generator's engine load
        "generator_fetch_s": fetch_s,  # and its fetch + checksum time
    }


def refit(member: Member, bundle: BucketedWeights | None, deadline_s: float) -> None:
    """Bring one generator to `bundle` (a new or replacement member, or a stale one) and check it took it.
    A bundle lost with learner rank 0 is a rank loss: the group is rebuilt and the weights exported again."""
    if bundle is None:
        return  # nothing trained yet: the initial weights are what it loaded
    try:
        got = ray.get(member.handle.update_weights.remote(bundle, True), timeout=deadline_s)
    except (ObjectLostError, RayTaskError) as e:
        if isinstance(e, ObjectLostError) or isinstance(e.cause, ObjectLostError):
            raise _lost(e) from e
        raise
    _check(member, got, bundle)


def _check(member: Member, got: dict, bundle: BucketedWeights) -> None:
    if got["version"] != bundle.version or got["checksum"] != bundle.manifest.checksum:
        raise WeightTransferError(
            f"generator {member.index} reports v{got['version']} ({got['checksum']}), "
            f"sent v{bundle.version} ({bundle.manifest.checksum})"
        )
    member.info["version"] = got["version"]


def _lost(e: Exception) -> RankLost:
    return RankLost("learner", f"the latest weights were lost with learner rank 0 ({type(e).__name__})")
