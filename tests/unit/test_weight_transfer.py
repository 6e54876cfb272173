"""GPU weight sync on vLLM's weight-transfer engine, the parts that run on CPU tensors: the group's ranks, the
layout sent to the workers, the per-tensor checksum and its check, the sender's layout guard, troupe's receive
engine registered in vLLM's factory, and when auto picks NCCL. (The broadcast itself needs GPUs: tests/integration/
test_gpu.py.)"""

import pytest
import torch

from tests.integration.conftest import tiny_config
from troupe.actors.weight_buckets import WeightTransferError
from troupe.actors.weight_transfer import (
    TROUPE_BACKEND,
    check_sums,
    checked,
    rank_offsets,
    tensor_checksum,
    transfer_digest,
    update_info,
)
from troupe.cluster.config.checks import ConfigError, validate
from troupe.cluster.sync.nccl import nccl_enabled


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


def test_tensor_checksum_of_an_odd_byte_count_and_across_chunks(monkeypatch):
    odd = torch.arange(7, dtype=torch.uint8)  # 7 bytes: summed as bytes, not 32-bit words
    assert int(tensor_checksum(odd)) == sum(int(b) * (i + 2) for i, b in enumerate(odd))
    t = torch.randn(1000)
    whole = int(tensor_checksum(t))
    monkeypatch.setattr("troupe.actors.weight_transfer._CHUNK", 7)  # many chunks: the same sum
    assert int(tensor_checksum(t)) == whole


def test_a_received_tensor_that_differs_is_named():
    check_sums([1, 2, 3], [1, 2, 3], ["a", "b", "c"])
    with pytest.raises(WeightTransferError, match="b: checksum 5 over NCCL, rank 0 sent 2"):
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
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

    import troupe.actors.generator.vllm_weight_sync as sync

    sync.register()  # twice is once
    engine = WeightTransferEngineFactory._registry[TROUPE_BACKEND]()
    assert issubclass(engine, NCCLWeightTransferEngine) and engine.__name__ == "ChecksummedNCCLEngine"


def test_auto_picks_nccl_only_for_split_gpu_runs_and_nccl_is_refused_elsewhere():
    assert nccl_enabled("auto", 1, 1, "split")
    assert nccl_enabled("auto", 4, 1, "split")  # a tensor-parallel generator: each worker is a rank
    assert not nccl_enabled("auto", 0, 1, "split")
    assert not nccl_enabled("auto", 0.5, 1, "split")  # two ranks on one GPU cannot share a communicator
    assert not nccl_enabled("auto", 1, 1, "colocated")
    assert not nccl_enabled("object_store", 1, 1, "split")
    with pytest.raises(ConfigError, match=r"sync.transport=nccl needs whole GPUs"):
        validate(tiny_config("sync.transport=nccl"))
