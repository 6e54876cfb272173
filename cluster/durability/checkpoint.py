"""Checkpoints on disk: the final HF folder, and run checkpoints a run resumes from.

A run checkpoint `<output_dir>/checkpoints/iter-NNNNNN/` holds
  policy/          the policy as HF safetensors + tokenizer (from_pretrained or vLLM: evaluate or serve it)
  policy-ds/       DeepSpeed's per-rank states (weights, optimizer, LR schedule) + rank<r>.safetensors (RNG, steps)
  critic-ds/       the same for PPO's critic
  state.json       the driver's state: iteration, weight version, data cursor, KL controller, reward normaliser,
                   RNG, fleet layout, accounting
  manifest.json    sha256 and size of every file above, signed with this machine's checkpoint key
                   (signing.py: an HMAC); written last
It is written to a tmp folder, fsynced and swapped in (atomic.py). DeepSpeed's states are pickles it loads
itself, finding them by name, so `verify` runs before anything is loaded and refuses, naming the file: a folder
without a manifest (partial), a manifest this key did not sign, a file the manifest does not list, and a file
whose checksum differs (corrupt). Only the newest `keep` are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from troupe.cluster.durability.atomic import (
    fresh_tmp,
    is_abandoned_tmp,
    is_own_tmp,
    restore_lone_old,
    swap_in,
)
from troupe.cluster.durability.signing import load_key, sign, signed_by
from troupe.cluster.fleet.learners import LearnerGroup

MANIFEST = "manifest.json"
STATE = "state.json"
PREFIX = "iter-"

log = logging.getLogger("troupe.checkpoint")


class CheckpointError(RuntimeError):
    pass


def save_hf_checkpoint(learners: LearnerGroup, target: Path, tokenizer_path: str, state: dict) -> Path:
    """checkpoint-final: written to a tmp folder, fsynced, swapped in (an existing one stays until then)."""
    target = Path(target).resolve()
    tmp = fresh_tmp(target)
    learners.save_hf(str(tmp), tokenizer_path)
    (tmp / "troupe_state.json").write_text(json.dumps(state, indent=2, sort_keys=True, default=str))
    return swap_in(tmp, target)


def checkpoints_root(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def checkpoint_name(iteration: int) -> str:
    return f"{PREFIX}{iteration:06d}"


def write_checkpoint(
    out_dir: Path, iteration: int, write_parts: Callable[[Path], None], state: dict, keep: int
) -> tuple[Path, dict]:
    """Atomically write checkpoint `iteration`: `write_parts(tmp)` fills the folder (actors write their parts),
    then state.json, the signed manifest, fsync, swap in (the same iteration again after a rollback replaces
    the old copy only once the new one is whole). Returns the folder and {bytes, write_s}."""
    start = time.perf_counter()
    key = load_key()  # before the actors write: a key that cannot be used fails in seconds
    root = checkpoints_root(out_dir)
    final = root / checkpoint_name(iteration)
    tmp = fresh_tmp(final)
    try:
        write_parts(tmp)
        (tmp / STATE).write_text(json.dumps(state, indent=2, sort_keys=True))
        files = {
            str(path.relative_to(tmp)): {"sha256": _sha256(path), "bytes": path.stat().st_size}
            for path in sorted(p for p in tmp.rglob("*") if p.is_file())
        }
        manifest = sign({"iteration": iteration, "files": files, "written": time.time()}, key)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    except BaseException:  # a failed write leaves nothing behind (resume=latest never takes a .tmp anyway)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, final)
    prune(root, keep, final)
    size = sum(f["bytes"] for f in files.values())
    return final, {"bytes": size, "write_s": time.perf_counter() - start}


def verify(folder: Path) -> dict:
    """The checkpoint's state.json after checking, in this order and before anything is loaded: the manifest's
    signature, that every file is listed, every file's checksum. Names what is wrong."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    key = load_key()
    if not signed_by(manifest, key):
        why = (
            "has an hmac this key did not make (another machine signed it, or it was edited)"
            if "hmac" in manifest
            else "has no hmac (written before checkpoints were signed, or edited)"
        )
        raise CheckpointError(
            f"checkpoint {folder} was not written with this machine's checkpoint key ({key.source}): "
            f"{folder / MANIFEST} {why}, so none of its files are trusted (DeepSpeed's states are pickles, which "
            "run code when loaded). If you know where it comes from, trust it deliberately: `troupe checkpoint "
            f"trust {folder}` re-checks its checksums and signs it with this machine's key"
        )
    check_files(folder, manifest)
    return json.loads((folder / STATE).read_text())


