"""Offline DPO, reward-model bt / haf and the gating stage write run checkpoints and resume from them: the data
position of a pass over pairs resumes at the next chunk; nested optimizer state survives safetensors + JSON; a
gating run killed after a checkpoint and resumed ends with exactly the parameters of an uninterrupted run."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from troupe.actors.reward import armo
from troupe.cluster.config.compose import compose
from troupe.cluster.durability.checkpoint import CheckpointError, find_checkpoint, verify
from troupe.cluster.durability.fingerprint import ResumeRefused, admit, fingerprint, resume_point
from troupe.cluster.durability.tensor_state import join, split
from troupe.cluster.jobs.gating_checkpoints import GatingCheckpoints
from troupe.cluster.jobs.pair_checkpoints import LEARNER_DS, PairCheckpoints, restore
from troupe.cluster.jobs.pair_passes import PairPasses


def _chunks(passes):
    return [(epoch, step, chunk) for epoch, step, chunk in passes]


@pytest.mark.parametrize("stop_after", [0, 2, 3, 6])  # inside a pass, at a pass's end, the last step
def test_pair_passes_resume_at_the_next_chunk(stop_after):
    whole = _chunks(PairPasses(10, 2, 4, 3, seed=7))
    assert len(whole) == PairPasses(10, 2, 4, 3, seed=7).total == 6
    assert all(len(chunk) % 3 == 0 for _, _, chunk in whole)  # padded to the world size
    first = PairPasses(10, 2, 4, 3, seed=7)
    taken = []
    for item in first:
        taken.append(item)
        if item[1] == min(stop_after, 5):
            break
    state = json.loads(json.dumps(first.state_dict()))  # as state.json holds it
    resumed = PairPasses(10, 2, 4, 3, seed=7)
    resumed.load_state_dict(state)
    assert taken + _chunks(resumed) == whole


def test_pair_passes_keep_the_order_the_jobs_had():
    """The same chunks as the loop the jobs ran before checkpoints (shuffle the pairs, then pad with rng.choice)."""
    import random

    from troupe.cluster.run.learn import pad_to_multiple

    pairs = [f"pair{i}" for i in range(9)]
    rng, before = random.Random(3), []
    for _ in range(2):
        order = pairs[:]
        rng.shuffle(order)
        before += [pad_to_multiple(order[lo : lo + 4], 2, rng) for lo in range(0, 9, 4)]
    assert [[pairs[i] for i in chunk] for _, _, chunk in PairPasses(9, 2, 4, 2, seed=3)] == before


def test_pair_passes_refuse_a_position_for_other_data():
    state = PairPasses(10, 2, 4, 2, seed=0).state_dict()
    with pytest.raises(ValueError, match="items=10, this run has 11"):
        PairPasses(11, 2, 4, 2, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="per_call=4, this run has 8"):
        PairPasses(10, 2, 8, 2, seed=0).load_state_dict(state)


def test_optimizer_state_survives_safetensors_and_json(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    skeleton, tensors = split({"optimizer": opt.state_dict(), "rng": torch.get_rng_state()}, "t")
    save_file(tensors, str(tmp_path / "t.safetensors"))
    back = join(json.loads(json.dumps(skeleton)), load_file(str(tmp_path / "t.safetensors")))
    saved = opt.state_dict()
    assert back["optimizer"]["param_groups"] == saved["param_groups"]  # int param ids, tuple betas
    assert back["optimizer"]["state"].keys() == saved["state"].keys() == {0, 1}
    for k, v in saved["state"][0].items():
        assert torch.equal(back["optimizer"]["state"][0][k], v)
    assert torch.equal(back["rng"], torch.get_rng_state())
    with pytest.raises(KeyError, match="'t.rng' is missing"):
        join(skeleton, {k: v for k, v in tensors.items() if k != "t.rng"})
    with pytest.raises(TypeError, match="t.x: a set cannot be saved"):
        split({"x": {1}}, "t")


class Killed(Exception):
    pass


def _gating(checkpoints=None):
    g = torch.Generator().manual_seed(0)
    prompt, chosen, rejected = (torch.randn(40, 6, generator=g) for _ in range(3))
    w, transform = torch.randn(3, 6, generator=g), torch.eye(3)
    gate, losses = armo.train_gating(prompt, chosen, rejected, w, transform, steps=12, lr=1e-2, batch_size=8,
                                     hidden=8, n_hidden=1, temperature=2.0, dropout=0.3, seed=5,
                                     checkpoints=checkpoints)  # fmt: skip
    return gate.state_dict(), losses


def test_gating_killed_and_resumed_ends_like_an_uninterrupted_run(tmp_path, monkeypatch):
    expected, expected_losses = _gating()
    out = tmp_path / "run"
    saved_at = []
    real_save = GatingCheckpoints.save

    def save_then_die(self, step, *rest):  # killed two steps after the checkpoint of step 5
        saved_at.append(step)
        return real_save(self, step, *rest)

    def due_or_die(self, step):
        if step == 7:
            raise Killed
        return self.every > 0 and (step + 1) % self.every == 0

    monkeypatch.setattr(GatingCheckpoints, "save", save_then_die)
    monkeypatch.setattr(GatingCheckpoints, "due", due_or_die)
    with pytest.raises(Killed):
        _gating(GatingCheckpoints(out, every=3, keep=2, identity={}))
    assert saved_at == [2, 5]
    monkeypatch.undo()

    folder = find_checkpoint(out, "latest")
    assert folder.name == "iter-000005"
    state = verify(folder)
    assert state["iteration"] == 5 and len(state["losses"]) == 6
    params, losses = _gating(GatingCheckpoints(out, every=3, keep=2, identity={}, resume=(folder, state)))
    assert losses == expected_losses
    assert params.keys() == expected.keys()
    for k in expected:
        assert torch.equal(params[k], expected[k]), k  # exact in float32


def test_a_tampered_gating_checkpoint_is_refused_before_loading(tmp_path):
    out = tmp_path / "run"
    _gating(GatingCheckpoints(out, every=6, keep=2, identity={}))
    folder = find_checkpoint(out, "latest")
    tensors = load_file(str(folder / "train.safetensors"))
    save_file(
        {k: v + 1 if v.is_floating_point() else v for k, v in tensors.items()},
        str(folder / "train.safetensors"),
    )
    with pytest.raises(CheckpointError, match="train.safetensors is corrupt"):
        verify(folder)


class FakeGroup:
    """Stands in for a LearnerGroup's save_state / load_state (each rank writes its DeepSpeed state there)."""

    def __init__(self):
        self.loaded = None

    def save_state(self, folder):
        from pathlib import Path

        Path(folder).mkdir(parents=True)
        (Path(folder) / "rank0.safetensors").write_bytes(b"state")

    def load_state(self, folder):
        self.loaded = folder


