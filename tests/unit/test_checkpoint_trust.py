"""Checkpoints that load no foreign code, and folders swapped in whole: a manifest signed with this machine's key
(cluster/durability/signing.py) is checked before anything else, a forged, extended or tampered checkpoint is
refused, `troupe checkpoint trust` signs one deliberately, and checkpoints, checkpoint-final and reward bundles
keep one complete copy at every interruption (cluster/durability/atomic.py)."""

import hashlib
import json
import os
import pickle
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.unit.test_durable import _parts  # the same checkpoint parts
from troupe.actors.reward.bundle import BundleInfo, load_bundle, read_info
from troupe.cluster.cli import main
from troupe.cluster.durability.atomic import swap_in, tmp_for
from troupe.cluster.durability.checkpoint import (
    CheckpointError,
    complete,
    find_checkpoint,
    save_hf_checkpoint,
    verify,
    write_checkpoint,
)
from troupe.cluster.durability.signing import ENV, CheckpointKeyError, key_path, load_key
from troupe.cluster.durability.trust_command import trust
from troupe.cluster.jobs.bundle_output import write_bundle


def _checkpoint(out: Path, iteration: int = 0, **state) -> Path:
    folder, _ = write_checkpoint(
        out, iteration, _parts(b"xy" * 32), {"iteration": iteration, **state}, keep=3
    )
    return folder


def _killed_when_moving_to(target: Path, real=os.rename):
    """os.rename, except that the rename onto `target` fails as a kill at that moment would leave it."""

    def rename(src, dst):
        if Path(dst) == target:
            raise OSError("killed")
        real(src, dst)

    return rename


