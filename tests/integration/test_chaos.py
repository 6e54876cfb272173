"""Chaos: processes of a running tiny-model run are killed with SIGKILL (a generator, a reward shard, a learner
rank) and the run finishes on its own: the generator and the shard are replaced and their chunks redone, the
learner group is rebuilt from the newest checkpoint, every iteration appears once in the metrics and every prompt
is accounted for. All of it twice: in sync mode, and in async mode, where the next batch is being generated while
the learners train, so every kill finds a batch in flight."""

import json
import os
import signal
import threading
import time

import pytest

from tests.integration.conftest import running_fleet, tiny_config
from troupe.cluster.durability.checkpoint import complete, verify
from troupe.cluster.durability.run_checkpoints import RunCheckpoints, driver_state
from troupe.cluster.durability.stop_signal import Stopped
from troupe.cluster.observe.metrics import rl_columns
from troupe.cluster.run.job import Job
from troupe.cluster.run.loop import train

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ITERATIONS = 6


def _rows(path):
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return rows


class Killer(threading.Thread):
    """Kills a process of the run (SIGKILL) once the metrics show a given iteration: plans are (iteration, what)."""

    def __init__(self, run, metrics, plans) -> None:
        super().__init__(daemon=True)
        self.fleet, self.metrics, self.plans, self.killed, self.stop = run, metrics, list(plans), [], False

    def pid(self, what: str) -> int:
        if what == "generator":
            return self.fleet.generators.healthy()[0].info["pid"]
        if what == "reward":
            return self.fleet.rewards.pools["rules"].healthy()[0].info["pid"]
        return self.fleet.learners.info[1]["pid"]  # learner rank 1: rank 0 is left waiting in a collective

    def run(self) -> None:
        while self.plans and not self.stop:
            seen = {r.get("iteration") for r in _rows(self.metrics)}
            at, what = self.plans[0]
            if at in seen:
                os.kill(self.pid(what), signal.SIGKILL)
                self.killed.append((at, what))
                self.plans.pop(0)
            time.sleep(0.1)


@pytest.fixture(scope="module", params=["sync", "async"])
def chaos_run(request, ray_session, tmp_path_factory, tiny_model_path):
    out = tmp_path_factory.mktemp(f"chaos-{request.param}")
    cfg = tiny_config(
        f"run.mode={request.param}",
        f"run.output_dir={out}",
        f"run.iterations={ITERATIONS}",
        "run.checkpoint_every=2",
        "run.progress_bar=false",
        "faults.learn_s=120",  # a stalled all-reduce becomes a rank loss within 2 minutes
    )
    with running_fleet(cfg, tiny_model_path) as run:
        # the job ends (and gives up the folder) before the tests: the SIGTERM test runs a job of its own there
        with Job(cfg, rl_columns([], False, None)) as job:
            job.start("chaos")
            checkpoints = RunCheckpoints(out, 2, 2, tiny_model_path)
            checkpoints.initial = driver_state(run, -1)
            killer = Killer(run, out / "metrics.jsonl", [(0, "generator"), (1, "reward"), (4, "learner")])
            killer.start()
            try:
                train(run, job, checkpoints)
            finally:
                killer.stop = True
        # what the chaos run left, taken now: the SIGTERM test trains on (another row, checkpoint and update)
        after = {
            "rows": _rows(out / "metrics.jsonl"),
            "checkpoints": [p.name for p in complete(out / "checkpoints")],
            "totals": run.ledger.totals(),
            "replacements": (run.generators.replacements, run.rewards.pools["rules"].replacements),
            "rebuilds": run.learners.rebuilds,
        }
        yield run, out, killer.killed, checkpoints, request.param, after


def test_every_kill_happened_and_each_iteration_appears_once(chaos_run):
    run, out, killed, _, mode, after = chaos_run
    assert killed == [(0, "generator"), (1, "reward"), (4, "learner")]
    rows = after["rows"]
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS))
    # async: each kill found the next batch being generated while the learners trained
    assert [r["pipeline/in_flight"] for r in rows[:5]] == [int(mode == "async")] * 5


def test_lost_members_are_replaced_and_the_learner_group_rebuilt(chaos_run):
    after = chaos_run[-1]
    assert after["replacements"] == (1, 1)
    assert after["rebuilds"] == 1
    last = after["rows"][-1]
    assert last["faults/lost/generator"] == 1 and last["faults/lost/reward"] == 1
    assert last["faults/lost/learner"] == 1
    assert last["weight_version"] == ITERATIONS  # one update per iteration, the rolled-back ones redone
    assert after["checkpoints"] == ["iter-000003", "iter-000005"]


def test_the_accounting_adds_up(chaos_run):
    run, _, _, _, _, after = chaos_run
    t = after["totals"]
    per_iteration = run.prompts.per_batch
    assert t["accounting/lost"] == 0 and t["accounting/in_flight"] == 0
    assert t["accounting/trained"] == ITERATIONS * per_iteration  # each kept iteration trained its batch once
    # the learner died during iteration 5 (after 4's row): 4 (done, rolled back) and 5 (in flight) are retried
    assert t["accounting/retried"] == 2 * per_iteration
    assert t["accounting/entered"] == t["accounting/trained"] + t["accounting/retried"]
    assert sum(r["prompts/trained"] for r in after["rows"]) == t["accounting/trained"]


def test_sigterm_finishes_the_iteration_then_checkpoints_and_stops(chaos_run):
    run, out, _, checkpoints, _, _ = chaos_run
    job_rows = len(_rows(out / "metrics.jsonl"))
    restore = checkpoints.watch_signals()
    run.iterations = ITERATIONS + 2
    cfg = tiny_config(f"run.output_dir={out}", "run.progress_bar=false")
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives before the iteration starts: it still runs to the end
        with Job(cfg, rl_columns([], False, None)) as job, pytest.raises(Stopped) as stopped:
            job.start("resume")
            train(run, job, checkpoints, start=ITERATIONS)
    finally:
        restore()
    assert stopped.value.signum == signal.SIGTERM
    assert stopped.value.checkpoint.name == f"iter-{ITERATIONS:06d}"  # written though not due (every 2)
    assert verify(stopped.value.checkpoint)["iteration"] == ITERATIONS
    assert len(_rows(out / "metrics.jsonl")) == job_rows + 1  # the one iteration, then the stop
