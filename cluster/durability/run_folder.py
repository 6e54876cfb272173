"""One owner per run folder, and fresh runs that never mix with an earlier run's files.

`claim(folder)` takes an exclusive `flock` on `<folder>/.troupe.lock` and records the holder (host, pid, start,
command) in it; a second process is refused with `FolderInUse`, naming the holder. The kernel drops the lock when
its process ends, however it ends, so a lock file left by a killed run blocks nobody. The file itself stays (a
deleted lock file could be locked by one process while another creates a new one).

`start_fresh(folder, overwrite)` refuses a folder that holds the files of an earlier run (`RUN_FILES`), unless
`overwrite`, which deletes those files and nothing else: the user's own files, reward bundles and feature caches
(which the reward-model stages share by design) stay.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".troupe.lock"
# What a run writes into its folder (cluster/run/job.py, observe/, durability/, fleet/elastic.py), and the
# temporary names some of them pass through.
RUN_FILES = (
    "metrics.jsonl",
    "rollouts.jsonl",
    "summary.json",
    "trackers.json",
    "fleet.json",
    "checkpoints",
    "checkpoint-final",
    "tensorboard",
    "wandb",
    "plots",
)
RUN_TEMPS = tuple(f"{name}.tmp" for name in RUN_FILES) + ("fleet.tmp",)
# Every job's driver log: a new run in the folder appends to it; an overwrite clears it with the run files.
LOGS = "logs"


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked; the message says why and what to do."""


class FolderInUse(RunFolderError):
    pass


class FolderClaim:
    """The held lock of one run folder; `release()` (or leaving the `with` block) gives it up."""

    def __init__(self, folder: Path, fd: int) -> None:
        self.folder, self._fd = folder, fd

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # no holder recorded once none holds it
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderClaim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(folder: str | Path) -> FolderClaim:
    """Hold `folder` for this process (creating it), or raise `FolderInUse` naming the process that holds it."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        recorded = _read(fd)
        os.close(fd)
        this = recorded and (recorded.get("host"), recorded.get("pid")) == (socket.gethostname(), os.getpid())
        who = "this process, in a job that has not ended" if this else "another troupe process"
        raise FolderInUse(
            f"run folder {folder} is in use by {who} ({_describe(recorded)}); wait for it to end, or give "
            "this run another run.output_dir"
        ) from None
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    os.fsync(fd)
    return FolderClaim(folder, fd)


def _read(fd: int) -> dict | None:
    try:
        holder = json.loads(os.pread(fd, 65536, 0) or b"null")
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict | None) -> str:
    if holder is None:  # it has the lock but has not written its name yet
        return "holder not recorded yet"
    return (
        f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}, "
        f"command: {holder.get('command')}"
    )


def earlier_run_files(folder: str | Path) -> list[Path]:
    """The files of an earlier run in `folder`, sorted by name."""
    folder = Path(folder)
    return [folder / name for name in sorted(RUN_FILES + RUN_TEMPS) if (folder / name).exists()]


def start_fresh(folder: str | Path, overwrite: bool) -> list[Path]:
    """Make `folder` ready for a new run: refuse it when it holds an earlier run's files, or with `overwrite`
    delete them (and the logs); returns what was deleted. Call it holding the folder's claim."""
    folder = Path(folder)
    found = earlier_run_files(folder)
    if found and not overwrite:
        raise RunFolderError(
            f"run folder {folder} holds an earlier run ({', '.join(p.name for p in found)}): continue it with "
            "resume=latest, start over with run.overwrite=true (deletes those files), or give this run another "
            "run.output_dir"
        )
    if found and (folder / LOGS).is_dir():
        found.append(folder / LOGS)
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return found
