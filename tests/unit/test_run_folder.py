"""One owner per run folder (a flock on <folder>/.troupe.lock), fresh runs that refuse an earlier run's files unless
resume= or run.overwrite=true, and multirun jobs that each get a folder of their own."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from troupe.cluster.config.checks import ConfigError, validate
from troupe.cluster.config.compose import compose
from troupe.cluster.config.sweep import job_folder, sweep_jobs
from troupe.cluster.durability.checkpoint import CheckpointError
from troupe.cluster.durability.run_folder import (
    LOCK_FILE,
    FolderInUse,
    RunFolderError,
    claim,
    start_fresh,
)

HOLD = textwrap.dedent(
    """
    import os, sys, time
    from troupe.cluster.durability.run_folder import claim
    held = claim(sys.argv[1])
    print("held", flush=True)
    if sys.argv[2] == "exit":
        os._exit(0)  # no release, no cleanup: the kernel drops the lock with the process
    time.sleep(600)
    """
)


def _holder(folder, how: str) -> subprocess.Popen:
    """A process that claims `folder` and says so; `exit`: it then dies at once, `sleep`: it keeps the lock."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), how],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line == "held\n", proc.stderr.read()
    return proc


def test_a_second_claimer_is_refused_naming_the_holder(tmp_path):
    folder = tmp_path / "run"
    with claim(folder):
        code = f"from troupe.cluster.durability.run_folder import claim; claim({str(folder)!r})"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("troupe.cluster.durability.run_folder.FolderInUse: ")
    assert str(folder) in message
    assert f"host {socket.gethostname()}, pid {os.getpid()}" in message
    assert "command: " in message and "started 20" in message


def test_a_claim_held_by_another_process_is_refused_here_and_freed_when_it_ends(tmp_path):
    folder = tmp_path / "run"
    holder = _holder(folder, "sleep")
    try:
        with pytest.raises(
            FolderInUse, match=rf"in use by another troupe process \(host .*, pid {holder.pid},"
        ):
            claim(folder)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert (folder / LOCK_FILE).exists()  # the killed holder's lock file stays, and blocks nobody
    with claim(folder) as held:
        assert held.folder == folder.resolve()


def test_a_holder_that_exits_without_releasing_leaves_no_lock(tmp_path):
    folder = tmp_path / "run"
    holder = _holder(folder, "exit")
    assert holder.wait(timeout=60) == 0
    with claim(folder):
        pass
    with claim(folder):  # released by the `with` above
        pass


def test_a_second_claim_in_the_same_process_is_refused_too(tmp_path):
    with claim(tmp_path), pytest.raises(FolderInUse, match=f"this process, .*pid {os.getpid()}"):
        claim(tmp_path)


def _used_folder(folder):
    """An earlier run's files next to the user's own and the reward-model stages' shared ones."""
    (folder / "checkpoints" / "iter-000002").mkdir(parents=True)
    (folder / "checkpoints" / "iter-000004.tmp").mkdir()
    (folder / "tensorboard").mkdir()
    (folder / "logs").mkdir()
    (folder / "logs" / "driver.log").write_text("old run\n")
    (folder / "metrics.jsonl").write_text('{"iteration": 0}\n')
    (folder / "summary.json").write_text("{}")
    for mine in ("notes.txt", "metrics.csv", "best_of_n.jsonl"):
        (folder / mine).write_text("keep")
    for shared in ("rm-armo", "feature-cache"):
        (folder / shared).mkdir()


def test_a_fresh_run_into_a_used_folder_is_refused_naming_its_files(tmp_path):
    _used_folder(tmp_path)
    with pytest.raises(RunFolderError) as refused:
        start_fresh(tmp_path, overwrite=False)
    message = str(refused.value)
    assert (
        f"run folder {tmp_path} holds an earlier run (checkpoints, metrics.jsonl, summary.json, tensorboard)"
        in message
    )
    assert "resume=latest" in message and "run.overwrite=true" in message
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "checkpoints" / "iter-000002").is_dir()


def test_overwrite_deletes_the_run_files_and_nothing_else(tmp_path):
    _used_folder(tmp_path)
    deleted = start_fresh(tmp_path, overwrite=True)
    names = ["checkpoints", "metrics.jsonl", "summary.json", "tensorboard", "logs"]
    assert deleted == [tmp_path / n for n in names]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best_of_n.jsonl",
        "feature-cache",
        "metrics.csv",
        "notes.txt",
        "rm-armo",
    ]
    assert start_fresh(tmp_path, overwrite=False) == []  # now fresh


def test_a_folder_with_only_logs_or_user_files_is_fresh(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "notes.txt").write_text("keep")
    assert start_fresh(tmp_path, overwrite=True) == []
    assert (tmp_path / "logs").is_dir() and (tmp_path / "notes.txt").exists()


# The driver: the folder is held and checked before Ray or any actor starts. A model folder with a config.json is
# all `resolve_model` needs; nothing here gets as far as loading it.
def _cfg(tmp_path, *overrides):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    out = tmp_path / "run"
    return compose([f"model.policy={model}", f"run.output_dir={out}", "run.progress_bar=false", *overrides])


