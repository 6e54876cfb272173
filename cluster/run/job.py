"""The skeleton every job shares (the RL loop, offline DPO, reward-model training and evaluation): the output folder,
held by this process alone while the job runs (cluster/durability/run_folder.py), the metrics JSONL, the table and
progress bar the user sees, and teardown of what the job started, in reverse.

    with Job(cfg, columns, total=steps, fresh=True) as job:
        group = job.on_exit(LearnerGroup(...), "shutdown")
        job.start("troupe: ...")
        for ...: job.record(row)
        return job.finish(checkpoint=path)
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from troupe.cluster.config.schema import TroupeConfig
from troupe.cluster.durability.run_folder import claim, start_fresh
from troupe.cluster.observe.metrics import (
    TABLE_COLUMNS,
    MetricsWriter,
    nonfinite_keys,
    table_header,
    table_row,
    with_nonfinite_count,
)
from troupe.cluster.observe.rollouts import RolloutLog
from troupe.cluster.observe.run_log import route_driver_logs
from troupe.cluster.observe.trackers import ScalarSinks

log = logging.getLogger("troupe.job")


class Job:
    """`fresh`: the job starts a new run in the folder (metrics.jsonl, TensorBoard, checkpoints), so the folder must
    not hold an earlier run's files unless run.overwrite deletes them; a resumed run and the jobs that only add
    their own files (reward bundles, reports) keep what is there."""

    def __init__(
        self, cfg: TroupeConfig, columns=TABLE_COLUMNS, total: int | None = None, fresh: bool = False
    ) -> None:
        self.out_dir = Path(cfg.run.output_dir).resolve()
        # before anything is written there: a second process on the folder fails here, naming this one
        held = claim(self.out_dir)
        try:
            deleted = start_fresh(self.out_dir, cfg.run.overwrite) if fresh else []
        except BaseException:
            held.release()
            raise
        if deleted:
            log.warning("run.overwrite=true: deleted %s", ", ".join(str(p) for p in deleted))
        self._teardown: list = [(held, "release")]  # called last
        self.started = time.perf_counter()
        self.columns = columns
        self.show = cfg.run.print_table
        self.total = total
        self.bar = None
        self._progress = cfg.run.progress_bar and total
        self.metrics: MetricsWriter | None = None
        self.rollouts: RolloutLog | None = None
        self.sinks: ScalarSinks | None = None
        self.cfg = cfg
        self.last: dict = {}
        self._nonfinite_seen: set[str] = set()
        self.log_dir = self.out_dir / "logs"
        if cfg.logging.quiet:
            self.on_exit(route_driver_logs(self.log_dir), "__call__")

    def __enter__(self) -> Job:
        return self

    def on_exit(self, resource, method: str):
        """Call `resource.method()` when the job ends (last registered, first called); returns `resource`."""
        self._teardown.append((resource, method))
        return resource

    def start(self, banner: str) -> None:
        """Open the metrics file and show the banner and the table header (after the slow start-up)."""
        self.metrics = MetricsWriter(self.out_dir / "metrics.jsonl")
        self.rollouts = RolloutLog(self.out_dir, self.cfg.logging.rollouts)
        self.sinks = scalar_sinks(self.cfg, self.out_dir)
        if self.show:
            print(banner, flush=True)
            print(table_header(self.columns), flush=True)
        if self._progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total, desc="troupe", unit="step", file=sys.stderr, leave=False, disable=None
            )

    def connect_ray(self) -> None:
        """Start or join Ray; with logging.quiet, actors' logs stay in files (<run dir>/logs/ray)."""
        from troupe.cluster.fleet.reward_model import plugin_files
        from troupe.cluster.observe.run_log import link_ray_logs
        from troupe.cluster.run.runtime import start_ray

        start_ray(self.cfg.ray, log_to_driver=not self.cfg.logging.quiet, py_modules=plugin_files(self.cfg))
        link_ray_logs(self.log_dir)

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def record(self, row: dict) -> None:
        row = with_nonfinite_count(row)
        for key in set(nonfinite_keys(row)) - self._nonfinite_seen:  # once per key: some are never measured
            self._nonfinite_seen.add(key)
            log.info("metric %s is %s (written as null, counted in metrics/nonfinite)", key, row[key])
        self.metrics.write(row)
        self.sinks.write(row)
        self.last = row
        if self.show and self.bar is not None:
            self.bar.write(table_row(row, self.columns), file=sys.stdout)  # above the bar, not through it
        elif self.show:
            print(table_row(row, self.columns), flush=True)
        if self.bar is not None and row.get("iteration", 0) >= 0:  # the evaluation before training is no step
            self.bar.update(1)

    def record_samples(self, rows: list[dict]) -> None:
        """An iteration's sample rows (cluster/observe/rollouts.py); the first few also to TensorBoard as text."""
        self.rollouts.write(rows)
        self.sinks.write_samples(rows[: self.cfg.logging.text_samples])

    def rewind(self, iteration: int) -> list[dict]:
        """Forget the rows after `iteration` (they are about to be redone); returns them."""
        if self.rollouts is not None:
            self.rollouts.rewind(iteration)
        removed = self.metrics.rewind(iteration)
        self.sinks.rewind(iteration)
        if removed:
            log.warning("metrics: %d row(s) after iteration %d will be redone", len(removed), iteration)
        return removed

    def finish(self, **paths) -> dict:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        total = self.elapsed_s
        out = {
            "metrics": self.metrics.path if self.metrics else None,
            "last": self.last,
            "total_s": total,
            **paths,
        }
        if self.show:
            lines = [f"{k}: {v}" for k, v in out.items() if k not in ("last", "total_s") and v is not None]
            print("\n".join(lines + [f"total: {total:.0f}s"]), flush=True)
        return out

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.rollouts is not None:
            self.rollouts.close()
        if self.sinks is not None:
            self.sinks.close(failed=exc[0] is not None)
        for resource, method in reversed(self._teardown):
            try:
                getattr(resource, method)()
            except Exception:  # one failed teardown must not leave the rest running
                log.exception("teardown of %s failed", type(resource).__name__)


def scalar_sinks(cfg: TroupeConfig, out_dir: Path) -> ScalarSinks:
    """TensorBoard, W&B and MLflow for a job writing to `out_dir`: the trackers get the whole config as plain data
    (`config_record`); a resumed job (`cfg.resume` set) continues the W&B and MLflow runs stored in the folder."""
    config = None
    if cfg.logging.wandb_project or cfg.logging.mlflow_tracking_uri:
        from troupe.cluster.config.compose import config_record

        config = config_record(cfg)
    return ScalarSinks(cfg.logging, out_dir, cfg.run.name, config=config, resume=bool(cfg.resume))
