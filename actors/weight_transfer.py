"""GPU weight sync on vLLM's weight-transfer engines (`vllm.distributed.weight_transfer`): NCCL between GPUs, CUDA
IPC on a shared GPU.

NCCL (`placement.layout=split`):

Learner rank 0 is rank 0 of a weight-update group; generator i's vLLM workers join it at `rank_offsets(...)[i]` (one
rank per tensor-parallel worker). The group forms from an NCCL unique id that rank 0 mints and the driver hands to
every member, so no TCP port is probed and released on the way (the race behind an EADDRINUSE in CI). Each sync,
rank 0 streams the weights with vLLM's packed broadcast producer; every worker receives them with vLLM's engine, in
a subclass (`actors/generator/vllm_weight_sync.py`, backend `TROUPE_BACKEND`) that checksums each tensor as it
arrives, before loading it, and then compares the list with the one rank 0 broadcasts last. A mismatch fails the
sync on that generator: it is STALE and refits through the object store. The layout (names, dtypes, shapes) is
fixed for a model and sent once through Ray (`update_info`).

CUDA IPC (`placement.layout=colocated`): learner rank i packs its weights, chunk by chunk, into one buffer it shares
by a CUDA IPC handle with generator i, which sits on the same GPU (`IpcExport`), with every tensor's checksum; the
generator's vLLM engine copies each chunk out, checks it against those checksums and loads it
(`ChecksummedIPCEngine`).

CPU builds of vLLM import all of this but cannot run it (no NCCL); CPU runs use the object store.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from troupe.actors.weight_buckets import WeightTransferError, digest

TROUPE_BACKEND = "troupe_nccl"  # the checksumming worker engines' names in vLLM's registry
TROUPE_IPC_BACKEND = "troupe_ipc"
_CHUNK = 1 << 22  # words per checksum step: bounds its int64 temporaries (~100 MiB) inside a full GPU
# vLLM's packed broadcast: both sides must use the same buffer geometry (it rides the init info)
PACKED = {"packed": True, "packed_buffer_size_bytes": 1 << 28, "packed_num_buffers": 2}
IPC_BUFFER_BYTES = 1 << 28  # the IPC buffer a learner rank shares with its generator (or its largest tensor)


def rank_offsets(tensor_parallel: Sequence[int]) -> tuple[list[int], int]:
    """Each generator's first rank in the weight-update group (rank 0 is learner rank 0; a generator's vLLM workers
    take one rank each, from its offset), and the group's size."""
    offsets, at = [], 1
    for size in tensor_parallel:
        offsets.append(at)
        at += size
    return offsets, at


def update_info(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict:
    """vLLM's per-update metadata (`NCCLWeightTransferUpdateInfo`) of the tensors rank 0 will send, in order."""
    names, dtypes, shapes = [], [], []
    for name, t in tensors:
        names.append(name)
        dtypes.append(str(t.dtype).removeprefix("torch."))
        shapes.append(list(t.shape))
    return {"names": names, "dtype_names": dtypes, "shapes": shapes}


def tensor_checksum(t: torch.Tensor) -> torch.Tensor:
    """A position-weighted sum (wrapping int64) of the tensor's bytes as 32-bit words (bytes when its size is not
    a multiple of 4), on the tensor's device, without a host sync: a changed or moved word changes it."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if raw.numel() % 4 == 0 and raw.storage_offset() % 4:  # a view 2 bytes into a packed buffer or a flat
        raw = raw.clone()  # ZeRO buffer: the same bytes, aligned (either side may see either alignment)
    words = raw.view(torch.int32) if raw.numel() % 4 == 0 else raw
    total = torch.zeros((), dtype=torch.int64, device=t.device)
    for start in range(0, words.numel(), _CHUNK):
        part = words[start : start + _CHUNK].to(torch.int64)
        index = torch.arange(start + 1, start + 1 + part.numel(), dtype=torch.int64, device=t.device)
        total += (part * index).sum() + part.sum()
    return total


def check_sums(received: Sequence[int], expected: Sequence[int], names: Sequence[str]) -> None:
    """Raise naming the first tensor whose checksum differs from its learner rank's (or a count that differs)."""
    if len(received) != len(expected):
        raise WeightTransferError(f"received {len(received)} tensors, the learner rank sent {len(expected)}")
    for name, got, want in zip(names, received, expected, strict=True):
        if got != want:
            raise WeightTransferError(f"{name}: checksum {got} received, the learner rank sent {want}")


def transfer_digest(version: int, sums: Sequence[int]) -> str:
    """What both ends report for one transfer: the version and every tensor's checksum, in order."""
    return digest(version, [str(s) for s in sums])


def checked(
    tensors: Iterable[tuple[str, torch.Tensor]], info: dict, version: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """`tensors` as announced in `info`: the workers size their buffers from it, so a tensor that differs in name,
    dtype or shape (or a count that differs) would split the stream differently on each side."""
    expected = list(zip(info["names"], info["dtype_names"], map(tuple, info["shapes"]), strict=True))
    sent = 0
    for name, t in tensors:
        got = (name, str(t.dtype).removeprefix("torch."), tuple(t.shape))
        if sent >= len(expected) or got != expected[sent]:
            want = expected[sent] if sent < len(expected) else "nothing more"
            raise WeightTransferError(f"weights v{version}: sending {got} where the layout has {want}")
        sent += 1
        yield name, t
    if sent != len(expected):
        raise WeightTransferError(f"weights v{version}: sent {sent} tensors, the layout has {len(expected)}")


def new_unique_id() -> str:
    """A fresh NCCL unique id (base64, as vLLM's init info takes it), minted by rank 0's NCCL library."""
    import base64
    import ctypes

    from vllm.distributed.device_communicators.pynccl_wrapper import NCCLLibrary

    uid = NCCLLibrary().ncclGetUniqueId()
    return base64.b64encode(ctypes.string_at(ctypes.addressof(uid.internal), 128)).decode()


class WeightSender:
    """Learner rank 0's end of the weight-update group: rank 0, on `device`."""

    def __init__(self, unique_id: str, world_size: int, device: torch.device) -> None:
        import base64

        from vllm.distributed.weight_transfer.nccl_common import uid_init_process_group

        self.comm = uid_init_process_group(base64.b64decode(unique_id), 0, world_size, device)
        if self.comm.disabled:  # e.g. VLLM_DISABLE_PYNCCL: broadcasts would silently do nothing
            raise RuntimeError("the NCCL weight-update group is disabled: use sync.transport=object_store")
        self.device = device

    def send(self, tensors: Iterable[tuple[str, torch.Tensor]], info: dict, version: int) -> str:
        """Broadcast the weights (vLLM's packed producer), then their checksums; returns the transfer's digest."""
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        sums: list[torch.Tensor] = []

        def on_device(item: tuple[str, torch.Tensor]) -> torch.Tensor:
            t = item[1].to(self.device)
            sums.append(tensor_checksum(t))
            return t

        packed_nccl_broadcast_producer(
            iterator=checked(tensors, info, version),
            group=self.comm,
            src=0,
            post_iter_func=on_device,
            buffer_size_bytes=PACKED["packed_buffer_size_bytes"],
            num_buffers=PACKED["packed_num_buffers"],
        )
        expected = torch.stack(sums) if sums else torch.zeros(0, dtype=torch.int64, device=self.device)
        self.comm.broadcast(expected, src=0)
        torch.cuda.synchronize(self.device)
        return transfer_digest(version, expected.tolist())

    def close(self) -> None:
        self.comm.destroy()


class IpcExport:
    """This rank's weights for the generator on its GPU, in chunks through one IPC-shared buffer of
    `IPC_BUFFER_BYTES` (vLLM's packed IPC producer: a single `reduce_tensor` per export, and the buffer freed after),
    each chunk as vLLM's update info plus every tensor's checksum. The driver asks for the next chunk only once the
    generator has read the last (`next_chunk`)."""

    def __init__(
        self, tensors: Iterable[tuple[str, torch.Tensor]], device: torch.device, largest: int
    ) -> None:
        """`largest`: the size in bytes of the largest tensor, which one chunk must hold."""
        from vllm.distributed.weight_transfer.packed_tensor import packed_ipc_producer

        self.sums: dict[
            str, torch.Tensor
        ] = {}  # a chunk's first tensor is read before the chunk before it ships

        def on_device(item: tuple[str, torch.Tensor]) -> torch.Tensor:
            t = item[1].to(device)
            self.sums[item[0]] = tensor_checksum(t)
            return t

        gpu = str(torch.cuda.get_device_properties(device).uuid)
        self.device = device
        self.chunks = packed_ipc_producer(iter(tensors), gpu, on_device, max(IPC_BUFFER_BYTES, largest))

    def next_chunk(self) -> dict | None:
        with torch.cuda.device(self.device):  # the producer allocates its buffer on the current device
            chunk = next(self.chunks, None)
        if chunk is None:
            return None
        sums = torch.stack([self.sums.pop(n) for n in chunk.names]).tolist()
        return {
            "names": chunk.names,
            "dtype_names": chunk.dtype_names,
            "shapes": chunk.shapes,
            "tensor_sizes": chunk.tensor_sizes,
            "ipc_handles": chunk.ipc_handle,
            "checksums": sums,
        }

    def close(self) -> None:
        self.chunks.close()  # frees the shared buffer
        torch.cuda.ipc_collect()