def test_the_driver_refuses_a_used_folder_before_ray_starts(tmp_path, ray_must_not_start):
    from troupe.cluster.run.driver import run

    cfg = _cfg(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"iteration": 0}\n')
    with pytest.raises(RunFolderError, match=r"holds an earlier run \(metrics\.jsonl\)"):
        run(cfg)
    with claim(out):  # the refused run gave its claim back
        pass


def test_the_driver_resumes_into_a_used_folder_keeping_its_files(tmp_path, ray_must_not_start):
    from troupe.cluster.run.driver import run

    cfg = _cfg(tmp_path, "resume=latest")
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"iteration": 0}\n')
    # past the fresh-run check, on to the checkpoint, which this folder lacks
    with pytest.raises(CheckpointError, match="resume=latest: no complete checkpoint"):
        run(cfg)
    assert (out / "metrics.jsonl").read_text() == '{"iteration": 0}\n'


def test_the_driver_refuses_a_folder_another_process_holds(tmp_path, ray_must_not_start):
    from troupe.cluster.run.driver import run

    cfg = _cfg(tmp_path)
    holder = _holder(tmp_path / "run", "sleep")
    try:
        with pytest.raises(FolderInUse, match=f"pid {holder.pid}"):
            run(cfg)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)


def test_resume_and_overwrite_together_are_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="resume=latest and run.overwrite=true contradict"):
        validate(_cfg(tmp_path, "resume=latest", "run.overwrite=true"))


def test_each_multirun_job_gets_its_own_folder():
    jobs = sweep_jobs(["algo=grpo,rloo", "run.seed=range(0,2)", "run.iterations=2", "+data.meta_keys=[a,b]"])
    assert jobs == [
        (["algo=grpo", "run.seed=0", "run.iterations=2", "+data.meta_keys=[a,b]"], "0_algo=grpo,run.seed=0"),
        (["algo=grpo", "run.seed=1", "run.iterations=2", "+data.meta_keys=[a,b]"], "1_algo=grpo,run.seed=1"),
        (["algo=rloo", "run.seed=0", "run.iterations=2", "+data.meta_keys=[a,b]"], "2_algo=rloo,run.seed=0"),
        (["algo=rloo", "run.seed=1", "run.iterations=2", "+data.meta_keys=[a,b]"], "3_algo=rloo,run.seed=1"),
    ]
    assert sweep_jobs(["run.iterations=2"]) == [(["run.iterations=2"], "0")]


def test_multirun_folder_names_are_safe_and_distinct():
    assert (
        job_folder(3, [("data.train", "/data/a b.jsonl"), ("x", "${y}")])
        == "3_data.train=_data_a_b.jsonl,x=__y_"
    )
    long = [("data.train", "p" * 300)]
    assert len(job_folder(10, long)) == len("10_") + 200
    assert job_folder(0, long) != job_folder(1, long)


def test_multirun_rejects_what_it_cannot_list():
    with pytest.raises(ConfigError, match=r"run.seed=interval\(0,1\): -m sweeps a list of values"):
        sweep_jobs(["run.seed=interval(0,1)"])
    with pytest.raises(ConfigError, match="data.train=glob"):
        sweep_jobs(["data.train=glob(*)"])


def test_a_multirun_subfolder_moves_everything_under_the_run_folder():
    cfg = compose(["run.name=sweep", "run.seed=1"], run_subfolder="1_run.seed=1")
    assert cfg.run.output_dir == "outputs/sweep/1_run.seed=1"
    assert cfg.rm.output == "outputs/sweep/1_run.seed=1/rm-armo"  # derived from run.output_dir, it follows
    assert cfg.best_of_n.out == "outputs/sweep/1_run.seed=1/best_of_n.jsonl"


def test_troupe_m_composes_one_config_per_job_in_its_own_folder(capsys):
    from troupe.cluster.cli import main

    assert main(["train", "-m", "run.seed=0,1", "run.name=sweep", "--print-config"]) == 0
    documents = capsys.readouterr().out.split("---\n")
    assert len(documents) == 2
    assert "output_dir: outputs/sweep/0_run.seed=0\n" in documents[0]
    assert "output_dir: outputs/sweep/1_run.seed=1\n" in documents[1]


def test_a_sweep_without_m_names_the_flag(capsys):
    from troupe.cluster.cli import main

    assert main(["train", "run.name=x", "run.seed=0,1", "--print-config"]) == 2
    assert "run.seed=0,1 lists several values: add -m" in capsys.readouterr().err


def test_reward_model_stages_share_a_folder_but_bt_and_haf_start_fresh(tmp_path):
    from troupe.cluster.run.driver import run

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"iteration": 0}\n')
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    common = [f"run.output_dir={out}", f"dataset.path={pairs}", "rm.backbone=builtin:tiny-llama"]
    haf = compose([*common, "rm.stage=haf"], adapt=False)
    haf.job = "rm_train"
    with pytest.raises(RunFolderError, match=r"holds an earlier run \(metrics\.jsonl\)"):
        run(haf)
    evaluation = compose([*common, f"rm.bundle={tmp_path / 'no-bundle'}"], adapt=False)
    evaluation.job = "rm_eval"
    with pytest.raises(
        FileNotFoundError, match="no-bundle is not a reward bundle"
    ):  # past the folder's checks
        run(evaluation)
