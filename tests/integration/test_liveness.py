"""Liveness on the real fleet (vLLM generator, DeepSpeed learners, reward shards), end to end:

- the run's only generator misses a weight sync (its deadline passes): it is refitted before the next iteration
  generates, instead of the run failing with "no healthy members";
- a user's objective returns a huge value for some samples, which the weighted sum makes inf (an objective's own
  inf/NaN is a failure, reward.on_error's ground): their prompt groups are left out and accounted
  (`nonfinite_reward`), the run goes on (`faults.on_nonfinite=skip`), or stops after a checkpoint of the iteration
  (`stop`).
"""

import json
import math
import textwrap

import pytest

from tests.integration.conftest import running_fleet, tiny_config
from troupe.cluster.durability.checkpoint import verify
from troupe.cluster.durability.nonfinite import NonFiniteStop
from troupe.cluster.durability.run_checkpoints import RunCheckpoints, driver_state
from troupe.cluster.fleet.pool import Health
from troupe.cluster.observe.metrics import rl_columns
from troupe.cluster.run.job import Job
from troupe.cluster.run.loop import run_iteration, train

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# 1e308 for the first sample of each call, when the switch file exists (a user's bug, arriving mid-run): finite,
# but its weight of 2 overflows the reward
SPIKY = """
import os

def spiky(samples, switch):
    on = os.path.exists(switch)
    return [1e308 if on and i == 0 else 0.0 for i in range(len(samples))]
"""


@pytest.fixture(scope="module")
def live(ray_session, tmp_path_factory, tiny_model_path):
    folder = tmp_path_factory.mktemp("liveness")
    (folder / "user_rewards.py").write_text(textwrap.dedent(SPIKY))
    switch = folder / "inf-on"
    cfg = tiny_config(
        f"+reward.objectives.spiky={{target: '{folder}/user_rewards.py:spiky', switch: '{switch}'}}",
        "+reward.weights.spiky=2.0",
    )
    with running_fleet(cfg, tiny_model_path) as run:
        yield run, switch, tiny_model_path


def test_the_only_generator_missing_a_sync_is_refitted_before_it_generates(live):
    run, _, _ = live
    assert len(run.generators.live()) == 1
    sync_s = run.faults.sync_s
    run.faults.sync_s = 1e-3  # the generator cannot load the new weights in time: it misses this sync
    try:
        missed = run_iteration(run, 0)
    finally:
        run.faults.sync_s = sync_s
    assert missed["sync/generators_stale"] == 1 and missed["sync/generators_synced"] == 0
    assert run.generators.members[0].health is Health.STALE
    version = run.version
    row = run_iteration(run, 1)  # refitted to `version` first, then it generates
    assert row["fleet/stale_refit"] == 1 and row["fleet/stale_replaced"] == 0
    assert row["sync/generators_synced"] == 1 and run.version == version + 1
    assert run.generators.members[0].info["version"] == run.version
    assert run.generators.replacements == 0  # refitted, not replaced
    assert row["accounting/lost"] == 0


def _train(run, model_path, out, iterations):
    cfg = tiny_config(f"run.output_dir={out}", "run.progress_bar=false")
    checkpoints = RunCheckpoints(out, 0, 2, model_path)
    checkpoints.initial = driver_state(run, -1)
    run.iterations = iterations
    with Job(cfg, rl_columns([], False, None)) as job:
        job.start("liveness")
        train(run, job, checkpoints)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_inf_rewards_are_left_out_and_accounted_and_the_run_goes_on(live, tmp_path):
    run, switch, model_path = live
    policy, run.faults.on_nonfinite = run.faults.on_nonfinite, "skip"
    version = run.version
    switch.touch()
    try:
        rows = _train(run, model_path, tmp_path / "skip", 2)
    finally:
        switch.unlink()
        run.faults.on_nonfinite = policy
    per_batch = run.prompts.per_batch
    for row in rows:
        assert row["reward/nonfinite"] >= 1
        assert 1 <= row["prompts/dropped/nonfinite_reward"] < per_batch  # the other groups trained
        assert row["accounting/lost"] == 0 and row["accounting/in_flight"] == 0
        assert all(not isinstance(v, float) or math.isfinite(v) for v in row.values() if v is not None)
    assert run.version == version + 2  # both iterations trained and synced


def test_inf_rewards_with_on_nonfinite_stop_checkpoint_the_iteration_then_stop(live, tmp_path):
    run, switch, model_path = live
    policy, run.faults.on_nonfinite = run.faults.on_nonfinite, "stop"
    switch.touch()
    try:
        with pytest.raises(NonFiniteStop, match="samples with an inf/NaN reward") as stopped:
            _train(run, model_path, tmp_path / "stop", 3)
    finally:
        switch.unlink()
        run.faults.on_nonfinite = policy
    rows = [json.loads(x) for x in (tmp_path / "stop" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["accounting/lost"] == 0  # it stopped after the first iteration
    state = verify(tmp_path / "stop" / "checkpoints" / "iter-000000")
    assert state["iteration"] == 0
    assert "iter-000000" in str(stopped.value)
