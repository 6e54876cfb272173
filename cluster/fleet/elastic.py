"""Fleets that resize while a run goes, between iterations.

Two sources of a new size, the person's first:
- `troupe fleet <run_dir> generators=4 reward.rules=2` writes `<run_dir>/fleet.json` (atomically); the loop reads
  it before the next iteration. The request stays in force, and the autoscaler keeps off the pools it names,
  until a newer request replaces it.
- the autoscaling policy (`autoscale=backlog`, `AutoscaleConfig`): a pool the loop waited on for more than
  `grow_wait_frac` of an iteration grows by one, one it waited on for less than `shrink_wait_frac` shrinks by one,
  within [min, max] and at most once per `cooldown` iterations.

A grown generator takes the current weights before it serves (Pool.on_join); a shrunk one finishes the chunks it
has in flight first (Health.DRAINING). Ray places new actors wherever resources are free, so nodes that join are
used, and actors lost with a node that leaves are replaced elsewhere by their pool.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ray.exceptions import GetTimeoutError, RayActorError

from troupe.actors.weight_buckets import WeightTransferError
from troupe.cluster.config.schema import AutoscaleConfig, PoolBounds

log = logging.getLogger("troupe.elastic")

CONTROL_FILE = "fleet.json"


class FleetRequestError(ValueError):
    pass


def pool_names(run) -> list[str]:
    """The names a request uses: `generators` and `reward.<pool>` (rules, or an expert's name)."""
    return ["generators", *(f"reward.{name}" for name in run.rewards.pools)]


def _pool(run, name: str):
    return run.generators if name == "generators" else run.rewards.pools[name.removeprefix("reward.")]


def request_resize(run_dir: str | Path, sizes: dict[str, int]) -> Path:
    """Write a resize request for the run in `run_dir` (what `troupe fleet` does). Names are checked by the run,
    which knows its pools; sizes here."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FleetRequestError(f"{run_dir} is not a run folder (run.output_dir of a running troupe)")
    for name, size in sizes.items():
        if not isinstance(size, int) or size < 1:
            raise FleetRequestError(f"{name}={size!r}: a pool size must be an integer >= 1")
    path = run_dir / CONTROL_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"sizes": sizes, "requested_at": time.time()}, sort_keys=True))
    os.replace(tmp, path)
    return path


def parse_sizes(args: list[str]) -> dict[str, int]:
    """`generators=4 reward.rules=2` -> {"generators": 4, "reward.rules": 2}, naming a malformed argument."""
    sizes = {}
    for arg in args:
        name, sep, value = arg.partition("=")
        if not sep or not value.strip().isdigit():
            raise FleetRequestError(f"{arg!r}: expected <pool>=<size>, e.g. generators=4 or reward.rules=2")
        sizes[name.strip()] = int(value)
    return sizes


@dataclass
class FleetControl:
    """Reads resize requests and runs the autoscaling policy; `step` resizes the pools before an iteration."""

    run_dir: Path
    autoscale: AutoscaleConfig = field(default_factory=AutoscaleConfig)
    fixed: set = field(default_factory=set)  # pools that cannot resize (generators in a colocated layout)
    _seen: float = 0.0  # requested_at of the last request applied
    _manual: dict = field(default_factory=dict)  # pools a person sized: the autoscaler keeps off them
    _changed_at: dict = field(default_factory=dict)  # pool -> iteration of its last change

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
        if added or retired:
            stats["time/resize"] = time.perf_counter() - start
        return stats

    def _read_request(self, run) -> dict[str, int]:
        path = self.run_dir / CONTROL_FILE
        try:
            request = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as e:
            log.error("%s is not valid JSON (%s): request ignored", path, e)
            return {}
        if request.get("requested_at", 0.0) <= self._seen:
            return {}
        self._seen = request.get("requested_at", 0.0)
        sizes = request.get("sizes", {})
        unknown = sorted(set(sizes) - set(pool_names(run)))
        if unknown:
            log.error(
                "%s names unknown pools %s (this run has %s): request ignored", path, unknown, pool_names(run)
            )
            return {}
        fixed = sorted(set(sizes) & self.fixed)
        if fixed:
            log.error(
                "%s resizes %s, fixed in this run (placement.layout=colocated): request ignored", path, fixed
            )
            return {}
        return sizes

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


def main(argv: list[str]) -> int:
    """`troupe fleet <run_dir> generators=4 reward.rules=2`: ask a running troupe to resize its pools."""
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print("usage: troupe fleet <run_dir> <pool>=<size> ...  (pools: generators, reward.<pool>)")
        return 2
    try:
        path = request_resize(argv[0], parse_sizes(argv[1:]))
    except FleetRequestError as e:
        print(f"troupe fleet: {e}")
        return 2
    print(f"troupe fleet: requested {' '.join(argv[1:])} ({path}); applied before the next iteration")
    return 0
