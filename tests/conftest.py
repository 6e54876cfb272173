"""Shared test settings: offline hub, vLLM in-process on CPU, and the data folder beside the checkout."""

import os
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Checkpoints are signed (cluster/durability/signing.py): a fixed key for the suite, so no test writes the real
# ~/.config/troupe/checkpoint.key; the troupe processes and Ray workers the tests start inherit it.
os.environ.setdefault("TROUPE_CHECKPOINT_KEY", "troupe-test-suite-checkpoint-key")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@contextmanager
def sigterm_must_be_taken():
    """While a test sends SIGTERM to its own process: a handler that fails the test if the signal reaches it (the
    job under test did not take it), and a check that the job put it back."""

    def not_taken(signum, frame):
        raise AssertionError("the SIGTERM reached the test's handler: the job did not take it")

    previous = signal.signal(signal.SIGTERM, not_taken)
    try:
        yield
        assert signal.getsignal(signal.SIGTERM) is not_taken, "the job did not put the handler back"
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def ray_must_not_start(monkeypatch):
    """The call under test must stop before Ray starts. Asserting `not ray.is_initialized()` afterwards cannot tell:
    the integration tests' session Ray may be up (and a run joins a Ray that is up instead of starting one)."""
    from troupe.cluster.run import runtime

    def refused(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(runtime, "start_ray", refused)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where CUDA is (`pytest -m gpu` on a GPU machine); elsewhere they are skipped, saying why."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: run `pytest -m gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
