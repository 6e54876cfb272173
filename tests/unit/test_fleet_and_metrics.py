"""Work split across fleet members keeps order and balances sizes."""

from troupe.cluster.fleet.pool import split_evenly


def test_split_evenly_preserves_order_and_balances():
    parts = split_evenly(list(range(10)), 3)
    assert parts == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert split_evenly([1], 3) == [[1], [], []]


def test_metrics_jsonl_and_table_show_unmeasured_values_as_missing(tmp_path):
    import json

    from troupe.cluster.observe.metrics import TABLE_COLUMNS, MetricsWriter, table_header, table_row

    w = MetricsWriter(tmp_path / "m.jsonl")
    w.write({"iteration": 0, "train/kl": float("nan"), "reward/mean": 0.5})
    w.close()
    line = json.loads((tmp_path / "m.jsonl").read_text())
    assert line["train/kl"] is None and line["reward/mean"] == 0.5
    row = table_row({"iteration": 0, "train/kl": float("nan"), "reward/mean": 0.5})
    assert len(row.split()) == len(TABLE_COLUMNS)
    assert len(row) == len(table_header())  # columns line up under the header
    assert "0.500" in row


def test_rank_metrics_merge_as_means_but_time_and_memory_of_the_worst_rank():
    from troupe.actors.learner.rank import memory_gib
    from troupe.cluster.fleet.learners import _merge

    ranks = [
        {"loss": 1.0, "optimizer_steps": 4, "train_s": 2.0, "rss_gib": 3.0, "peak_rss_gib": 5.0},
        {"loss": 3.0, "optimizer_steps": 4, "train_s": 5.0, "rss_gib": 4.0, "peak_rss_gib": 4.5},
    ]
    assert _merge(ranks) == {
        "loss": 2.0,
        "optimizer_steps": 4,
        "train_s": 5.0,
        "rss_gib": 4.0,
        "peak_rss_gib": 5.0,
    }
    before = memory_gib()["rss_gib"]
    held = bytearray(256 << 20)  # zero-filled: every page touched
    memory = memory_gib()
    assert memory["rss_gib"] - before > 0.2
    assert memory["rss_gib"] <= memory["peak_rss_gib"] + 0.05  # the kernel's high-water mark
    del held


RELEASE_CHILD = """
import torch
from troupe.actors.learner.rank import memory_gib, release_free_heap
held = [torch.ones(n) for n in range(1 << 20, 1 << 26, 1 << 22)]  # about 2 GiB in blocks of 4-244 MiB
keep = torch.ones(10)  # allocated last: the top of the heap stays in use, so the default trim cannot help
del held
freed = memory_gib()["rss_gib"]
release_free_heap()
print(freed, memory_gib()["rss_gib"])
"""


def test_a_heap_only_learner_returns_its_free_memory_after_a_step():
    import os
    import subprocess
    import sys

    from troupe.cluster.run.runtime import CPU_MALLOC

    env = {**os.environ, **CPU_MALLOC}  # a CPU learner's allocator: no mmap, trimming only past 16 GiB
    out = subprocess.run(
        [sys.executable, "-c", RELEASE_CHILD], env=env, capture_output=True, text=True, check=True
    )
    freed, released = map(float, out.stdout.split())
    assert freed - released > 0.3, (freed, released)  # the freed tensors' pages went back to the system
