"""A training run under a reward hierarchy that mixes the user's own rewards: an `http` objective against a
running `troupe rm serve` (the holistic reward), a Python plug-in from a file outside the repo that raises on
about every fifth sample, and an LLM judge (SmolLM2 on vLLM) as aspects. The run completes, the errors are
counted per objective, the accounting shows nothing lost, and every sample's breakdown is in rollouts.jsonl and
`troupe inspect`."""

import json
import textwrap
import zlib

import pytest

import troupe
from tests.integration.conftest import TINY_OVERRIDES, tiny_config
from troupe.cluster.cli import main as cli
from troupe.cluster.jobs.rm_serve import start_service

pytestmark = pytest.mark.integration

PLUGIN = """
import zlib

def flaky_brevity(samples, limit=12):
    '''Shorter is better; raises on about every fifth sample (by a hash of its id).'''
    out = []
    for s in samples:
        if zlib.crc32(s.uid.encode()) % 5 == 0:
            raise RuntimeError(f"flaky objective refuses {s.uid}")
        out.append(max(0.0, 1.0 - len(s.response_ids) / limit))
    return out
"""


def failing(uid: str) -> bool:
    return zlib.crc32(uid.encode()) % 5 == 0


@pytest.fixture(scope="module")
def reward_service(ray_session):
    cfg = tiny_config(
        "job=rm_serve", "serve.port=0"
    )  # the tiny suite's weighted sum, as a remote reward model
    served, service = start_service(cfg)
    try:
        yield served.url
    finally:
        served.shutdown()
        service.fleet.shutdown()


def test_a_run_mixes_plugin_http_and_judge_objectives(reward_service, tmp_path, capsys):
    user_code = tmp_path / "elsewhere"
    user_code.mkdir()
    (user_code / "my_rewards.py").write_text(textwrap.dedent(PLUGIN))
    out = tmp_path / "run"
    summary = troupe.train(
        *[o for o in TINY_OVERRIDES if "repetition" not in o],
        f"run.output_dir={out}",
        "run.iterations=2",
        "data.eval=null",
        "reward.objectives.correctness=null",
        "reward.objectives.format=null",
        "reward.objectives.length=null",
        "reward.weights.correctness=null",
        "reward.weights.format=null",
        "reward.weights.length=null",
        f"+reward.objectives.remote={{type: http, url: '{reward_service}', batch_size: 8}}",
        f"+reward.objectives.brief={{target: '{user_code}/my_rewards.py:flaky_brevity', limit: 16}}",
        "+reward.objectives.helpful={type: judge, pool: judge, rubric: helpfulness}",
        "+reward.judges={judge: {model: 'builtin:smollm2-135m-instruct', num_cpus: 0, omp_threads: 2, max_model_len: 1024}}",
        "reward.aggregation=hierarchy",
        "reward.hierarchy.holistic=remote",
        "reward.hierarchy.mean=0.5",
        "reward.hierarchy.std=0.5",
        "reward.hierarchy.threshold=-10",  # every kept sample gets the aspects
        "+reward.hierarchy.aspects={brief: 0.5, helpful: 0.5}",
        "learner.num_cpus=0",
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["iteration"] >= 0]
    assert len(train_rows) == 2
    samples = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 4 * 4  # every sample of both iterations
    expected_failures = sum(failing(f"{s['uid']}#{s['sample']}") for s in samples)
    assert expected_failures > 0  # the hash does pick some
    assert sum(r.get("reward/errors/brief", 0) for r in train_rows) == expected_failures
    dropped_groups = {(s["iteration"], s["uid"]) for s in samples if failing(f"{s['uid']}#{s['sample']}")}
    assert sum(r.get("prompts/dropped/reward_error", 0) for r in train_rows) == len(dropped_groups)
    last = train_rows[-1]
    assert last["accounting/lost"] == 0 and last["accounting/dropped"] == len(dropped_groups)
    assert last["accounting/entered"] == last["accounting/trained"] + last["accounting/dropped"]
    for s in samples:
        assert {"remote", "brief", "helpful"} <= set(s["objectives"])
        if s["dropped"]:
            assert s["dropped"] == "reward_error" and s["advantage"] is None
            continue
        assert 0.0 <= s["objectives"]["helpful"] <= 1.0  # the judge's expected rating, scaled
        assert s["branch"] == "holistic+aspects" and s["advantage"] is not None
        z = (s["objectives"]["remote"] - 0.5) / 0.5
        expected = z + 0.5 * s["objectives"]["brief"] + 0.5 * s["objectives"]["helpful"]
        assert s["reward"] == pytest.approx(expected, abs=1e-4)
    kept_rows = [r for r in train_rows if r["samples_dropped"] < r["samples"]]
    assert kept_rows and all("objective/helpful" in r and "objective/remote" in r for r in kept_rows)
    assert summary["last"]["accounting/lost"] == 0
    assert cli(["inspect", str(out), "--top", "2"]) == 0
    printed = capsys.readouterr().out
    assert "== top 2 by reward ==" in printed and "helpful=" in printed and "remote=" in printed
