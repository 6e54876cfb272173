"""Folders replaced whole: a run checkpoint written again, checkpoint-final, a reward bundle.

The writer fills `<name>.<host>-<pid>.tmp` (`fresh_tmp`), then `swap_in`:
  1. fsync every file and folder of the tmp folder
  2. rename <name> -> <name>.old                       (when <name> exists)
  3. rename the tmp folder -> <name>
  4. fsync the parent folder, then delete <name>.old
Interrupted after 2 and before 3, only <name>.old is complete under a final name: `restore_lone_old` (which the
next swap and the checkpoint readers call) renames it back, so one complete copy always survives. The tmp name
carries the writer's host and pid, so a writer cleans up its own interrupted writes and those of dead writers on its
host (killed mid-write), never a running writer's.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path


def writer_tag() -> str:
    """This process, as tmp folder names carry it: `<host>-<pid>`."""
    return f"{socket.gethostname()}-{os.getpid()}"


def tmp_for(target: Path) -> Path:
    return target.with_name(f"{target.name}.{writer_tag()}.tmp")


def is_own_tmp(path: Path) -> bool:
    return path.name.endswith(f".{writer_tag()}.tmp")


def is_abandoned_tmp(path: Path) -> bool:
    """A tmp folder whose writer ran on this host and runs no longer (it was killed in the middle of a write)."""
    found = re.fullmatch(rf"[^.]+\.{re.escape(socket.gethostname())}-(\d{{1,9}})\.tmp", path.name)
    if found is None:
        return False  # another host's (or not a tmp name): whether its writer lives cannot be told from here
    try:
        os.kill(int(found.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # a live process of another user
        return False
    return False


def old_for(target: Path) -> Path:
    return target.with_name(f"{target.name}.old")


def fresh_tmp(target: Path) -> Path:
    """An empty tmp folder for `target` (this process's earlier interrupted write to it is removed)."""
    tmp = tmp_for(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def restore_lone_old(target: Path) -> bool:
    """A swap interrupted between its renames left `<name>.old` and no `<name>`: rename it back."""
    old = old_for(target)
    if target.exists() or not old.is_dir():
        return False
    os.rename(old, target)
    fsync_dir(target.parent)
    return True


def swap_in(tmp: Path, target: Path) -> Path:
    """Put the fully written folder `tmp` in place of `target` (see the module's steps); returns `target`."""
    restore_lone_old(target)
    fsync_tree(tmp)
    old = old_for(target)
    shutil.rmtree(old, ignore_errors=True)  # a stale copy: `target` itself is complete
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    return target


def fsync_tree(folder: Path) -> None:
    """Every file, then every folder (deepest first), so the folder's contents survive a power loss."""
    folders = [folder]
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            continue
        if path.is_dir():
            folders.append(path)
        elif path.is_file():
            fsync_file(path)
    for path in sorted(folders, key=lambda p: -len(p.parts)):
        fsync_dir(path)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
