"""`troupe checkpoint trust <folder>`: sign a run checkpoint made elsewhere (another machine, another key, or
before checkpoints were signed) with this machine's key, so `resume=` loads it. Its files must still match its
manifest, and it must hold no file the manifest does not list; the manifest is rewritten atomically."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from troupe.cluster.durability.atomic import fsync_dir, fsync_file
from troupe.cluster.durability.checkpoint import MANIFEST, CheckpointError, check_files, read_manifest
from troupe.cluster.durability.signing import CheckpointKeyError, load_key, sign, signed_by

USAGE = "usage: troupe checkpoint trust <checkpoint folder>  (a run's checkpoints/iter-NNNNNN)"


def trust(folder: Path) -> str:
    """Check and sign `folder`; returns what was done, in a sentence."""
    folder = Path(folder).expanduser().resolve()
    manifest = read_manifest(folder)
    key = load_key()
    size = check_files(folder, manifest)
    checked = f"{len(manifest['files'])} files ({size / 1e6:.1f} MB) match {folder / MANIFEST}"
    if signed_by(manifest, key):
        return f"{checked}; it was already signed with this machine's key ({key.source}): nothing to do"
    path = folder / MANIFEST
    tmp = path.with_name(f"{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(sign(manifest, key), indent=2, sort_keys=True))
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(folder)
    return f"{checked}; signed it with this machine's key ({key.source}): resume={folder} now loads it"


def main(argv: list[str]) -> int:
    if argv in (["-h"], ["--help"], ["trust", "-h"], ["trust", "--help"]):
        print(USAGE)
        return 0
    if len(argv) != 2 or argv[0] != "trust":
        print(USAGE, file=sys.stderr)
        return 2
    try:
        print(f"troupe checkpoint trust: {trust(Path(argv[1]))}")
    except (CheckpointError, CheckpointKeyError) as e:
        print(f"troupe checkpoint trust: error: {e}", file=sys.stderr)
        return 2
    return 0
