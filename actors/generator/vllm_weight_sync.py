"""What runs inside vLLM's workers for troupe's weight sync (imported there as `worker_extension_cls`, and by the
generator before it builds an in-process engine, so the backend below is registered wherever a worker starts).

- `WeightSyncExtension`: weights as safetensors bytes when the engine runs in other processes (object store path),
  and the checksums of the last NCCL transfer for the generator's report.
- `ChecksummedNCCLEngine`: vLLM's dense NCCL weight-transfer engine, registered as `TROUPE_BACKEND`, which
  checksums every tensor as it arrives (before loading it) and then compares the list with the one learner rank 0
  broadcasts after the weights (actors/weight_transfer.py). Must stay importable without Ray.
"""

from __future__ import annotations

from troupe.actors.weight_transfer import TROUPE_BACKEND, check_sums, tensor_checksum


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


def __getattr__(name: str):
    """`ChecksummedNCCLEngine` is built on first use (vLLM's factory loads it by name): importing this module then
    needs no vLLM engine code."""
    if name == "ChecksummedNCCLEngine":
        globals()[name] = _engine_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Register `TROUPE_BACKEND` with vLLM's weight-transfer engine factory (once per process)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    try:
        WeightTransferEngineFactory.register_engine(TROUPE_BACKEND, __name__, "ChecksummedNCCLEngine")
    except ValueError:  # registered already in this process
        pass


try:  # vLLM's workers import this module; registering here makes the backend known in every one of them
    register()
except ImportError:  # no vLLM here: nothing to register
    pass
