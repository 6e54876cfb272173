"""Scalar sinks of a run beside metrics.jsonl: TensorBoard event files, and W&B and MLflow when configured. The
trackers' run ids are kept in <run dir>/trackers.json, so a resumed job continues the same W&B and MLflow runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path

from troupe.cluster.config.schema import LoggingConfig

log = logging.getLogger("troupe.trackers")

TRACKERS_FILE = "trackers.json"


def read_tracker_ids(out_dir: Path) -> dict:
    """The trackers' run ids stored in the run folder ({} when none or unreadable)."""
    try:
        ids = json.loads((out_dir / TRACKERS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return ids if isinstance(ids, dict) else {}


def _write_tracker_ids(out_dir: Path, ids: dict) -> None:
    path = out_dir / TRACKERS_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(ids, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _missing(package: str, extra: str, setting: str) -> ImportError:
    return ImportError(
        f"{setting} is set but `{package}` is not installed: pip install 'troupe-rlhf[{extra}]'"
    )


class ScalarSinks:
    """TensorBoard event files (<run dir>/tensorboard), W&B and MLflow: every numeric metric, step = iteration + 1
    (the evaluation before training is step 0). `config`: the run's config as plain data (`config_record`), sent to
    W&B as its config and to MLflow as params. The W&B and MLflow run ids go to <run dir>/trackers.json when the run
    starts; with `resume`, the stored runs are continued (a fresh run gets new ones)."""

    def __init__(
        self,
        cfg: LoggingConfig,
        out_dir: Path,
        run_name: str,
        config: dict | None = None,
        resume: bool = False,
    ) -> None:
        self.tensorboard = self.wandb = self.mlflow = None
        self.tensorboard_dir = str(out_dir / "tensorboard")
        self.tracker_ids_path = out_dir / TRACKERS_FILE
        stored = read_tracker_ids(out_dir) if resume else {}
        ids = dict(stored)  # a resumed job keeps the ids of trackers it does not use this time
        self._wandb_floor = 0
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=self.tensorboard_dir)
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise _missing("wandb", "wandb", "logging.wandb_project") from e
            previous = stored.get("wandb") or {}
            again = {}
            if previous.get("id") and previous.get("project") == cfg.wandb_project:
                # resume="allow": the same W&B run continues (created if the server never saw it, e.g. offline).
                # allow_val_change: the resumed config differs at least in `resume`.
                again = {"id": previous["id"], "resume": "allow", "allow_val_change": True}
            self.wandb = wandb.init(
                project=cfg.wandb_project,
                name=run_name,
                dir=str(out_dir),
                mode=cfg.wandb_mode,
                config=config,
                **again,
            )
            # W&B steps only grow: a resumed run's rows below the steps W&B already holds (the rows after the
            # checkpoint, redone) would be dropped by W&B with a warning each; they are skipped here instead, so W&B
            # keeps the first timeline's values for those steps (metrics.jsonl and TensorBoard have the redone ones).
            # wandb.init(resume_from="<id>?_step=N") would truncate the history, but rewinding is a beta feature
            # the server must have enabled, and it needs the step before init; it is not used.
            self._wandb_floor = int(getattr(self.wandb, "starting_step", 0) or 0)
            ids["wandb"] = {"id": self.wandb.id, "project": cfg.wandb_project}
        if cfg.mlflow_tracking_uri:
            self.mlflow = MlflowRun(
                cfg.mlflow_tracking_uri, cfg.mlflow_experiment, run_name, config, stored.get("mlflow")
            )
            ids["mlflow"] = {
                "run_id": self.mlflow.run_id,
                "tracking_uri": cfg.mlflow_tracking_uri,
                "experiment": cfg.mlflow_experiment,
            }
        if ids:
            _write_tracker_ids(out_dir, ids)
        elif not resume:  # a fresh run with no trackers: no stale ids for a later resume to pick up
            self.tracker_ids_path.unlink(missing_ok=True)

    def write(self, record: dict) -> None:
        step = int(record.get("iteration", 0)) + 1
        scalars = {
            k: float(v)
            for k, v in record.items()
            if isinstance(v, (int, float))
            and not isinstance(v, bool)
            and k != "iteration"
            and math.isfinite(v)
        }
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            if step >= self._wandb_floor:
                self.wandb.log(scalars, step=step)
                self._wandb_floor = step
            else:
                log.info(
                    "W&B: step %d skipped (the resumed W&B run already holds steps up to %d)",
                    step,
                    self._wandb_floor - 1,
                )
        if self.mlflow is not None:
            self.mlflow.log(scalars, step)

    def write_samples(self, rows: list[dict]) -> None:
        """A few samples of an iteration as TensorBoard text (prompt, response and breakdown, markdown)."""
        if self.tensorboard is None or not rows:
            return
        step = int(rows[0]["iteration"]) + 1
        for k, row in enumerate(rows):
            breakdown = ", ".join(f"{name}={value}" for name, value in row["objectives"].items())
            text = (
                f"**reward** {row['reward']} ({row['branch']}{', dropped: ' + row['dropped'] if row['dropped'] else ''})"
                f"  \n**objectives** {breakdown}  \n**prompt** {row['prompt']}  \n**response** {row['response']}"
            )
            self.tensorboard.add_text(f"samples/{k}", text, step)
        self.tensorboard.flush()

    def rewind(self, iteration: int) -> None:
        """TensorBoard hides the events of later iterations (purge_step). W&B keeps them (its steps only grow: see
        __init__). MLflow keeps them too and takes the redone rows as further values at the same steps (its metric
        history holds every value; the newest is the metric's latest value)."""
        if self.tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard.close()
            self.tensorboard = SummaryWriter(log_dir=self.tensorboard_dir, purge_step=iteration + 2)

    def close(self, failed: bool = False) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
        if self.mlflow is not None:
            self.mlflow.close(failed)


class MlflowRun:
    """One MLflow run through `MlflowClient` (no global active run: a process may run several jobs). Params: the
    flattened config (`learner.lr`), values cut to MLflow's length limit, in batches of at most 100; metrics: the
    scalars per step, keys reduced to the characters MLflow accepts. `previous` (the stored ids of a resumed job):
    that run continues when it is in the same tracking store; params it already has stay (MLflow params cannot
    change), new ones are added."""

    def __init__(
        self, tracking_uri: str, experiment: str, run_name: str, config: dict | None, previous: dict | None
    ) -> None:
        try:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise _missing("mlflow", "mlflow", "logging.mlflow_tracking_uri") from e
        if _is_file_store(tracking_uri):
            # MLflow 3 refuses the file store (maintenance mode) unless this is set; the user chose it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=tracking_uri)
        run = None
        previous = previous or {}
        if previous.get("run_id") and previous.get("tracking_uri") == tracking_uri:
            try:
                run = self.client.get_run(previous["run_id"])
                self.client.update_run(run.info.run_id, status="RUNNING")
            except MlflowException as e:
                log.warning("MLflow: run %s not found (%s); starting a new run", previous["run_id"], e)
                run = None
        if run is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run = self.client.create_run(experiment_id, run_name=run_name)
        self.run_id = run.info.run_id
        self._log_params(mlflow_params(config or {}), run.data.params)

    def _log_params(self, params: dict[str, str], existing: dict[str, str]) -> None:
        from mlflow.entities import Param

        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:
            log.info("MLflow: params kept from the run's start (MLflow params cannot change): %s", changed)
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), _MLFLOW_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[i : i + _MLFLOW_PARAMS_PER_BATCH])

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        keyed = {mlflow_key(k): v for k, v in scalars.items()}
        metrics = [Metric(k, v, now, step) for k, v in keyed.items()]
        for i in range(0, len(metrics), _MLFLOW_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + _MLFLOW_METRICS_PER_BATCH])

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


