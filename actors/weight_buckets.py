"""Versioned weight transfer in buckets: a state dict split into groups of at most `bucket_bytes`, each group a list
of flat byte arrays (one per tensor) with one checksum.

The learner hands each bucket to the object store as it fills (`put`), which is the one copy a transfer makes:
the arrays are views of the parameters themselves. Ray keeps numpy arrays out of band, so a generator on the
same node reads them without a copy, and across nodes each bucket is one transfer. The generator checks every
bucket's count, sizes and checksum and the version before any weight is loaded, so a torn or mixed-up transfer
never reaches the engine. Names, dtypes and shapes travel in the manifest; the bytes are the tensors' own (bf16
stays bf16). No Ray imports here: `put` and the handles are the caller's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xxhash


@dataclass(frozen=True)
class Slot:
    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class BucketSpec:
    slots: tuple[Slot, ...]
    nbytes: int
    checksum: str  # xxh3-64 of the bucket's bytes, tensor after tensor


@dataclass(frozen=True)
class WeightManifest:
    version: int
    buckets: tuple[BucketSpec, ...]

    @property
    def checksum(self) -> str:
        """One digest of the whole transfer: of the version and every bucket's digest, in order."""
        return digest(self.version, [b.checksum for b in self.buckets])

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    @property
    def names(self) -> list[str]:
        return [s.name for b in self.buckets for s in b.slots]


@dataclass(frozen=True)
class BucketedWeights:
    """What a generator receives: the manifest and one handle per bucket (Ray object refs, or the bucket's list of
    arrays itself in-process)."""

    manifest: WeightManifest
    buckets: tuple

    @property
    def version(self) -> int:
        return self.manifest.version


class WeightTransferError(ValueError):
    """A received bucket does not match its manifest: nothing of this version was loaded."""


def digest(version: int, bucket_checksums: Sequence[str]) -> str:
    h = xxhash.xxh3_64(str(version).encode())
    for c in bucket_checksums:
        h.update(c.encode())
    return h.hexdigest()


def checksum(arrays: Sequence[np.ndarray]) -> str:
    h = xxhash.xxh3_64()
    for a in arrays:
        h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
    return h.hexdigest()


def as_bytes(t: torch.Tensor) -> np.ndarray:
    """A flat uint8 view of a tensor's bytes (a copy only if it is on a GPU or not contiguous)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def pack(
    tensors: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int,
    put: Callable[[list[np.ndarray]], Any] = lambda arrays: arrays,
) -> tuple[list[BucketSpec], list]:
    """Buckets of at most `bucket_bytes` (a larger tensor gets one of its own), each checksummed and handed to
    `put` as soon as it is full (the object store copies it then; the identity keeps the views). Returns the specs
    and what `put` returned per bucket."""
    specs, handles = [], []
    names: list[Slot] = []
    arrays: list[np.ndarray] = []

    def flush() -> None:
        if names:
            specs.append(BucketSpec(tuple(names), sum(a.nbytes for a in arrays), checksum(arrays)))
            handles.append(put(list(arrays)))
            names.clear()
            arrays.clear()

    for name, t in tensors:
        a = as_bytes(t)
        if arrays and sum(x.nbytes for x in arrays) + a.nbytes > bucket_bytes:
            flush()
        names.append(Slot(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), a.nbytes))
        arrays.append(a)
    flush()
    return specs, handles


def verify(manifest: WeightManifest, buckets: Sequence[Sequence[np.ndarray]]) -> str:
    """Every bucket present, each tensor of its size, each bucket of its checksum; raises naming the first bucket
    that differs. Returns the digest of what was received (computed here, not copied from the manifest)."""
    if len(buckets) != len(manifest.buckets):
        raise WeightTransferError(
            f"weights v{manifest.version}: {len(buckets)} buckets received, the manifest lists {len(manifest.buckets)}"
        )
    received = []
    for i, (spec, arrays) in enumerate(zip(manifest.buckets, buckets, strict=True)):
        sizes = [a.nbytes for a in arrays]
        if sizes != [s.nbytes for s in spec.slots]:
            raise WeightTransferError(
                f"weights v{manifest.version}: bucket {i} holds {len(sizes)} tensors of {sum(sizes)} bytes, the "
                f"manifest says {len(spec.slots)} of {spec.nbytes}"
            )
        got = checksum(arrays)
        if got != spec.checksum:
            raise WeightTransferError(
                f"weights v{manifest.version}: bucket {i} checksum {got} != {spec.checksum} "
                f"(first tensor {spec.slots[0].name})"
            )
        received.append(got)
    return digest(manifest.version, received)


def unpack(
    manifest: WeightManifest, buckets: Sequence[Sequence[np.ndarray]]
) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) views of the received arrays, no copy (the loader copies them into the model)."""
    out = []
    with warnings.catch_warnings():  # object-store arrays are read-only; the views are only read
        warnings.simplefilter("ignore", UserWarning)
        for spec, arrays in zip(manifest.buckets, buckets, strict=True):
            for s, a in zip(spec.slots, arrays, strict=True):
                flat = torch.from_numpy(np.asarray(a, dtype=np.uint8).reshape(-1))
                out.append((s.name, flat.view(getattr(torch, s.dtype)).view(s.shape)))
    return out
