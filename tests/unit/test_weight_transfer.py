"""GPU weight sync on vLLM's weight-transfer engines, the parts that run on CPU tensors: the NCCL group's ranks,
the layout sent to the workers, the per-tensor checksum and its check, the sender's layout guard, troupe's receive
engines registered in vLLM's factory, which transport auto picks, and the IPC sync's bookkeeping. (The transfers
themselves need GPUs: tests/integration/test_gpu.py.)"""

from types import SimpleNamespace

import pytest
import torch
from ray.exceptions import GetTimeoutError, RayTaskError

from tests.integration.conftest import tiny_config
from troupe.actors.weight_buckets import WeightTransferError
from troupe.actors.weight_transfer import (
    TROUPE_BACKEND,
    TROUPE_IPC_BACKEND,
    check_sums,
    checked,
    rank_offsets,
    tensor_checksum,
    transfer_digest,
    update_info,
)
from troupe.cluster.config.checks import ConfigError, validate
from troupe.cluster.fleet.pool import Health, Member, Pool
from troupe.cluster.sync import ipc
from troupe.cluster.sync.transport import weight_transport


def _state(dtype):
    g = torch.Generator().manual_seed(1)
    return [
        ("embed", torch.randn(33, 7, generator=g).to(dtype)),
        ("norm", torch.randn(7, generator=g).to(dtype)),
        ("q", torch.randn(7, 7, generator=g).to(dtype).t()),  # not contiguous
        ("scalar", torch.tensor(2.0).to(dtype)),
    ]