def read_manifest(folder: Path) -> dict:
    """The manifest of a complete checkpoint folder (not yet trusted); a missing or unreadable one is refused."""
    manifest_path = folder / MANIFEST
    restore_lone_old(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {folder} is partial: {manifest_path} is missing (written last)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is corrupt: {e}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"checkpoint manifest {manifest_path} is corrupt: it has no 'files' mapping")
    return manifest


def check_files(folder: Path, manifest: dict) -> int:
    """Every file on disk is listed (DeepSpeed finds its files by name: an extra .pt would be unpickled), every
    listed file is there with its checksum, and state.json is among them. Returns the bytes checked."""
    listed = manifest["files"]
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if rel != MANIFEST and rel not in listed and not (path.is_dir() and not path.is_symlink()):
            raise CheckpointError(
                f"checkpoint {folder} holds {path}, which its manifest {folder / MANIFEST} does not list: refused "
                "(DeepSpeed loads files it finds by name, and its .pt files are pickles). Remove it if it is yours"
            )
    if STATE not in listed:
        raise CheckpointError(f"checkpoint manifest {folder / MANIFEST} does not list {STATE}")
    for rel, want in listed.items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        if path.stat().st_size != want["bytes"] or _sha256(path) != want["sha256"]:
            raise CheckpointError(
                f"checkpoint file {path} is corrupt: its checksum differs from {folder / MANIFEST}"
            )
    return sum(want["bytes"] for want in listed.values())


def find_checkpoint(out_dir: Path, resume: str) -> Path:
    """`resume=latest`: the newest complete checkpoint under <out_dir>/checkpoints; else the folder given."""
    if resume != "latest":
        return Path(resume).expanduser().resolve()
    done = complete(checkpoints_root(out_dir))
    if not done:
        raise CheckpointError(
            f"resume=latest: no complete checkpoint under {checkpoints_root(out_dir)} "
            "(run.checkpoint_every=N writes them)"
        )
    return done[-1]


def complete(root: Path) -> list[Path]:
    """Checkpoint folders with a manifest, oldest first (a `.tmp` folder is an interrupted write; a lone
    `.old` one, left by a swap interrupted between its renames, is renamed back first)."""
    if not root.is_dir():
        return []
    for old in root.glob(f"{PREFIX}*.old"):
        restore_lone_old(old.with_name(old.name.removesuffix(".old")))
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and "." not in p.name]
    return sorted((p for p in found if (p / MANIFEST).is_file()), key=lambda p: p.name)


def prune(root: Path, keep: int, newest: Path) -> None:
    """Keep the `keep` newest complete checkpoints, `newest` (just written) always among them; a pruned folder
    loses its manifest first, so an interrupted delete leaves a partial folder, never a corrupt complete one.
    Interrupted writes (`.tmp`) are deleted when this process made them or their writer on this host has died;
    a live writer's (another process, another host) is left alone."""
    for old in [p for p in complete(root) if p != newest][: -max(keep - 1, 0) or None]:
        (old / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)
    others = []
    for partial in root.glob(f"{PREFIX}*.tmp"):
        if partial.is_dir() and (is_own_tmp(partial) or is_abandoned_tmp(partial)):
            shutil.rmtree(partial, ignore_errors=True)
        elif partial.is_dir():
            others.append(partial.name)
    if others:
        log.info(
            "left %d interrupted write(s) of other processes in %s: %s", len(others), root, sorted(others)
        )


def set_aside_after(root: Path, folder: Path) -> list[Path]:
    """Resuming from `folder`: newer checkpoints belong to a timeline being abandoned; they are renamed
    (iter-NNNNNN.abandoned) so that `resume=latest` and pruning never take them for this run's."""
    moved = []
    for p in complete(root):
        if p.name > folder.name:
            target = p.with_name(f"{p.name}.abandoned")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(p, target)
            moved.append(target)
    return moved


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