def test_pair_checkpoint_holds_the_data_position_and_restores_it(tmp_path):
    cfg = compose(
        [f"run.output_dir={tmp_path}", "run.checkpoint_every=2", "run.keep_checkpoints=1"], adapt=False
    )
    passes = PairPasses(10, 2, 4, 2, seed=1)
    checkpoints = PairCheckpoints(cfg, tmp_path, {"run_id": "r1"})
    whole = _chunks(PairPasses(10, 2, 4, 2, seed=1))
    for _, step, _ in passes:
        if checkpoints.due(step):
            checkpoints.save(FakeGroup(), passes, step, {"first": {"loss": 1.0}})
        if step == 4:
            break
    folder = find_checkpoint(tmp_path, "latest")
    assert folder.name == "iter-000003"  # steps 1 and 3 were due; keep=1
    state = verify(folder)
    assert state["run_id"] == "r1" and state["first"] == {"loss": 1.0} and state["data"]["step"] == 4
    group, resumed = FakeGroup(), PairPasses(10, 2, 4, 2, seed=1)
    restore(group, resumed, folder, state)
    assert group.loaded == str(folder / LEARNER_DS)
    assert _chunks(resumed) == whole[4:]


def _pairs(path, n):
    rows = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_resume_refuses_another_pairs_file(tmp_path):
    data = _pairs(tmp_path / "pairs.jsonl", 4)
    base = ["algo=dpo_offline", f"dataset.path={data}", f"run.output_dir={tmp_path / 'run'}"]
    cfg = compose(base, adapt=False)
    assert fingerprint(cfg)["prompts.pairs_sha256"]
    identity = admit(cfg, tmp_path / "run", None)
    PairCheckpoints(cfg, tmp_path / "run", identity).save(FakeGroup(), PairPasses(4, 1, 2, 1, 0), 0)
    assert resume_point(compose(base + ["resume=latest"], adapt=False), tmp_path / "run")[0] is not None
    _pairs(data, 5)
    with pytest.raises(ResumeRefused, match="prompts.pairs_sha256"):
        resume_point(compose(base + ["resume=latest"], adapt=False), tmp_path / "run")
