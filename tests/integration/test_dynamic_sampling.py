"""Dynamic sampling on the real fleet (vLLM generator, reward shard, DeepSpeed learners): a user objective makes
about two prompt groups in three constant; those are left out as `zero_variance`, refill batches are drawn until the
batch holds data.prompts_per_iteration informative groups, and every drawn prompt is in the accounting. In async
mode the refills come before the next batch is drawn, so a checkpoint's cursor resumes right after them."""

import textwrap

import pytest

from tests.integration.conftest import running_fleet, tiny_config
from troupe.cluster.run.loop import run_iteration
from troupe.cluster.run.pipeline import RolloutPipeline

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# constant for about two prompts in three (by a hash of the prompt id), varying with the sample for the others
HALF_CONSTANT = """
import zlib

def half_constant(samples):
    return [1.0 if zlib.crc32(s.uid.split("#")[0].encode()) % 3 else float(sum(s.response_ids) % 7) for s in samples]
"""


@pytest.fixture(scope="module")
def fleet(ray_session, tmp_path_factory, tiny_model_path):
    folder = tmp_path_factory.mktemp("dynamic")
    (folder / "objectives.py").write_text(textwrap.dedent(HALF_CONSTANT))
    cfg = tiny_config(
        "reward.objectives.correctness=null",
        "reward.objectives.format=null",
        "reward.objectives.length=null",
        "reward.objectives.repetition=null",
        f"+reward.objectives.half={{target: '{folder}/objectives.py:half_constant'}}",
        "reward.weights.correctness=null",
        "reward.weights.format=null",
        "reward.weights.length=null",
        "reward.weights.repetition=null",
        "+reward.weights.half=1.0",
        "generator.temperature=1.0",
        "data.dynamic_sampling=true",
        "data.max_oversampling=4",
    )
    with running_fleet(cfg, tiny_model_path) as run:
        yield run


def _check_accounting(row, groups):
    drawn = row["dynamic/prompts_drawn"]
    assert row["prompts/entered"] == drawn
    dropped = sum(v for k, v in row.items() if k.startswith("prompts/dropped/"))
    assert row["prompts/trained"] + dropped == drawn
    assert row["prompts/trained"] == round(row["dynamic/filled_frac"] * groups)
    assert row["accounting/lost"] == 0 and row["accounting/in_flight"] == 0


def test_zero_variance_groups_are_refilled_and_accounted(fleet):
    run, groups = fleet, fleet.prompts.per_batch
    rows = [run_iteration(run, i) for i in range(3)]
    refilled = [row for row in rows if row["dynamic/refills"]]
    assert refilled, "no batch had a constant group: the test's objective no longer makes any"
    for row in refilled:
        assert row["prompts/dropped/zero_variance"] >= 1  # the constant groups were left out...
        assert row["dynamic/filled_frac"] == 1.0  # ...and the batch refilled
    for row in rows:
        assert row["samples"] == groups * run.sampling.n  # the batch trained has its usual size
        _check_accounting(row, groups)


def test_async_refills_come_before_the_next_batch_so_the_cursor_resumes_after_them(fleet):
    run = fleet
    iterations, run.iterations = run.iterations, 10
    run.pipeline = RolloutPipeline(1, 1)  # run.mode=async, run.max_staleness=1
    try:
        first = run.prompts.state_dict()["batches"]
        row = run_iteration(run, 0)
        _check_accounting(row, run.prompts.per_batch)
        assert row["pipeline/in_flight"] == 1
        in_flight = run.pipeline.queue[0].batch
        # batch `first`, its refills, then the next batch (in flight while the learners trained)
        assert in_flight.iteration == first + 1 + row["dynamic/refills"]
        assert run.pipeline.cursor_state(run.prompts)["batches"] == in_flight.iteration
        row = run_iteration(run, 1)  # the in-flight batch is the next one trained
        assert row["staleness/max"] <= 1
        _check_accounting(row, run.prompts.per_batch)
    finally:
        run.pipeline.discard()
        run.pipeline, run.iterations = RolloutPipeline(0, 0), iterations
