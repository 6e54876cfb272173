"""Bucketed weight transfer: packing is lossless for every dtype and bucket size, and a bucket that differs from
its manifest is refused before anything is unpacked."""

import numpy as np
import pytest
import torch

from troupe.actors import weight_buckets as wb


def _state(dtype):
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(50, 16, generator=g).to(dtype),
        "layer.0.q.weight": torch.randn(16, 16, generator=g).to(dtype).t(),  # not contiguous
        "layer.0.norm.weight": torch.randn(16, generator=g).to(dtype),
        "empty": torch.zeros(0, dtype=dtype),
        "scalar": torch.tensor(3.5).to(dtype),
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("bucket_bytes", [64, 1000, 1 << 20])
def test_pack_unpack_is_bitwise_for_every_dtype_and_bucket_size(dtype, bucket_bytes):
    state = _state(dtype)
    specs, buffers = wb.pack(state.items(), bucket_bytes)
    manifest = wb.WeightManifest(3, tuple(specs))
    wb.verify(manifest, buffers)
    out = dict(wb.unpack(manifest, buffers))
    assert list(out) == list(state)
    for name, t in state.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert torch.equal(out[name].view(-1).view(torch.uint8), t.contiguous().view(-1).view(torch.uint8))
    if bucket_bytes == 64:  # every tensor larger than a bucket gets its own
        assert len(specs) >= 3
    if bucket_bytes == 1 << 20:
        assert len(specs) == 1
    for spec in specs:
        assert spec.nbytes <= max(bucket_bytes, max(s.nbytes for s in spec.slots))


def test_buckets_are_views_until_put_copies_them():
    """The only copy is `put`'s: without one, the arrays share memory with the tensors."""
    state = {"w": torch.randn(8, 8)}
    _, handles = wb.pack(state.items(), 1 << 20)
    assert np.shares_memory(handles[0][0], state["w"].numpy())
    puts = []
    wb.pack(state.items(), 1 << 20, put=lambda arrays: puts.append([a.copy() for a in arrays]) or len(puts))
    assert len(puts) == 1 and not np.shares_memory(puts[0][0], state["w"].numpy())


def test_a_changed_byte_is_refused_naming_the_bucket():
    specs, buffers = wb.pack(_state(torch.bfloat16).items(), 1000)
    manifest = wb.WeightManifest(1, tuple(specs))
    bad = [[a.copy() for a in b] for b in buffers]
    assert len(bad) >= 2
    bad[1][0][1] ^= 1
    with pytest.raises(wb.WeightTransferError, match="bucket 1 checksum"):
        wb.verify(manifest, bad)
    with pytest.raises(wb.WeightTransferError, match=f"{len(buffers) - 1} buckets received"):
        wb.verify(manifest, buffers[:-1])
    with pytest.raises(wb.WeightTransferError, match="bucket 0 holds"):
        wb.verify(manifest, [[a[:-1] for a in buffers[0]]] + buffers[1:])


def test_the_manifest_checksum_names_version_and_content():
    specs, _ = wb.pack(_state(torch.float32).items(), 1000)
    a, b = wb.WeightManifest(1, tuple(specs)), wb.WeightManifest(2, tuple(specs))
    assert a.checksum != b.checksum
    specs2, _ = wb.pack({**_state(torch.float32), "scalar": torch.tensor(4.0)}.items(), 1000)
    assert wb.WeightManifest(1, tuple(specs2)).checksum != a.checksum
    assert a.nbytes == sum(s.nbytes for s in specs) and isinstance(a.nbytes, int)


def test_unpacked_views_of_read_only_buffers_load_into_a_model():
    """Object-store buffers are read-only: the views must still copy into parameters."""
    state = _state(torch.float32)
    specs, buffers = wb.pack(state.items(), 1000)
    frozen = [
        [np.frombuffer(a.tobytes(), dtype=np.uint8) for a in b] for b in buffers
    ]  # read-only, like plasma's
    assert not frozen[0][0].flags.writeable
    target = torch.zeros(50, 16)
    got = dict(wb.unpack(wb.WeightManifest(0, tuple(specs)), frozen))
    target.copy_(got["embed.weight"])
    assert torch.equal(target, state["embed.weight"])
