"""`troupe algo=dpo_offline` end to end on a small preference file: learner group only, frozen reference."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import sigterm_must_be_taken
from tests.integration.conftest import TINY_OVERRIDES, killed_at_step, tiny_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo_offline")
    rows = [
        {"prompt": f"What is {a} + {b}?", "chosen": f"Answer: {a + b}", "rejected": "I do not like numbers."}
        for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (6, 2), (4, 4), (7, 1), (3, 3)]
    ]
    rows.append({"prompt": "What is 1 + 1?", "chosen": "", "rejected": "no"})  # skipped and counted
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp / "run"
    cmd = [
        str(Path(sys.executable).with_name("troupe")),
        *TINY_OVERRIDES,
        "algo=dpo_offline",
        f"dataset.path={data}",
        "dataset.pairs_per_iteration=8",
        "run.iterations=3",
        "learner.lr=2e-3",
        "learner.lr_schedule=cosine",
        "learner.warmup_steps=1",
        f"run.output_dir={out}",
        "run.progress_bar=false",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_offline_dpo_trains_on_the_file(offline_run):
    out, stdout = offline_run
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [0, 1, 2]  # 8 pairs per call, 3 passes
    assert all(x["train/pairs"] == 8 for x in lines)
    assert lines[-1]["train/margin"] > lines[0]["train/margin"]
    assert lines[-1]["train/loss"] < lines[0]["train/loss"]
    lrs = [x["train/lr"] for x in lines]
    assert lrs[0] != lrs[-1]  # the cosine schedule moved the learning rate
    assert "'empty_response': 1" in stdout
    state = json.loads((out / "checkpoint-final" / "troupe_state.json").read_text())
    assert state["skipped"] == {"empty_response": 1} and state["pairs"] == 8


def test_offline_dpo_checkpoint_loads(offline_run):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(offline_run[0] / "checkpoint-final", dtype=torch.float32)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_offline_dpo_killed_or_stopped_and_resumed_ends_like_an_uninterrupted_run(
    tmp_path, ray_session, monkeypatch
):
    """run.checkpoint_every=2 over 4 learner calls, killed after step 2's row: resume=latest redoes step 2 and
    ends with the weights of the uninterrupted run; metrics.jsonl holds each step once. Without periodic
    checkpoints, a SIGTERM during step 1 finishes the step, writes its checkpoint and stops; resumed, the same."""
    import os
    import signal

    import torch
    from safetensors.torch import load_file

    from troupe.cluster.durability.stop_signal import Stopped
    from troupe.cluster.fleet.learners import LearnerGroup
    from troupe.cluster.run.driver import run

    rows = [
        {"prompt": f"What is {a} + 1?", "chosen": f"Answer: {a + 1}", "rejected": "No."} for a in range(8)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["algo=dpo_offline", f"dataset.path={data}", "dataset.pairs_per_iteration=4", "run.iterations=2",
            "learner.lr=2e-3", "learner.dtype=float32", "run.deterministic=true", "run.progress_bar=false"]  # fmt: skip

    run(tiny_config(*base, f"run.output_dir={tmp_path / 'whole'}"))
    split = [*base, f"run.output_dir={tmp_path / 'split'}", "run.checkpoint_every=2"]
    with killed_at_step(monkeypatch, 2):
        run(tiny_config(*split))
    assert sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir()) == ["iter-000001"]

    result = run(tiny_config(*split, "resume=latest"))
    assert result["redone_steps"] == 1
    metrics = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in metrics] == [0, 1, 2, 3]

    stopped = [*base, f"run.output_dir={tmp_path / 'stopped'}"]  # run.checkpoint_every=0
    train_dpo, calls = LearnerGroup.train_dpo, []

    def train_dpo_signalled(self, pairs):
        calls.append(1)
        if len(calls) == 2:  # step 1: the signal arrives while the learners train
            os.kill(os.getpid(), signal.SIGTERM)
        return train_dpo(self, pairs)

    with sigterm_must_be_taken(), monkeypatch.context() as patched, pytest.raises(Stopped) as stop:
        patched.setattr(LearnerGroup, "train_dpo", train_dpo_signalled)
        run(tiny_config(*stopped))
    assert stop.value.signum == signal.SIGTERM and stop.value.checkpoint.name == "iter-000001"
    result = run(tiny_config(*stopped, "resume=latest"))
    assert result["redone_steps"] == 0
    metrics = [json.loads(x) for x in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in metrics] == [0, 1, 2, 3]

    whole = load_file(str(tmp_path / "whole" / "checkpoint-final" / "model.safetensors"))
    for name in ("split", "stopped"):
        resumed = load_file(str(tmp_path / name / "checkpoint-final" / "model.safetensors"))
        assert whole.keys() == resumed.keys()
        for k in whole:
            torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=1e-6, msg=f"{name}: {k}")