def test_each_generator_takes_one_rank_per_tensor_parallel_worker_after_rank_0():
    assert rank_offsets([1, 1, 1]) == ([1, 2, 3], 4)
    assert rank_offsets([4, 4]) == ([1, 5], 9)  # vLLM adds each worker's rank (0..3) to its engine's offset
    assert rank_offsets([]) == ([], 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_tensor_checksum_sees_a_changed_or_moved_word_in_every_dtype(dtype):
    for _, t in _state(dtype):
        base = int(tensor_checksum(t))
        assert int(tensor_checksum(t.clone())) == base
        assert int(tensor_checksum(t.contiguous())) == base  # of the values, not of the memory layout
        flat = t.contiguous().reshape(-1)
        changed = flat.clone()
        changed.view(torch.uint8)[-1] ^= 1
        assert int(tensor_checksum(changed)) != base
        if flat.numel() > 1:
            swapped = flat.clone()
            swapped[[0, 1]] = swapped[[1, 0]]
            assert torch.equal(swapped, flat) or int(tensor_checksum(swapped)) != base


def test_tensor_checksum_of_a_view_two_bytes_into_a_buffer():
    """vLLM unpacks received tensors as views into its packed buffer, and ZeRO's bf16 parameters are views into a
    flat buffer: after a tensor of an odd number of bf16 values the next starts 2 bytes off a 4-byte boundary."""
    buf = torch.randn(11).to(torch.bfloat16)
    view = buf[3:11]  # 8 values, 16 bytes, starting at byte 6
    assert view.view(torch.uint8).storage_offset() % 4 == 2
    assert int(tensor_checksum(view)) == int(tensor_checksum(view.clone()))


def test_tensor_checksum_of_an_odd_byte_count_and_across_chunks(monkeypatch):
    odd = torch.arange(7, dtype=torch.uint8)  # 7 bytes: summed as bytes, not 32-bit words
    assert int(tensor_checksum(odd)) == sum(int(b) * (i + 2) for i, b in enumerate(odd))
    t = torch.randn(1000)
    whole = int(tensor_checksum(t))
    monkeypatch.setattr("troupe.actors.weight_transfer._CHUNK", 7)  # many chunks: the same sum
    assert int(tensor_checksum(t)) == whole


def test_a_received_tensor_that_differs_is_named():
    check_sums([1, 2, 3], [1, 2, 3], ["a", "b", "c"])
    with pytest.raises(WeightTransferError, match="b: checksum 5 received, the learner rank sent 2"):
        check_sums([1, 5, 3], [1, 2, 3], ["a", "b", "c"])
    with pytest.raises(WeightTransferError, match="received 2 tensors"):
        check_sums([1, 2], [1, 2, 3], ["a", "b", "c"])
    assert transfer_digest(3, [1, 2]) != transfer_digest(4, [1, 2]) != transfer_digest(3, [2, 1])


def test_the_sender_refuses_what_its_layout_does_not_announce():
    state = _state(torch.float32)
    info = update_info(state)
    assert info == {
        "names": ["embed", "norm", "q", "scalar"],
        "dtype_names": ["float32"] * 4,
        "shapes": [[33, 7], [7], [7, 7], []],
    }
    assert [n for n, _ in checked(state, info, 1)] == info["names"]
    with pytest.raises(WeightTransferError, match=r"sending \('norm'.*where the layout has \('embed'"):
        list(checked(state[1:], info, 3))
    as_half = [(n, t.half()) for n, t in state]  # same names and shapes, other bytes
    with pytest.raises(WeightTransferError, match="float16.*where the layout has .*float32"):
        list(checked(as_half, info, 3))
    with pytest.raises(WeightTransferError, match="sent 3 tensors, the layout has 4"):
        list(checked(state[:3], info, 3))


def test_troupes_receive_engine_is_registered_with_vllm():
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

    import troupe.actors.generator.vllm_weight_sync as sync

    sync.register()  # twice is once
    engine = WeightTransferEngineFactory._registry[TROUPE_BACKEND]()
    assert issubclass(engine, NCCLWeightTransferEngine) and engine.__name__ == "ChecksummedNCCLEngine"
    ipc_engine = WeightTransferEngineFactory._registry[TROUPE_IPC_BACKEND]()
    assert issubclass(ipc_engine, IPCWeightTransferEngine) and ipc_engine.__name__ == "ChecksummedIPCEngine"
    info = ipc_engine.update_info_cls(
        names=["w"], dtype_names=["float32"], shapes=[[2]], ipc_handles=[{}], checksums=[7]
    )
    assert info.checksums == [7]  # the checksums ride vLLM's update info


def test_auto_picks_nccl_for_split_gpus_ipc_for_colocated_and_is_refused_elsewhere():
    assert weight_transport("auto", "vllm", 1, 1, "split") == "nccl"
    assert weight_transport("auto", "vllm", 4, 1, "split") == "nccl"  # tensor parallel: each worker is a rank
    assert weight_transport("auto", "vllm", 0.5, 1, "split") == "object_store"  # 2 group ranks on one GPU
    assert weight_transport("auto", "vllm", 0.4, 0.5, "colocated") == "ipc"
    assert weight_transport("auto", "vllm", 1, 1, "colocated") == "object_store"  # a 2-GPU bundle: 2 GPUs
    assert weight_transport("auto", "vllm", 0, 0, "colocated") == "object_store"  # CPU
    assert weight_transport("auto", "hf", 1, 1, "split") == "object_store"  # no vLLM engine to receive
    assert weight_transport("object_store", "vllm", 1, 1, "split") == "object_store"
    with pytest.raises(ConfigError, match=r"sync.transport=nccl needs whole GPUs"):
        validate(tiny_config("sync.transport=nccl"))
    with pytest.raises(ConfigError, match=r"sync.transport=ipc needs placement.layout=colocated on one GPU"):
        validate(tiny_config("sync.transport=ipc"))


class Generator:
    """A generator's IPC calls, answered at once (ray.get returns them, or raises a returned error); `corrupt`
    reports other sums, `fail_chunk` fails on every chunk."""

    def __init__(self, corrupt: bool = False, fail_chunk: bool = False):
        self.chunks, self.corrupt, self.fail_chunk = [], corrupt, fail_chunk
        self.begin_weights = SimpleNamespace(remote=lambda: None)
        self.receive_chunk = SimpleNamespace(remote=self._receive)
        self.finish_weights = SimpleNamespace(remote=self._finish)

    def _receive(self, info):
        if self.fail_chunk:  # what ray.get raises for it
            return RayTaskError("receive_chunk", "traceback", ValueError("checksum"))
        self.chunks.append(info)

    def _finish(self, version, rollback):
        sums = [s for c in self.chunks for s in c["checksums"]]
        return {
            "version": version,
            "checksum": transfer_digest(version, [0] if self.corrupt else sums),
            "load_s": 0.1,
        }


def test_ipc_sync_hands_each_generator_its_own_ranks_chunks_and_checks_the_digest(monkeypatch):
    """Generator i takes learner rank i's chunks (its bundle, `slot`), every chunk in turn; one reporting another
    digest, or failing on a chunk, is STALE and the others are synced; the ranks end their export either way."""

    def get(ref, timeout=None):
        if isinstance(ref, Exception):
            raise ref
        return ref

    monkeypatch.setattr(ipc.ray, "get", get)
    chunks = [
        [{"names": ["a", "b"], "checksums": [10 + r, 20 + r]}, {"names": ["c"], "checksums": [30 + r]}]
        for r in range(3)
    ]
    ended = []
    learners = SimpleNamespace(ipc_begin=lambda: None, ipc_end=lambda: ended.append(1))
    served = iter([[chunks[r][k] for r in range(3)] for k in range(2)] + [[None] * 3])
    learners.ipc_next = lambda: next(served)
    pool = Pool("generator", factory=None, timeout_s=1)
    honest, liar, broken = Generator(), Generator(corrupt=True), Generator(fail_chunk=True)
    pool.members = [
        Member(7, honest, Health.HEALTHY, slot=2),
        Member(3, liar, Health.HEALTHY, slot=0),
        Member(5, broken, Health.HEALTHY, slot=1),
    ]

    stats = ipc.IpcSync().push(pool, learners, version=5)
    assert honest.chunks == [chunks[2][0], chunks[2][1]]  # slot 2 <- rank 2, both chunks in order
    healthy = {m.index: m.health for m in pool.members}
    assert healthy == {7: Health.HEALTHY, 3: Health.STALE, 5: Health.STALE}
    assert pool.members[0].info["version"] == 5
    assert stats["generators_synced"] == 1 and stats["generators_stale"] == 2 and stats["transport_ipc"] == 1
    assert ended == [1]

    def lost():
        raise GetTimeoutError("rank 0")

    learners.ipc_begin = lost
    assert ipc.IpcSync().push(pool, learners, version=6) is None  # the caller falls back to the object store
    assert ended == [1, 1]