# MLflow's limits (mlflow.utils.validation): param values of at most 6000 characters, keys of at most 250, 100 params
# and 1000 metrics per batch.
_MLFLOW_PARAM_CHARS = 6000
_MLFLOW_KEY_CHARS = 250
_MLFLOW_PARAMS_PER_BATCH = 100
_MLFLOW_METRICS_PER_BATCH = 1000
_MLFLOW_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-./ ]")


def _is_file_store(uri: str) -> bool:
    """A file: URI or a plain path (MLflow's file store); "databricks" is a name, not a path."""
    return uri.startswith("file:") or (":" not in uri and uri != "databricks")


def mlflow_key(key: str) -> str:
    """A metric or param key MLflow accepts: letters, digits, `_-./ ` (others become `_`), at most 250 characters."""
    return _MLFLOW_BAD_KEY_CHARS.sub("_", key)[:_MLFLOW_KEY_CHARS]


def mlflow_params(config: dict, prefix: str = "") -> dict[str, str]:
    """The config record flattened to MLflow params: {"learner.lr": "1e-06", ...}; lists as JSON, values cut to
    6000 characters."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(mlflow_params(value, name + "."))
            continue
        if isinstance(value, str):
            text = value
        elif isinstance(value, (list, dict)):
            text = json.dumps(value, default=str)
        else:
            text = str(value)
        out[mlflow_key(name)] = text[:_MLFLOW_PARAM_CHARS]
    return out
