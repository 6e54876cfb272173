"""Resize requests: `<run dir>/fleet.json`, written by `troupe fleet` and read by the run before each iteration.

One validator, `check_request`, serves both sides, so `troupe fleet` refuses before writing what the run would
refuse after reading. The run publishes its pools and their bounds in `<run dir>/fleet.pools.json`
(`write_bounds`); `troupe fleet` checks names and sizes against them once the run has started, and only the types
and sizes >= 1 before. A bad file the run finds is moved aside by the run (cluster/fleet/elastic.py), so it cannot
stop the run, or any resume of it.

    {"sizes": {"generators": 4, "reward.rules": 2}, "requested_at": 1718000000.0}
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CONTROL_FILE = "fleet.json"
BOUNDS_FILE = "fleet.pools.json"
MAX_BYTES = 64 * 1024
FUTURE_S = 60.0  # how far ahead of the reader's clock a request may be stamped (clock skew between hosts)
KEYS = ("sizes", "requested_at")


class FleetRequestError(ValueError):
    pass


@dataclass(frozen=True)
class Bounds:
    """The sizes a pool may be asked for, and the config that sets them (named in errors)."""

    min: int
    max: int
    source: str


@dataclass(frozen=True)
class Request:
    sizes: dict[str, int]
    requested_at: float  # unix time in seconds


def check_request(obj, bounds: dict[str, Bounds] | None, now: float | None = None) -> Request:
    """The request in `obj` (a file's bytes, or the parsed object), or a FleetRequestError naming the field.
    `bounds`: the run's pools; None while they are not known (names unchecked, sizes >= 1)."""
    if isinstance(obj, (bytes, bytearray)):
        obj = _parse(bytes(obj))
    if not isinstance(obj, dict):
        raise FleetRequestError(
            f'expected a JSON object {{"sizes": {{pool: size}}, "requested_at": <unix time>}}, '
            f"got a {type(obj).__name__}"
        )
    unknown = sorted(set(obj) - set(KEYS))
    if unknown:
        raise FleetRequestError(f"unknown keys {unknown} (keys: {', '.join(KEYS)})")
    missing = [k for k in KEYS if k not in obj]
    if missing:
        raise FleetRequestError(f"missing keys {missing}")
    sizes = obj["sizes"]
    if not isinstance(sizes, dict) or not sizes:
        raise FleetRequestError(
            f'sizes={sizes!r}: expected an object {{pool: size}}, e.g. {{"generators": 4}}'
        )
    for name, size in sizes.items():
        if bounds is not None and name not in bounds:
            raise FleetRequestError(f"sizes.{name}: this run has no such pool (pools: {', '.join(bounds)})")
        if isinstance(size, bool) or not isinstance(size, int):
            raise FleetRequestError(f"sizes.{name}={size!r}: expected an integer")
        if bounds is None and size < 1:
            raise FleetRequestError(f"sizes.{name}={size}: expected an integer >= 1")
        b = bounds[name] if bounds is not None else None
        if b is not None and not b.min <= size <= b.max:
            raise FleetRequestError(
                f"sizes.{name}={size}: outside the pool's bounds [{b.min}, {b.max}] ({b.source})"
            )
    at = obj["requested_at"]
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at) or at <= 0:
        raise FleetRequestError(f"requested_at={at!r}: expected a unix time in seconds (a number > 0)")
    now = time.time() if now is None else now
    if at > now + FUTURE_S:
        raise FleetRequestError(
            f"requested_at={at!r}: {at - now:.0f}s in the future (at most {FUTURE_S:.0f}s ahead is accepted); "
            "a later request would look older than it"
        )
    return Request(dict(sizes), float(at))


def _parse(data: bytes):
    if len(data) > MAX_BYTES:
        raise FleetRequestError(f"over {MAX_BYTES // 1024} KiB: not a resize request")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FleetRequestError(f"not UTF-8 text ({e})") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except ValueError as e:
        raise FleetRequestError(f"not valid JSON ({e})") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def read_request_file(path: Path) -> tuple[bytes, int] | None:
    """A request file's bytes (at most MAX_BYTES + 1 of them, enough to tell it is too big) and its inode (a newer
    request replaces the file, and so the inode); None when there is none."""
    try:
        with open(path, "rb") as f:
            return f.read(MAX_BYTES + 1), os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return None


def write_bounds(run_dir: Path, bounds: dict[str, Bounds]) -> Path:
    """The run's pools and their bounds, for `troupe fleet` to check a request against."""
    path = Path(run_dir) / BOUNDS_FILE
    _write_atomically(path, {name: asdict(b) for name, b in bounds.items()})
    return path


def read_bounds(run_dir: Path) -> dict[str, Bounds] | None:
    """What the run published; None before it has (or for a run folder of an older troupe)."""
    path = Path(run_dir) / BOUNDS_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {name: Bounds(int(b["min"]), int(b["max"]), str(b["source"])) for name, b in raw.items()}
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FleetRequestError(f"{path} is unreadable ({e!r}): the run writes it when it starts") from None


def request_resize(run_dir: str | Path, sizes: dict[str, int], now: float | None = None) -> Path:
    """Write a resize request for the run in `run_dir` (what `troupe fleet` does), checked as the run will check
    it: against the bounds the run published, if it has."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FleetRequestError(f"{run_dir} is not a run folder (run.output_dir of a running troupe)")
    request = {"sizes": sizes, "requested_at": time.time() if now is None else now}
    check_request(request, read_bounds(run_dir), now)
    path = run_dir / CONTROL_FILE
    _write_atomically(path, request)
    return path


def _write_atomically(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def parse_sizes(args: list[str]) -> dict[str, int]:
    """`generators=4 reward.rules=2` -> {"generators": 4, "reward.rules": 2}, naming a malformed argument."""
    sizes = {}
    for arg in args:
        name, sep, value = arg.partition("=")
        if not sep or not value.strip().isdigit():
            raise FleetRequestError(f"{arg!r}: expected <pool>=<size>, e.g. generators=4 or reward.rules=2")
        sizes[name.strip()] = int(value)
    return sizes


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
