"""GPU weight transfer: learner rank 0 broadcasts the weights in buckets over NCCL to every generator.

One weight-update group of 1 + G processes (learner rank 0 = rank 0, generator i = rank 1 + i), formed with vLLM's
StatelessProcessGroup + PyNcclCommunicator so it stays outside torch.distributed's default group (which the learner
ranks' DeepSpeed group owns). The layout (names, dtypes, shapes, bucket sizes) is fixed for a model and sent once
through Ray; each sync broadcasts the buckets, then one int64 tensor of per-bucket checksums, and a generator loads
nothing until every bucket's checksum matches. Used when generators and learners are on GPUs
(`sync.transport=nccl`, or auto); the object store carries everything else.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from troupe.actors.weight_buckets import BucketSpec, Slot, WeightManifest, WeightTransferError, digest

_ALIGN = 8  # bytes: every tensor starts on an int64 boundary, so a bucket's checksum reads it as int64 words
_CHUNK = 1 << 24  # int64 words per checksum step: bounds the index tensor's memory


def layout(tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[BucketSpec]:
    """Bucket specs (no checksums) for tensors packed in order at 8-byte offsets; both sides derive offsets from it."""
    specs: list[BucketSpec] = []
    slots: list[Slot] = []
    used = 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        if slots and _aligned(used) + n > bucket_bytes:
            specs.append(BucketSpec(tuple(slots), _aligned(used), ""))
            slots, used = [], 0
        used = _aligned(used)
        slots.append(Slot(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), n))
        used += n
    if slots:
        specs.append(BucketSpec(tuple(slots), _aligned(used), ""))
    return specs


def offsets(spec: BucketSpec) -> Iterator[tuple[Slot, int]]:
    at = 0
    for s in spec.slots:
        at = _aligned(at)
        yield s, at
        at += s.nbytes


def bucket_checksum(buf: torch.Tensor) -> int:
    """A position-weighted sum of the bucket's int64 words (wrapping), on the buffer's device: a changed or moved
    word changes it. Cheap enough to run on every sync; xxh3 is the object-store path's checksum."""
    words = buf.view(torch.int64)
    total = torch.zeros((), dtype=torch.int64, device=buf.device)
    for start in range(0, words.numel(), _CHUNK):
        part = words[start : start + _CHUNK]
        index = torch.arange(start + 1, start + 1 + part.numel(), dtype=torch.int64, device=buf.device)
        total += (part * index).sum() + part.sum()
    return int(total)


class WeightGroup:
    """This process's end of the weight-update group; `device` is its CUDA device."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, device: torch.device) -> None:
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
        self.comm = PyNcclCommunicator(group, device=device)
        if self.comm.disabled:  # no libnccl, or VLLM_DISABLE_PYNCCL: broadcasts would silently do nothing
            raise RuntimeError(
                "the NCCL weight-update group is disabled (no NCCL library?): use sync.transport=object_store"
            )
        self.rank, self.world_size, self.device = rank, world_size, device

    def close(self) -> None:
        destroy = getattr(self.comm, "destroy", None)
        if destroy is not None:
            destroy()

    def send(self, tensors: Iterable[tuple[str, torch.Tensor]], specs: list[BucketSpec], version: int) -> str:
        """Rank 0: broadcast the buckets in `specs`' order, then their checksums; returns the transfer's digest."""
        source = iter(tensors)
        sums = []
        for spec in specs:
            buf = pack_bucket(spec, source, self.device, version)
            self.comm.broadcast(buf, src=0)
            sums.append(bucket_checksum(buf))
        self.comm.broadcast(torch.tensor(sums, dtype=torch.int64, device=self.device), src=0)
        torch.cuda.synchronize(self.device)
        return digest(version, [str(s) for s in sums])

    def receive(self, manifest: WeightManifest) -> tuple[list[tuple[str, torch.Tensor]], str]:
        """Generators: the buckets, checked against rank 0's checksums before anything is returned."""
        buffers = []
        for spec in manifest.buckets:
            buf = torch.empty(spec.nbytes, dtype=torch.uint8, device=self.device)
            self.comm.broadcast(buf, src=0)
            buffers.append(buf)
        expected = torch.empty(len(buffers), dtype=torch.int64, device=self.device)
        self.comm.broadcast(expected, src=0)
        torch.cuda.synchronize(self.device)
        sums = [bucket_checksum(b) for b in buffers]
        for i, (got, want) in enumerate(zip(sums, expected.tolist(), strict=True)):
            if got != want:
                raise WeightTransferError(
                    f"weights v{manifest.version}: bucket {i} checksum {got} != {want} over NCCL "
                    f"(first tensor {manifest.buckets[i].slots[0].name})"
                )
        items = [
            item
            for spec, buf in zip(manifest.buckets, buffers, strict=True)
            for item in unpack_bucket(spec, buf)
        ]
        return items, digest(manifest.version, [str(s) for s in sums])


def pack_bucket(
    spec: BucketSpec, source: Iterator[tuple[str, torch.Tensor]], device, version: int
) -> torch.Tensor:
    """The next tensors of `source` copied into one flat buffer at the layout's offsets (zeroed padding)."""
    buf = torch.zeros(spec.nbytes, dtype=torch.uint8, device=device)
    for slot, at in offsets(spec):
        name, t = next(source)
        dtype = str(t.dtype).removeprefix("torch.")
        if name != slot.name or tuple(t.shape) != slot.shape or dtype != slot.dtype:
            raise WeightTransferError(
                f"weights v{version}: {name} {tuple(t.shape)} {dtype} where the layout has "
                f"{slot.name} {slot.shape} {slot.dtype}"
            )
        buf[at : at + slot.nbytes].copy_(t.detach().to(device).contiguous().reshape(-1).view(torch.uint8))
    return buf


def unpack_bucket(spec: BucketSpec, buf: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    return [
        (slot.name, buf[at : at + slot.nbytes].view(getattr(torch, slot.dtype)).view(slot.shape))
        for slot, at in offsets(spec)
    ]


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN
