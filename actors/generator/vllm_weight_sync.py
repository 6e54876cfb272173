"""What runs inside vLLM's workers for troupe's weight sync (imported there as `worker_extension_cls`, and by the
generator before it builds an in-process engine, so the backend below is registered wherever a worker starts).

- `WeightSyncExtension`: weights as safetensors bytes when the engine runs in other processes (object store path),
  and the checksums of the last NCCL transfer for the generator's report.
- `ChecksummedNCCLEngine`: vLLM's dense NCCL weight-transfer engine, registered as `TROUPE_BACKEND`, which
  checksums every tensor as it arrives (before loading it) and then compares the list with the one learner rank 0
  broadcasts after the weights (actors/weight_transfer.py).
- `ChecksummedIPCEngine`: vLLM's CUDA IPC engine (`TROUPE_IPC_BACKEND`, packed chunks), which checks each tensor of
  a chunk against the checksum its learner rank sent with it, before loading the chunk.
Must stay importable without Ray.
"""

from __future__ import annotations

from troupe.actors.weight_transfer import TROUPE_BACKEND, TROUPE_IPC_BACKEND, check_sums, tensor_checksum


class WeightSyncExtension:
    def update_weights_from_bytes(self, blob: bytes) -> None:
        from safetensors.torch import load

        self.reload_weights(weights_iterator=list(load(blob).items()))

    def troupe_received_sums(self) -> list[int]:
        """The checksums of the last NCCL transfer this worker received and checked."""
        return list(self.weight_transfer_engine.received_sums)


def _engine_class():
    import torch
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine
    from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_consumer
    from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

    class ChecksummedNCCLEngine(NCCLWeightTransferEngine):
        """vLLM's packed NCCL receive, each tensor checksummed before it loads; then rank 0's checksums."""

        received_sums: list[int] = []

        def receive_weights(self, update_info) -> None:
            if self.model_update_group is None or not self.packed:
                raise RuntimeError("troupe's NCCL weight transfer needs an initialised, packed group")
            sums: list = []

            def load(items: list) -> None:
                sums.extend(tensor_checksum(t) for _, t in items)
                self.model.load_weights(items)

            layout = (
                (name, (shape, getattr(torch, dtype)))
                for name, dtype, shape in zip(
                    update_info.names, update_info.dtype_names, update_info.shapes, strict=True
                )
            )
            with disable_mtp_completeness_check():  # as vLLM's own receive: a full model, no MTP check
                packed_nccl_broadcast_consumer(
                    iterator=layout,
                    group=self.model_update_group,
                    src=0,
                    post_unpack_func=load,
                    buffer_size_bytes=self.packed_buffer_size_bytes,
                    num_buffers=self.packed_num_buffers,
                    device=self.device,
                )
            expected = torch.empty(len(update_info.names), dtype=torch.int64, device=self.device)
            self.model_update_group.broadcast(expected, src=0)
            torch.cuda.synchronize(self.device)
            received = [int(s) for s in sums]
            check_sums(received, expected.tolist(), update_info.names)
            self.received_sums = received

    return ChecksummedNCCLEngine


def _ipc_engine_class():
    from dataclasses import dataclass

    import torch
    from vllm.distributed.weight_transfer.ipc_engine import (
        IPCWeightTransferEngine,
        IPCWeightTransferUpdateInfo,
    )
    from vllm.distributed.weight_transfer.packed_tensor import packed_ipc_consumer
    from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

    @dataclass
    class ChecksummedIPCUpdateInfo(IPCWeightTransferUpdateInfo):
        checksums: list[int] | None = None  # of each tensor of the chunk, in order, from the learner rank

    class ChecksummedIPCEngine(IPCWeightTransferEngine):
        """vLLM's packed IPC receive (chunks of one shared buffer, copied out), each chunk checked before it loads."""

        update_info_cls = ChecksummedIPCUpdateInfo
        received_sums: list[int] = []

        def start_weight_update(self) -> None:
            self.received_sums = []
            super().start_weight_update()

        def receive_weights(self, update_info) -> None:
            if not self.packed or update_info.checksums is None or update_info.tensor_sizes is None:
                raise RuntimeError("troupe's IPC weight transfer sends packed chunks with their checksums")
            weights = packed_ipc_consumer(
                ipc_handle=update_info.ipc_handles,
                names=update_info.names,
                shapes=update_info.shapes,
                dtype_names=update_info.dtype_names,
                tensor_sizes=update_info.tensor_sizes,
                device_index=self.device.index,
                importer=self._packed_importer,  # one mapping of the buffer for every chunk of an export
            )
            received = torch.stack([tensor_checksum(t) for _, t in weights]).tolist() if weights else []
            check_sums(received, update_info.checksums, update_info.names)
            with disable_mtp_completeness_check():
                self.model.load_weights(weights)
            self.received_sums = self.received_sums + received

    return ChecksummedIPCEngine


def __getattr__(name: str):
    """The engines are built on first use (vLLM's factory loads them by name): importing this module then needs no
    vLLM engine code."""
    builders = {"ChecksummedNCCLEngine": _engine_class, "ChecksummedIPCEngine": _ipc_engine_class}
    if name in builders:
        globals()[name] = builders[name]()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Register troupe's receive engines with vLLM's weight-transfer engine factory (once per process)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    for backend, engine in (
        (TROUPE_BACKEND, "ChecksummedNCCLEngine"),
        (TROUPE_IPC_BACKEND, "ChecksummedIPCEngine"),
    ):
        try:
            WeightTransferEngineFactory.register_engine(backend, __name__, engine)
        except ValueError:  # registered already in this process
            pass


try:  # vLLM's workers import this module; registering here makes the backend known in every one of them
    register()
except ImportError:  # no vLLM here: nothing to register
    pass