class _RunsCode:
    """Unpickling this touches `marker`: what a malicious DeepSpeed .pt file could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_forged_manifest_with_a_rewritten_state_is_refused(tmp_path):
    folder = _checkpoint(tmp_path)
    (folder / "state.json").write_text(json.dumps({"iteration": 0, "weight_version": 99}))
    (folder / "manifest.json").write_text(json.dumps({"files": {}}))
    with pytest.raises(
        CheckpointError,
        match=r"was not written with this machine's checkpoint key \(TROUPE_CHECKPOINT_KEY\): .*manifest\.json "
        r"has no hmac .*none of its files are trusted.*`troupe checkpoint trust ",
    ):
        verify(folder)
    with pytest.raises(CheckpointError, match=r"holds .*policy/model\.safetensors, which its manifest"):
        trust(folder)  # trusting it is refused too: the manifest does not list the files on disk
    # a rewritten state.json with its checksum recomputed in the manifest: the hmac no longer matches
    other = _checkpoint(tmp_path / "b")
    forged = json.dumps({"iteration": 0, "weight_version": 99}).encode()
    (other / "state.json").write_bytes(forged)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["files"]["state.json"] = {"sha256": hashlib.sha256(forged).hexdigest(), "bytes": len(forged)}
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="has an hmac this key did not make"):
        verify(other)


def test_an_extra_unlisted_pt_file_is_refused_before_anything_is_loaded(tmp_path):
    folder = _checkpoint(tmp_path)
    marker = tmp_path / "code-ran"
    extra = folder / "policy-ds" / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    extra.parent.mkdir()
    extra.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(
        CheckpointError, match=r"holds .*ds/zero_pp_rank_0_mp_rank_00_optim_states\.pt, which"
    ):
        verify(folder)
    with pytest.raises(CheckpointError, match=r"optim_states\.pt, which its manifest .* does not list"):
        trust(folder)
    assert not marker.exists()
    extra.unlink()
    assert verify(folder)["iteration"] == 0  # the listed files are whole


def test_a_tampered_file_is_refused_naming_it(tmp_path):
    folder = _checkpoint(tmp_path)
    state = folder / "policy-ds" / "rank0.safetensors"
    state.write_bytes(b"z" + state.read_bytes()[1:])
    with pytest.raises(CheckpointError, match=r"policy-ds/rank0\.safetensors is corrupt"):
        verify(folder)
    with pytest.raises(CheckpointError, match=r"rank0\.safetensors is corrupt"):
        trust(folder)


def test_another_key_is_refused_until_the_checkpoint_is_trusted(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV, "b1" * 32)
    folder = _checkpoint(tmp_path, v="elsewhere")
    monkeypatch.setenv(ENV, "another machine's key")
    with pytest.raises(CheckpointError, match="has an hmac this key did not make"):
        verify(folder)
    assert main(["checkpoint", "trust", str(folder)]) == 0
    printed = capsys.readouterr().out
    assert "3 files" in printed and "signed it with this machine's key (TROUPE_CHECKPOINT_KEY)" in printed
    assert verify(folder)["v"] == "elsewhere"
    assert "already signed" in trust(folder)
    monkeypatch.setenv(ENV, "b1" * 32)
    with pytest.raises(CheckpointError, match="has an hmac this key did not make"):
        verify(folder)  # now signed by the new key only
    assert main(["checkpoint", "trust"]) == 2 and "usage: troupe checkpoint trust" in capsys.readouterr().err
    assert main(["checkpoint", "trust", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_key_file_is_made_private_on_first_use_and_refused_when_others_can_read_it(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert key_path() == tmp_path / "home" / ".config" / "troupe" / "checkpoint.key"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    path = tmp_path / "config" / "troupe" / "checkpoint.key"
    key = load_key()
    assert path.stat().st_mode & 0o777 == 0o600 and key.source == f"key file {path}"
    assert len(key.secret) == 32 and load_key().secret == key.secret and key.secret.hex() not in repr(key)
    folder = _checkpoint(tmp_path)
    assert verify(folder)["iteration"] == 0
    path.chmod(0o640)
    refused = rf"{re.escape(str(path))} has mode 640: group or others .*chmod 600 {re.escape(str(path))}"
    with pytest.raises(CheckpointKeyError, match=refused):
        verify(folder)
    path.chmod(0o600)
    monkeypatch.setenv(ENV, "short")
    with pytest.raises(CheckpointKeyError, match=r"TROUPE_CHECKPOINT_KEY\) has 5 bytes"):
        load_key()


@pytest.mark.parametrize("crash_at", [1, 2])  # swap_in's renames: <name> -> <name>.old, tmp -> <name>
def test_a_rewritten_checkpoint_keeps_a_complete_copy_at_every_interruption(tmp_path, monkeypatch, crash_at):
    _checkpoint(tmp_path, 1, v="old")
    renames, real = [], os.rename

    def interrupted(src, dst):
        renames.append(dst)
        if len(renames) == crash_at:
            raise OSError("killed")
        real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "rename", interrupted)
        with pytest.raises(OSError, match="killed"):
            _checkpoint(tmp_path, 1, v="new")
    root = tmp_path / "checkpoints"
    assert (root / "iter-000001.old").exists() == (crash_at == 2)  # only the old copy has a final name
    assert verify(find_checkpoint(tmp_path, "latest"))["v"] == "old"  # a lone .old is renamed back first
    assert [p.name for p in complete(root)] == ["iter-000001"] and not (root / "iter-000001.old").exists()
    folder = _checkpoint(tmp_path, 1, v="new")  # the next save goes through, leaving no .old or tmp behind
    assert verify(folder)["v"] == "new"
    assert sorted(p.name for p in root.iterdir()) == ["iter-000001"]


def test_a_lone_old_folder_is_restored_and_a_stale_one_is_dropped(tmp_path):
    def folder(name: str, payload: bytes) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(payload)
        return tmp_path / name

    target, old = tmp_path / "checkpoint-final", tmp_path / "checkpoint-final.old"
    folder("checkpoint-final.old", b"v1")  # killed between the renames: the only complete copy
    swap_in(folder("v2", b"v2"), target)  # renames v1 back first, then replaces it whole
    assert (target / "model.safetensors").read_bytes() == b"v2" and not old.exists()
    folder("checkpoint-final.old", b"v1")  # killed after the renames: `target` is complete, .old is stale
    swap_in(folder("v3", b"v3"), target)
    assert (target / "model.safetensors").read_bytes() == b"v3" and not old.exists()
    checkpoint = _checkpoint(tmp_path / "run", 2)
    checkpoint.with_name("iter-000002.old").mkdir()  # a stale copy beside a complete checkpoint is ignored
    assert [p.name for p in complete(checkpoint.parent)] == ["iter-000002"] and verify(checkpoint)[
        "iteration"
    ] == 2


class _Learners:
    """The one method save_hf_checkpoint calls on a LearnerGroup: rank 0 writes the HF folder."""

    def __init__(self, payload: bytes, fail: bool = False) -> None:
        self.payload, self.fail = payload, fail

    def save_hf(self, folder: str, tokenizer_path: str) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(self.payload)
        if self.fail:
            raise RuntimeError("rank 0 died while saving")


def test_checkpoint_final_is_replaced_only_by_a_whole_one(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint-final"
    save_hf_checkpoint(_Learners(b"v1"), target, "tok", {"iteration": 1})
    with pytest.raises(RuntimeError, match="rank 0 died"):
        save_hf_checkpoint(_Learners(b"v2", fail=True), target, "tok", {"iteration": 2})
    assert (target / "model.safetensors").read_bytes() == b"v1"
    with monkeypatch.context() as m:
        m.setattr(os, "rename", _killed_when_moving_to(target))
        with pytest.raises(OSError, match="killed"):
            save_hf_checkpoint(_Learners(b"v3"), target, "tok", {"iteration": 3})
    assert (
        not target.exists()
        and (tmp_path / "checkpoint-final.old" / "model.safetensors").read_bytes() == b"v1"
    )
    save_hf_checkpoint(_Learners(b"v4"), target, "tok", {"iteration": 4})  # restores v1, then swaps v4 in
    assert (target / "model.safetensors").read_bytes() == b"v4"
    assert json.loads((target / "troupe_state.json").read_text())["iteration"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-final"]


def test_a_reward_bundle_is_swapped_in_whole_and_never_replaces_another_folder(tmp_path, monkeypatch):
    out = tmp_path / "rm-armo"
    info = BundleInfo("armo", "backbone", 64, ["a", "b"])
    write_bundle(out, info, {"regression": torch.ones(2, 4), "transform": torch.eye(2)})
    with monkeypatch.context() as m:
        m.setattr(os, "rename", _killed_when_moving_to(out))
        with pytest.raises(OSError, match="killed"):
            write_bundle(out, info, {"regression": torch.zeros(2, 4), "transform": torch.eye(2)})
    with pytest.raises(FileNotFoundError, match=r"rm-armo\.old holds the previous bundle: `mv "):
        read_info(out)
    write_bundle(out, info, {"regression": 2 * torch.ones(2, 4), "transform": torch.eye(2)})
    assert torch.equal(load_bundle(out)[1]["regression"], 2 * torch.ones(2, 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm-armo"]
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep me")
    with pytest.raises(
        FileExistsError, match="is not a reward bundle .* give rm.output a new or empty folder"
    ):
        write_bundle(mine, info, {"regression": torch.ones(2, 4)})
    assert (mine / "todo.txt").read_text() == "keep me"


def test_prune_deletes_own_and_dead_writers_interrupted_writes_only(tmp_path):
    root = tmp_path / "checkpoints"
    other = root / "iter-000003.otherhost-4242.tmp"  # another host's writer, maybe still writing
    host = socket.gethostname()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    running = root / f"iter-000003.{host}-{alive.pid}.tmp"  # a live writer on this host
    killed = root / f"iter-000002.{host}-{dead.pid}.tmp"  # a writer killed mid-write on this host
    mine = tmp_for(root / "iter-000002")  # this process's own write, interrupted earlier
    for partial in (other, running, killed, mine):
        partial.mkdir(parents=True)
        (partial / "state.json").write_text("{}")
    try:
        folder = _checkpoint(tmp_path, 4)
    finally:
        alive.kill()
        alive.wait()
    assert other.is_dir() and running.is_dir()
    assert not mine.exists() and not killed.exists()
    assert [p.name for p in complete(root)] == [folder.name] == [find_checkpoint(tmp_path, "latest").name]
