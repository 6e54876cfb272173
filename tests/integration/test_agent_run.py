"""A multi-turn run end to end (tiny model, real Ray, vLLM and DeepSpeed): MT-Bench-style two-turn conversations
from a file (FollowUpEnv) in async mode with partial rollouts; the generator is killed with SIGKILL in the middle
of its trajectories, and the run finishes on its own with every prompt accounted for."""

import json

import pytest

from tests.integration.conftest import running_fleet, tiny_config
from tests.integration.test_chaos import Killer, _rows
from troupe.cluster.durability.run_checkpoints import RunCheckpoints, driver_state
from troupe.cluster.observe.metrics import rl_columns
from troupe.cluster.run.job import Job
from troupe.cluster.run.loop import train

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ITERATIONS = 4


@pytest.fixture(scope="module")
def agent_run(ray_session, tmp_path_factory, tiny_model_path):
    out = tmp_path_factory.mktemp("agent-run")
    data = out / "conversations.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"turns": [f"Tell me about item {i}.", "Say it in fewer words."], "answer": str(i)})
            for i in range(24)
        )
    )
    cfg = tiny_config(
        f"data.train={data}",
        "data.eval=null",
        "data.prompt_key=turns.0",
        "data.answer_key=answer",
        "data.meta_keys=[turns]",
        "env.target=troupe.actors.envs.builtin:FollowUpEnv",
        "env.max_turns=2",
        "env.max_tokens=96",
        "+reward.objectives.turns={max_turns: 2}",
        "+reward.weights.turns=0.5",
        "run.mode=async",
        f"run.output_dir={out}",
        f"run.iterations={ITERATIONS}",
        "run.progress_bar=false",
    )
    with running_fleet(cfg, tiny_model_path) as run:
        with Job(cfg, rl_columns([], False, None)) as job:
            job.start("agent")
            checkpoints = RunCheckpoints(out, 0, 2, tiny_model_path)
            checkpoints.initial = driver_state(run, -1)
            killer = Killer(run, out / "metrics.jsonl", [(1, "generator")])
            killer.start()
            try:
                train(run, job, checkpoints)
            finally:
                killer.stop = True
        yield run, _rows(out / "metrics.jsonl"), killer.killed


def test_the_conversations_have_two_turns_and_train(agent_run):
    _, rows, _ = agent_run
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS))
    assert [r["pipeline/in_flight"] for r in rows[:-1]] == [1] * (
        ITERATIONS - 1
    )  # async: a batch always ahead
    for r in rows:
        # a random model never ends a turn: each first turn is cut at max_new_tokens and goes to the
        # environment, whose second user turn follows; the second ends the trajectory (done, or its budget)
        assert r["env/turns"] == pytest.approx(2.0)
        assert r["env/ended/done"] + r.get("env/ended/max_tokens", 0.0) == pytest.approx(1.0)
        assert r["weight_version"] == r["iteration"] + 1
        assert "env/token_lag" in r and r["objective/turns"] == pytest.approx(0.0)


def test_a_generator_killed_mid_trajectory_loses_nothing(agent_run):
    run, rows, killed = agent_run
    assert killed == [(1, "generator")] and run.generators.replacements == 1
    t = run.ledger.totals()
    assert t["accounting/lost"] == 0 and t["accounting/in_flight"] == 0
    assert t["accounting/trained"] + t["accounting/dropped"] == ITERATIONS * run.prompts.per_batch
    assert (
        t["accounting/entered"] == t["accounting/trained"] + t["accounting/retried"] + t["accounting/dropped"]
    )
