"""Shared test settings: offline hub, vLLM in-process on CPU, and the data folder beside the checkout."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Checkpoints are signed (cluster/durability/signing.py): a fixed key for the suite, so no test writes the real
# ~/.config/troupe/checkpoint.key; the troupe processes and Ray workers the tests start inherit it.
os.environ.setdefault("TROUPE_CHECKPOINT_KEY", "troupe-test-suite-checkpoint-key")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
