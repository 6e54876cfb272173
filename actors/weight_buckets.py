"""Versioned weight transfer in buckets: a state dict packed into a few flat byte buffers, each with a checksum.

The learner packs once; the buffers travel as they are (Ray's object store hands a flat uint8 array to a reader on
the same node without a copy, and across nodes as one transfer per bucket), and the generator checks every
bucket's checksum and the version before any weight is loaded, so a torn or mixed-up transfer never reaches the
engine. Names, dtypes and shapes travel in the manifest; the bytes are the tensors' own (bf16 stays bf16).
No Ray imports here: the refs are the caller's business.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

_ALIGN = 64  # every tensor starts on a 64-byte boundary: a typed view of the bucket is always aligned


@dataclass(frozen=True)
class Slot:
    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class BucketSpec:
    slots: tuple[Slot, ...]
    nbytes: int
    checksum: str  # xxh3-64 of the bucket's bytes


@dataclass(frozen=True)
class WeightManifest:
    version: int
    buckets: tuple[BucketSpec, ...]

    @property
    def checksum(self) -> str:
        """One digest of the whole transfer: of the version and every bucket's digest, in order."""
        h = xxhash.xxh3_64(str(self.version).encode())
        for b in self.buckets:
            h.update(b.checksum.encode())
        return h.hexdigest()

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    @property
    def names(self) -> list[str]:
        return [s.name for b in self.buckets for s in b.slots]


@dataclass(frozen=True)
class BucketedWeights:
    """What a generator receives: the manifest and one handle per bucket (Ray object refs, or the arrays
    themselves in-process)."""

    manifest: WeightManifest
    buckets: tuple

    @property
    def version(self) -> int:
        return self.manifest.version


class WeightTransferError(ValueError):
    """A received bucket does not match its manifest: nothing of this version was loaded."""


def checksum(buffer: np.ndarray) -> str:
    return xxhash.xxh3_64(memoryview(buffer)).hexdigest()


def pack(
    tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> tuple[list[BucketSpec], list[np.ndarray]]:
    """Flat uint8 buckets of at most `bucket_bytes` each (a larger tensor gets a bucket of its own)."""
    groups: list[list[tuple[str, torch.Tensor, int]]] = [[]]
    used = 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        start = _aligned(used)
        if groups[-1] and start + n > bucket_bytes:
            groups.append([])
            start = 0
        groups[-1].append((name, t, start))
        used = start + n
    specs, buffers = [], []
    for group in groups:
        if not group:
            continue
        size = max(start + t.numel() * t.element_size() for _, t, start in group)
        buf = torch.empty(size, dtype=torch.uint8)
        slots = []
        for name, t, start in group:
            n = t.numel() * t.element_size()
            if n:
                buf[start : start + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
            slots.append(Slot(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), start, n))
        array = buf.numpy()
        specs.append(BucketSpec(tuple(slots), size, checksum(array)))
        buffers.append(array)
    return specs, buffers


def verify(manifest: WeightManifest, buffers: Sequence[np.ndarray]) -> None:
    """Every bucket present, of its size and checksum; raises naming the first bucket that differs."""
    if len(buffers) != len(manifest.buckets):
        raise WeightTransferError(
            f"weights v{manifest.version}: {len(buffers)} buckets received, the manifest lists {len(manifest.buckets)}"
        )
    for i, (spec, buf) in enumerate(zip(manifest.buckets, buffers, strict=True)):
        if buf.nbytes != spec.nbytes:
            raise WeightTransferError(
                f"weights v{manifest.version}: bucket {i} has {buf.nbytes} bytes, the manifest says {spec.nbytes}"
            )
        got = checksum(buf)
        if got != spec.checksum:
            raise WeightTransferError(
                f"weights v{manifest.version}: bucket {i} checksum {got} != {spec.checksum} "
                f"(first tensor {spec.slots[0].name})"
            )


def unpack(manifest: WeightManifest, buffers: Sequence[np.ndarray]) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) views into the buffers, no copy (the loader copies them into the model)."""
    out = []
    with warnings.catch_warnings():  # object-store buffers are read-only; the views are only read
        warnings.simplefilter("ignore", UserWarning)
        for spec, buf in zip(manifest.buckets, buffers, strict=True):
            flat = torch.from_numpy(np.asarray(buf, dtype=np.uint8).reshape(-1))
            for s in spec.slots:
                dtype = getattr(torch, s.dtype)
                out.append((s.name, flat[s.offset : s.offset + s.nbytes].view(dtype).view(s.shape)))
    return out


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN
