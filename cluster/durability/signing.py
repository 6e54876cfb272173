"""The key that signs run checkpoints' manifests (HMAC-SHA256 over the manifest's canonical JSON).

DeepSpeed's optimizer and engine states are pickles (torch.load with weights_only=False), which run code when
loaded, and ZeRO offers no other format. So rather than re-format them, the manifest that vouches for every
file's checksum is authenticated with a key kept outside the output folder: whoever can write the output folder
but not read the key cannot make a checkpoint this machine loads.

The key is TROUPE_CHECKPOINT_KEY (hex, or any string; at least 16 bytes), else the file
$XDG_CONFIG_HOME/troupe/checkpoint.key (~/.config/troupe/checkpoint.key), created on first use with 32 random
bytes (as hex), mode 0600. A key file that group or others can read is refused. Every node that writes or
resumes one run's checkpoints needs the same key: set TROUPE_CHECKPOINT_KEY from a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

ENV = "TROUPE_CHECKPOINT_KEY"
FIELD = "hmac"  # the manifest's field that holds the signature
MIN_BYTES = 16
DOMAIN = b"troupe checkpoint manifest v1\n"  # this key signs nothing else

log = logging.getLogger("troupe.checkpoint")


class CheckpointKeyError(RuntimeError):
    """The checkpoint key cannot be used (too short, or a key file others can read)."""


@dataclass(frozen=True)
class CheckpointKey:
    secret: bytes
    source: str  # where it came from, for messages: "TROUPE_CHECKPOINT_KEY" or "key file <path>"

    def __repr__(self) -> str:  # never print the secret
        return f"CheckpointKey({self.source})"


def key_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".config") / "troupe" / "checkpoint.key"


def load_key() -> CheckpointKey:
    """TROUPE_CHECKPOINT_KEY, else the key file (created on first use)."""
    if ENV in os.environ:
        return CheckpointKey(_secret(os.environ[ENV], ENV), ENV)
    path = key_path()
    if not path.exists():
        _create(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CheckpointKeyError(
            f"checkpoint key file {path} has mode {mode:03o}: group or others can read it, and whoever reads it "
            f"can sign checkpoints this machine loads (and so run code here). Run `chmod 600 {path}`"
        )
    return CheckpointKey(_secret(path.read_text(), f"key file {path}"), f"key file {path}")


def manifest_hmac(manifest: dict, key: CheckpointKey) -> str:
    """HMAC-SHA256 of the manifest without its `hmac` field, as canonical JSON (sorted keys, no spaces)."""
    body = {k: v for k, v in manifest.items() if k != FIELD}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key.secret, DOMAIN + canonical.encode(), hashlib.sha256).hexdigest()


def sign(manifest: dict, key: CheckpointKey) -> dict:
    return {**manifest, FIELD: manifest_hmac(manifest, key)}


def signed_by(manifest: dict, key: CheckpointKey) -> bool:
    got = manifest.get(FIELD)
    return isinstance(got, str) and hmac.compare_digest(got, manifest_hmac(manifest, key))


def _secret(text: str, source: str) -> bytes:
    text = text.strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = text.encode()
    if len(secret) < MIN_BYTES:
        raise CheckpointKeyError(
            f"the checkpoint key ({source}) has {len(secret)} bytes; use at least {MIN_BYTES} random bytes, e.g. "
            "the output of `python -c 'import secrets; print(secrets.token_hex(32))'`"
        )
    return secret


def _create(path: Path) -> None:
    """32 random bytes, written to a private tmp file and linked into place: a concurrent first use either
    makes the key or reads the one the other process made, never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return
    finally:
        tmp.unlink(missing_ok=True)
    log.warning(
        "created the checkpoint key %s (mode 0600): it signs this machine's checkpoints. Nodes that resume them "
        "need the same key: set %s to its contents there",
        path,
        ENV,
    )
