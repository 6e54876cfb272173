"""Run records in the experiment trackers, with the real packages (no Ray, no model): MLflow on a local file store and
W&B in offline mode get the whole config, the scalars per step, and a resumed job (resume=latest into the same run
folder) continues the same tracker run, whose id is kept in <run dir>/trackers.json."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from troupe.cluster.config.compose import compose
from troupe.cluster.observe.trackers import TRACKERS_FILE, ScalarSinks, mlflow_key, mlflow_params
from troupe.cluster.run.job import Job


def _cfg(tmp_path, run: str, *overrides: str):
    return compose(
        [
            "model.policy=builtin:tiny-llama",
            f"run.output_dir={tmp_path}/{run}",
            "run.print_table=false",
            "logging.tensorboard=false",
            *overrides,
        ]
    )


def _ids(cfg) -> dict:
    """The tracker ids stored in the run folder."""
    return json.loads((Path(cfg.run.output_dir) / TRACKERS_FILE).read_text())


# --- MLflow -------------------------------------------------------------------------------------------------------


@pytest.fixture
def mlflow_env(monkeypatch):
    pytest.importorskip("mlflow")
    # The sink sets MLFLOW_ALLOW_FILE_STORE for a file: URI (MLflow 3 refuses the file store without it); setenv then
    # delenv makes monkeypatch restore the variable's absence afterwards.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")


def test_mlflow_params_metrics_and_resume(tmp_path, mlflow_env):
    from mlflow.tracking import MlflowClient

    uri = f"file://{tmp_path}/mlruns"
    tracked = (f"logging.mlflow_tracking_uri={uri}", "learner.lr=3e-06")
    cfg = _cfg(tmp_path, "run", *tracked)
    with Job(cfg) as job:
        job.start("")
        job.record({"iteration": 0, "reward/mean": 0.5, "branch/holistic+aspects": 0.25, "done": True})
        job.record({"iteration": 1, "reward/mean": 0.75, "branch/holistic+aspects": 0.5})
    run_id = _ids(cfg)["mlflow"]["run_id"]

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("troupe")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == run_id
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["learner.lr"] == str(cfg.learner.lr) == "3e-06"
    assert params["model.policy"] == "builtin:tiny-llama"
    assert params["resume"] == "None"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "reward/mean")] == [
        (1, 0.5),
        (2, 0.75),
    ]
    assert [m.step for m in client.get_metric_history(run_id, "branch/holistic_aspects")] == [1, 2]
    assert "done" not in run.data.metrics  # booleans are no scalars

    # resume=latest into the same folder: the same MLflow run continues; the row after the checkpoint is redone.
    resumed = _cfg(tmp_path, "run", *tracked, "resume=latest")
    with Job(resumed) as job:
        job.start("")
        job.rewind(0)
        job.record({"iteration": 1, "reward/mean": 0.7})
        job.record({"iteration": 2, "reward/mean": 0.9})
    assert _ids(resumed)["mlflow"]["run_id"] == run_id
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # one run, not two
    assert runs[0].data.params["resume"] == "None"  # MLflow params cannot change: the first value stays
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "reward/mean")]
    assert sorted(history) == [(1, 0.5), (2, 0.7), (2, 0.75), (3, 0.9)]

    # a fresh run into another folder: another MLflow run
    with Job(_cfg(tmp_path, "other", *tracked)) as job:
        job.start("")
    assert len(client.search_runs([experiment.experiment_id])) == 2


def test_mlflow_params_limits():
    params = mlflow_params(
        {"learner": {"lr": 1e-6, "betas": [0.9, 0.99]}, "long": "x" * 7000, "empty": {}, "n": None}
    )
    assert params == {
        "learner.lr": "1e-06",
        "learner.betas": "[0.9, 0.99]",
        "long": "x" * 6000,
        "empty": "{}",
        "n": "None",
    }
    assert mlflow_key("branch/holistic+aspects") == "branch/holistic_aspects"
    assert mlflow_key("eval/gsm8k/reward/mean") == "eval/gsm8k/reward/mean"


def test_mlflow_many_params_in_batches(tmp_path, mlflow_env):
    """More than MLflow's 100 params per batch."""
    from mlflow.tracking import MlflowClient

    uri = f"file://{tmp_path}/mlruns"
    config = {"group": {f"p{i}": i for i in range(250)}}
    logging = _cfg(tmp_path, "run", f"logging.mlflow_tracking_uri={uri}").logging
    sinks = ScalarSinks(logging, tmp_path, "many", config=config)
    sinks.close()
    params = MlflowClient(tracking_uri=uri).get_run(sinks.mlflow.run_id).data.params
    assert len(params) == 250 and params["group.p249"] == "249"


