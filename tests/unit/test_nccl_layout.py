"""The NCCL weight path's packing, on CPU tensors: the layout both sides derive offsets from, a lossless
pack/unpack for every dtype, the bucket checksum, and when auto picks NCCL. (The broadcast itself needs GPUs.)"""

import pytest
import torch

from tests.integration.conftest import tiny_config
from troupe.actors.nccl_weights import bucket_checksum, layout, offsets, pack_bucket, unpack_bucket
from troupe.actors.weight_buckets import WeightTransferError
from troupe.cluster.config.checks import ConfigError, validate
from troupe.cluster.sync.nccl import nccl_enabled


def _state(dtype):
    g = torch.Generator().manual_seed(1)
    return [
        ("embed", torch.randn(33, 7, generator=g).to(dtype)),
        ("norm", torch.randn(7, generator=g).to(dtype)),
        ("q", torch.randn(7, 7, generator=g).to(dtype).t()),
        ("scalar", torch.tensor(2.0).to(dtype)),
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("bucket_bytes", [16, 200, 1 << 20])
def test_pack_unpack_roundtrip_at_aligned_offsets(dtype, bucket_bytes):
    state = _state(dtype)
    specs = layout(state, bucket_bytes)
    source = iter(state)
    out = []
    for spec in specs:
        assert spec.nbytes % 8 == 0 and all(at % 8 == 0 for _, at in offsets(spec))
        buf = pack_bucket(spec, source, "cpu", 1)
        out += unpack_bucket(spec, buf)
    assert [n for n, _ in out] == [n for n, _ in state]
    for (_, got), (_, want) in zip(out, state, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_a_tensor_out_of_layout_order_or_dtype_is_refused():
    state = _state(torch.float32)
    specs = layout(state, 1 << 20)
    with pytest.raises(WeightTransferError, match="where the layout has embed"):
        pack_bucket(specs[0], iter(state[1:]), "cpu", 3)
    as_half = [(n, t.half()) for n, t in state]  # same names and shapes, other bytes
    with pytest.raises(WeightTransferError, match="float16 where the layout has embed .* float32"):
        pack_bucket(specs[0], iter(as_half), "cpu", 3)


def test_bucket_checksum_sees_a_changed_or_moved_word():
    buf = torch.arange(64, dtype=torch.int64).view(torch.uint8).clone()
    base = bucket_checksum(buf)
    changed = buf.clone()
    changed[9] ^= 1
    assert bucket_checksum(changed) != base
    swapped = buf.view(torch.int64).clone()
    swapped[[3, 4]] = swapped[[4, 3]]
    assert bucket_checksum(swapped.view(torch.uint8)) != base
    assert bucket_checksum(buf.clone()) == base


def test_auto_picks_nccl_only_for_split_gpu_runs_and_nccl_is_refused_elsewhere():
    assert nccl_enabled("auto", 1, 1, 1, "split")
    assert not nccl_enabled("auto", 0, 1, 1, "split")
    assert not nccl_enabled("auto", 0.5, 1, 1, "split")  # two ranks on one GPU cannot share a communicator
    assert not nccl_enabled("auto", 1, 1, 2, "split")  # TP > 1: the engine's workers are other processes
    assert not nccl_enabled("auto", 1, 1, 1, "colocated")
    assert not nccl_enabled("object_store", 1, 1, 1, "split")
    with pytest.raises(ConfigError, match=r"sync.transport=nccl needs whole GPUs"):
        validate(tiny_config("sync.transport=nccl"))
