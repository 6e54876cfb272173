"""Fleets that resize while a run goes, between iterations.

Two sources of a new size, the person's first:
- `troupe fleet <run_dir> generators=4 reward.rules=2` writes `<run_dir>/fleet.json` (atomically); the loop reads
  it before the next iteration. The request stays in force, and the autoscaler keeps off the pools it names,
  until a newer request replaces it. Both sides check it with `check_request` (cluster/fleet/requests.py); a
  bad file is moved aside (`fleet.json.rejected-<unix time>`), logged and counted, and the run goes on.
- the autoscaling policy (`autoscale=backlog`, `AutoscaleConfig`): a pool the loop waited on for more than
  `grow_wait_frac` of an iteration grows by one, one it waited on for less than `shrink_wait_frac` shrinks by one,
  within [min, max] and at most once per `cooldown` iterations.

A grown generator takes the current weights before it serves (Pool.on_join); a shrunk one finishes the chunks it
has in flight first (Health.DRAINING). Ray places new actors wherever resources are free, so nodes that join are
used, and actors lost with a node that leaves are replaced elsewhere by their pool.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ray.exceptions import GetTimeoutError, RayActorError

from troupe.actors.weight_buckets import WeightTransferError
from troupe.cluster.config.schema import AutoscaleConfig, PoolBounds
from troupe.cluster.fleet.requests import (
    CONTROL_FILE,
    Bounds,
    FleetRequestError,
    check_request,
    read_request_file,
    write_bounds,
)

log = logging.getLogger("troupe.elastic")


def pool_names(run) -> list[str]:
    """The names a request uses: `generators` and `reward.<pool>` (rules, or an expert's name)."""
    return ["generators", *(f"reward.{name}" for name in run.rewards.pools)]


def _pool(run, name: str):
    return run.generators if name == "generators" else run.rewards.pools[name.removeprefix("reward.")]


@dataclass
class FleetControl:
    """Reads resize requests and runs the autoscaling policy; `step` resizes the pools before an iteration."""

    run_dir: Path
    autoscale: AutoscaleConfig = field(default_factory=AutoscaleConfig)
    fixed: set = field(default_factory=set)  # pools that cannot resize (generators in a colocated layout)
    _seen: float = 0.0  # requested_at of the last request applied
    _manual: dict = field(default_factory=dict)  # pools a person sized: the autoscaler keeps off them
    _changed_at: dict = field(default_factory=dict)  # pool -> iteration of its last change
    _bounds: dict | None = None  # pool -> Bounds, once published
    rejected: int = 0  # requests moved aside over the run (metric fleet/rejected_requests)

    def targets(self, run, iteration: int, last: dict | None) -> dict[str, int]:
        """Sizes to move to before `iteration` ({} when nothing changes); `last` is the previous row."""
        out = {}
        request = self._read_request(run)
        if request:
            self._manual = request
            out.update(request)
        if self.autoscale.enabled and last is not None:
            for name, size in self._policy(run, iteration, last).items():
                if name not in self._manual:
                    out[name] = size
        live = {name: len(_pool(run, name).live()) for name in pool_names(run)}
        return {name: size for name, size in out.items() if size != live[name]}

    def step(self, run, iteration: int, last: dict | None) -> dict:
        """Resize what `targets` asks for; returns the row's fleet metrics (sizes, members added and retired)."""
        start = time.perf_counter()
        added = retired = 0
        failed = 0
        for name, size in self.targets(run, iteration, last).items():
            self._changed_at[name] = iteration
            try:
                change = _pool(run, name).resize(size)
            except (GetTimeoutError, RayActorError, WeightTransferError) as e:
                # e.g. no node has the resources: the run goes on at the old size (the new actors were stopped)
                failed += 1
                log.error(
                    "fleet: %s could not grow to %d (%s); it stays at %d",
                    name,
                    size,
                    e,
                    len(_pool(run, name).live()),
                )
                continue
            added, retired = added + change["added"], retired + change["retired"]
            log.warning("fleet: %s resized to %d before iteration %d", name, size, iteration)
        stats = {f"fleet/{name}": len(_pool(run, name).live()) for name in pool_names(run)}
        stats.update({"fleet/added": added, "fleet/retired": retired, "fleet/resize_failed": failed})
        stats["fleet/rejected_requests"] = self.rejected
        if added or retired:
            stats["time/resize"] = time.perf_counter() - start
        return stats

    def publish(self, run) -> dict[str, Bounds]:
        """Each pool's bounds, written to <run dir>/fleet.pools.json for `troupe fleet` to check against. A person
        may ask for sizes within autoscale.<pool>.min/max, or up to the size the run started at if that is more;
        fixed pools stay at their size."""
        if self._bounds is None:
            a, self._bounds = self.autoscale, {}
            for name in pool_names(run):
                size = len(_pool(run, name).live())
                if name in self.fixed:
                    bounds = Bounds(
                        size, size, "placement.layout=colocated: generators stay at generator.replicas"
                    )
                else:
                    key = "generators" if name == "generators" else "reward"
                    own = getattr(a, key)
                    bounds = Bounds(max(1, own.min), max(own.max, size), f"autoscale.{key}.min/max")
                self._bounds[name] = bounds
            write_bounds(self.run_dir, self._bounds)
        return self._bounds

    def _read_request(self, run) -> dict[str, int]:
        """A new request's sizes ({} when there is none, or nothing new). A bad one is moved aside and counted."""
        path = self.run_dir / CONTROL_FILE
        found = read_request_file(path)
        if found is None:
            return {}
        data, inode = found
        try:
            request = check_request(data, self.publish(run))
        except FleetRequestError as e:
            self._reject(path, inode, str(e))
            return {}
        if request.requested_at <= self._seen:
            return {}
        self._seen = request.requested_at
        return request.sizes

    def _reject(self, path: Path, inode: int, reason: str) -> None:
        self.rejected += 1
        aside = path.with_name(f"{path.name}.rejected-{int(time.time())}")
        for k in range(1, 1000):  # two rejections in one second keep both files
            if not aside.exists():
                break
            aside = path.with_name(f"{path.name}.rejected-{int(time.time())}-{k}")
        # only the file that was read: one `troupe fleet` wrote since then stays, to be read next
        try:
            if os.stat(path).st_ino == inode:
                os.replace(path, aside)
        except FileNotFoundError:
            pass
        log.warning("fleet: request %s rejected: %s; moved to %s", path, reason, aside.name)

    def _policy(self, run, iteration: int, last: dict) -> dict[str, int]:
        a = self.autoscale
        total = last.get("time/iteration", 0.0)
        if total <= 0:
            return {}
        waits = {"generators": last.get("time/generate", 0.0) / total}
        waits.update({f"reward.{n}": last.get("time/score", 0.0) / total for n in run.rewards.pools})
        out = {}
        for name, wait in waits.items():
            if name in self.fixed or iteration - self._changed_at.get(name, -(10**9)) < a.cooldown:
                continue
            bounds = a.generators if name == "generators" else a.reward
            size = len(_pool(run, name).live())
            want = decide(size, wait, bounds, a.grow_wait_frac, a.shrink_wait_frac)
            if want != size:
                out[name] = want
        return out


def decide(size: int, wait_frac: float, bounds: PoolBounds, grow_at: float, shrink_at: float) -> int:
    """One pool's next size: +1 past `grow_at` waiting, -1 under `shrink_at`, clamped to the bounds."""
    if wait_frac > grow_at:
        size += 1
    elif wait_frac < shrink_at:
        size -= 1
    return max(bounds.min, min(bounds.max, size))
