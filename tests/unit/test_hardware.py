"""`dtype: auto` by device: bf16 only where the hardware computes it natively (the GPU side is simulated: the CUDA
queries are replaced, as this machine has no GPU)."""

import pytest
import torch

from troupe.actors import hardware


@pytest.fixture
def gpus(monkeypatch):
    """Pretend to have CUDA devices of the given compute capabilities."""

    def install(*capabilities):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capabilities[i])
        monkeypatch.setattr(torch.version, "hip", None)

    return install


@pytest.mark.parametrize(
    "capabilities, expected",
    [
        ([(9, 0)], "bfloat16"),  # H100
        ([(8, 0), (8, 6)], "bfloat16"),  # A100 + A10
        ([(7, 0)], "float32"),  # V100: bf16 only emulated
        ([(7, 5)], "float32"),  # T4
        ([(8, 0), (7, 5)], "float32"),  # one slow device decides for the rank's process
    ],
)
def test_auto_dtype_on_gpus_follows_compute_capability(gpus, capabilities, expected):
    gpus(*capabilities)
    assert hardware.resolve_dtype("auto") == expected
    assert hardware.resolve_dtype("float32") == "float32" and hardware.resolve_dtype("bfloat16") == "bfloat16"


def test_auto_dtype_on_cpu_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda native=native: native)
        assert hardware.resolve_dtype("auto") == expected
