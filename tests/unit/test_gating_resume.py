"""`troupe rm train rm.stage=gating` with run.checkpoint_every: a run killed after a checkpoint and continued with
resume=latest writes the bundle an uninterrupted run writes (in-process, tiny local backbone, no Ray); a fresh run
does not mix with an earlier run's checkpoints."""

import json
import random

import pytest
import torch

from tests.conftest import sigterm_must_be_taken
from troupe.actors.reward.bundle import load_bundle
from troupe.cluster.cli import main as troupe
from troupe.cluster.jobs.gating_checkpoints import GatingCheckpoints, train_folder

WORDS = ["please", "thanks", "the", "answer", "is", "seven", "maybe", "numbers", "kindly", "sure"]


class Killed(Exception):
    pass


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def stage1(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = random.Random(0)

    def text(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    ratings = []
    for i in range(12):
        t = text(rng.randint(1, 10))
        ratings.append(
            {"prompt": f"Q{i}?", "response": t, "polite": int("please" in t), "verbosity": len(t.split())}
        )
    _write(tmp_path / "ratings.jsonl", ratings)
    _write(tmp_path / "pairs.jsonl", [{"prompt": f"P{i}?", "chosen": "please " + text(2), "rejected": text(8)}
                                      for i in range(12)])  # fmt: skip
    (tmp_path / "scales.yaml").write_text("polite: [0, 1]\nverbosity: [0, 12]\n")
    rc = troupe(["rm", "train", "rm.backbone=builtin:tiny-llama", "rm.ratings_path=ratings.jsonl",
                 "rm.scales_path=scales.yaml", "rm.max_length=64", "run.progress_bar=false"])  # fmt: skip
    assert rc == 0
    return tmp_path


GATING = ["rm", "train", "rm.stage=gating", "rm.stage1=outputs/troupe/rm-armo", "dataset.path=pairs.jsonl",
          "rm.gating_steps=30", "rm.gating_hidden=8", "rm.gating_layers=1", "rm.gating_batch=4",
          "rm.gating_dropout=0.2", "rm.allow_chance=true", "run.progress_bar=false"]  # fmt: skip


def test_gating_killed_and_resumed_writes_the_uninterrupted_bundle(stage1, monkeypatch):
    assert troupe(GATING + ["rm.output=outputs/whole"]) == 0
    _, expected = load_bundle(stage1 / "outputs/whole")

    split = GATING + ["rm.output=outputs/split", "run.checkpoint_every=10"]
    real_due = GatingCheckpoints.due

    def due_or_die(self, step):
        if step == 24:  # killed between the checkpoints of steps 19 and 29
            raise Killed
        return real_due(self, step)

    with monkeypatch.context() as patched, pytest.raises(Killed):
        patched.setattr(GatingCheckpoints, "due", due_or_die)
        troupe(split)
    checkpoints = train_folder(stage1 / "outputs/split") / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["iter-000009", "iter-000019"]
    assert not (stage1 / "outputs/split").exists()  # no bundle from a killed run

    assert troupe(split) == 2  # a fresh run refuses the earlier run's checkpoints
    assert troupe(split + ["resume=latest"]) == 0
    _, tensors = load_bundle(stage1 / "outputs/split")
    assert tensors.keys() == expected.keys()
    for k in expected:
        assert torch.equal(tensors[k], expected[k]), k
    assert troupe(GATING + ["rm.output=outputs/whole", "resume=latest"]) == 2  # it wrote no checkpoints


def test_resume_is_refused_for_stages_without_checkpoints(stage1, capsys):
    rc = troupe(["rm", "train", "rm.stage=probe", "dataset.path=pairs.jsonl", "resume=latest"])
    assert rc == 2 and "rm.stage=probe has no run checkpoints" in capsys.readouterr().err


def test_gating_stopped_by_sigterm_checkpoints_the_step_and_resumes_to_the_same_bundle(stage1, monkeypatch):
    import os
    import signal

    assert troupe(GATING + ["rm.output=outputs/whole"]) == 0
    _, expected = load_bundle(stage1 / "outputs/whole")
    stopped = GATING + ["rm.output=outputs/stopped"]  # run.checkpoint_every=0: only the signal's checkpoint
    real_due = GatingCheckpoints.due

    def signalled_due(self, step):
        if step == 14:  # the signal arrives during step 14
            os.kill(os.getpid(), signal.SIGTERM)
        return real_due(self, step)

    with sigterm_must_be_taken(), monkeypatch.context() as patched:
        patched.setattr(GatingCheckpoints, "due", signalled_due)
        assert troupe(stopped) == 128 + signal.SIGTERM
    checkpoints = train_folder(stage1 / "outputs/stopped") / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["iter-000014"]
    assert troupe(stopped + ["resume=latest"]) == 0
    _, tensors = load_bundle(stage1 / "outputs/stopped")
    for k in expected:
        assert torch.equal(tensors[k], expected[k]), k
