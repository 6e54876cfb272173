"""Checkpoints on disk: the final HF folder, and run checkpoints a run resumes from.

A run checkpoint `<output_dir>/checkpoints/iter-NNNNNN/` holds
  policy/          the policy as HF safetensors + tokenizer (from_pretrained or vLLM: evaluate or serve it)
  policy-ds/       DeepSpeed's per-rank states (weights, optimizer, LR schedule) + rank<r>.safetensors (RNG, steps)
  critic-ds/       the same for PPO's critic
  state.json       the driver's state: iteration, weight version, data cursor, KL controller, reward normaliser,
                   RNG, fleet layout, accounting
  manifest.json    sha256 and size of every file above; written last
It is written to `iter-NNNNNN.tmp/`, every file fsynced, then renamed: a folder without a manifest is partial and a
file whose checksum differs is corrupt; both are refused naming the file. Only the newest `keep` are kept.
DeepSpeed's states are pickles it loads itself: they are loaded only after their checksums match the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from troupe.cluster.fleet.learners import LearnerGroup

MANIFEST = "manifest.json"
STATE = "state.json"
PREFIX = "iter-"


class CheckpointError(RuntimeError):
    pass


def save_hf_checkpoint(learners: LearnerGroup, target: Path, tokenizer_path: str, state: dict) -> Path:
    target = target.resolve()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    learners.save_hf(str(tmp), tokenizer_path)
    (tmp / "troupe_state.json").write_text(json.dumps(state, indent=2, sort_keys=True, default=str))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def checkpoints_root(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def write_checkpoint(
    out_dir: Path, iteration: int, write_parts: Callable[[Path], None], state: dict, keep: int
) -> tuple[Path, dict]:
    """Atomically write checkpoint `iteration`: `write_parts(tmp)` fills the folder (actors write their parts),
    then state.json, fsync, manifest.json, fsync, rename. Returns the folder and {bytes, write_s}."""
    start = time.perf_counter()
    root = checkpoints_root(out_dir)
    final = root / f"{PREFIX}{iteration:06d}"
    tmp = root / f"{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_parts(tmp)
    (tmp / STATE).write_text(json.dumps(state, indent=2, sort_keys=True))
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        _fsync(path)
        files[str(path.relative_to(tmp))] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
    manifest = {"iteration": iteration, "files": files, "written": time.time()}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    _fsync(tmp / MANIFEST)
    for folder in sorted({p.parent for p in tmp.rglob("*")} | {tmp}, key=lambda p: -len(p.parts)):
        _fsync_dir(folder)
    old = root / f"{final.name}.old"
    if (
        final.exists()
    ):  # the same iteration again (a rollback re-ran it): swap, so one complete copy always exists
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)
    prune(root, keep, final)
    size = sum(f["bytes"] for f in files.values())
    return final, {"bytes": size, "write_s": time.perf_counter() - start}


def verify(folder: Path) -> dict:
    """The checkpoint's state.json after checking every file against the manifest; names what is wrong."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {folder} is partial: {manifest_path} is missing (written last)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is corrupt: {e}") from e
    for rel, want in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        if path.stat().st_size != want["bytes"] or _sha256(path) != want["sha256"]:
            raise CheckpointError(
                f"checkpoint file {path} is corrupt: its checksum differs from {manifest_path}"
            )
    return json.loads((folder / STATE).read_text())


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
    """Checkpoint folders with a manifest, oldest first (a `.tmp` folder is an interrupted write)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and "." not in p.name]
    return sorted((p for p in found if (p / MANIFEST).is_file()), key=lambda p: p.name)


def prune(root: Path, keep: int, newest: Path) -> None:
    """Keep the `keep` newest complete checkpoints, `newest` (just written) always among them; a pruned folder
    loses its manifest first, so an interrupted delete leaves a partial folder, never a corrupt complete one."""
    for old in [p for p in complete(root) if p != newest][: -max(keep - 1, 0) or None]:
        (old / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)
    for partial in root.glob(f"{PREFIX}*.tmp"):
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)


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


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