def test_missing_packages_name_the_extra(tmp_path, monkeypatch):
    logging = _cfg(tmp_path, "run", f"logging.mlflow_tracking_uri=file://{tmp_path}/mlruns").logging
    for name in [n for n in sys.modules if n == "mlflow" or n.startswith("mlflow.")] or ["mlflow"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'troupe-rlhf\[mlflow\]'"):
        ScalarSinks(logging, tmp_path, "x")
    logging = _cfg(tmp_path, "run", "logging.wandb_project=p").logging
    for name in [n for n in sys.modules if n == "wandb" or n.startswith("wandb.")] or ["wandb"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'troupe-rlhf\[wandb\]'"):
        ScalarSinks(logging, tmp_path, "x")


# --- W&B (offline: no network, no login) ---------------------------------------------------------------------------


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    home = tmp_path / "wandb-home"
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)


def _offline_runs(cfg) -> list:
    return sorted((Path(cfg.run.output_dir) / "wandb").glob("offline-run-*"))


def _run_ids(folders: list) -> list[str]:
    """The run id in each offline folder's name: offline-run-<date>_<time>-<id>, plus "-<n>" when wandb started a
    second folder of that run within the same second."""
    return [re.fullmatch(r"offline-run-\d{8}_\d{6}-([^-]+)(?:-\d+)?", f.name)[1] for f in folders]


def test_wandb_gets_the_config_and_resume_continues_the_run(tmp_path, wandb_env):
    import wandb

    tracked = ("logging.wandb_project=troupe-test", "logging.wandb_mode=offline", "learner.lr=3e-06")
    cfg = _cfg(tmp_path, "run", *tracked)
    with Job(cfg) as job:
        job.start("")
        run = job.sinks.wandb
        assert run.config["learner"]["lr"] == 3e-06
        assert run.config["model"]["policy"] == "builtin:tiny-llama"
        assert run.config["logging"]["wandb_mode"] == "offline"
        job.record({"iteration": 0, "reward/mean": 0.5})
        job.record({"iteration": 1, "reward/mean": 0.75})
        run_id = run.id
    assert _ids(cfg)["wandb"] == {"id": run_id, "project": "troupe-test"}
    (first,) = _offline_runs(cfg)
    assert _run_ids([first]) == [run_id]
    # what `wandb sync` sends later: the offline transaction log holds the config (complete once the service stops)
    wandb.teardown()
    assert b"builtin:tiny-llama" in (first / f"run-{run_id}.wandb").read_bytes()

    resumed = _cfg(tmp_path, "run", *tracked, "resume=latest")
    with Job(resumed) as job:
        job.start("")
        assert job.sinks.wandb.id == run_id
        assert job.sinks.wandb.config["resume"] == "latest"
        job.rewind(0)
        job.record({"iteration": 1, "reward/mean": 0.7})
    assert _ids(resumed)["wandb"]["id"] == run_id
    assert _run_ids(_offline_runs(resumed)) == [run_id, run_id]

    other = _cfg(tmp_path, "other", *tracked)
    with Job(other) as job:
        job.start("")
        assert job.sinks.wandb.id != run_id
    assert _ids(other)["wandb"]["id"] != run_id
