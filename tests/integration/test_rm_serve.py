"""The reward service (`troupe rm serve`): the reward fleet over HTTP on loopback, per-objective breakdowns that
match the aggregation, 4xx answers that name the field at fault (with a request id), concurrent requests merged
into fleet batches, a bearer token, an item a plug-in fails on answered alone, and best-of-N through it. Hostile
clients (stalled, oversized, deeply nested requests, shard-killing items) are tests/unit/test_rm_serve_hostile.py."""

import http.client
import json
import textwrap
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

import troupe
from tests.integration.conftest import tiny_config
from troupe.cluster.jobs.rm_serve import start_service

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    plugin = tmp_path_factory.mktemp("user_code") / "serve_rewards.py"  # outside the repo: shipped by Ray
    plugin.write_text(
        textwrap.dedent(
            """
            def shouting(samples):
                if any("BOOM" in s.response for s in samples):
                    raise ValueError("cannot score an explosion")
                return [sum(c.isupper() for c in s.response) / max(1, len(s.response)) for s in samples]
            """
        )
    )
    cfg = tiny_config(
        "job=rm_serve",
        "serve.port=0",
        "serve.max_items=8",
        "serve.batch_wait_ms=200",
        f"+reward.objectives.shouting={{target: '{plugin}:shouting'}}",
    )
    server, svc = start_service(cfg)
    host, port = server.server_address[:2]
    try:
        yield f"http://{host}:{port}", cfg, host
    finally:
        server.shutdown()
        svc.fleet.shutdown()


def _call(url, path, body=None, raw=None, headers=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_serves_on_loopback_and_reports_its_objectives(service):
    url, _, host = service
    assert host == "127.0.0.1"
    status, health = _call(url, "/health")
    assert status == 200
    assert {"correctness", "format", "length", "repetition", "shouting"} <= set(health["objectives"])
    assert health["pools"] == {"rules": 1}


def test_concurrent_requests_share_fleet_batches(service):
    url, _, _ = service
    item = {"prompt": "What is 2 + 3?", "response": "It is 5. Answer: 5", "reference": "5"}
    before = _call(url, "/health")[1]["batches"]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda k: _call(url, "/score", {"items": [item] * (1 + k % 3)}), range(8)))
    assert all(status == 200 for status, _ in answers)
    assert [len(body["results"]) for _, body in answers] == [1 + k % 3 for k in range(8)]
    rewards = {r["reward"] for _, body in answers for r in body["results"]}
    assert len(rewards) == 1  # the same item scores the same in any batch
    after = _call(url, "/health")[1]["batches"]
    assert after["requests"] - before["requests"] == 8
    assert after["batches"] - before["batches"] < 8  # merged: fewer fleet calls than requests


def test_an_item_the_plugin_fails_on_is_answered_alone(service):
    url, _, _ = service
    items = [
        {"prompt": "hi", "response": "QUIET please", "reference": "1"},
        {"prompt": "hi", "response": "BOOM", "reference": "1"},
    ]
    status, body = _call(url, "/score", {"items": items})
    assert status == 200
    fine, failed = body["results"]
    assert fine["objectives"]["shouting"] == pytest.approx(5 / 12) and "reward" in fine
    assert "shouting" in failed["error"] and "reward" not in failed


def test_scores_come_with_the_breakdown_the_aggregation_used(service):
    url, cfg, _ = service
    items = [
        {"prompt": "What is 2 + 3?", "response": "2 + 3 = 5. The answer is 5.", "reference": "5"},
        {
            "prompt": [{"role": "user", "content": "What is 2 + 3?"}],
            "response": "fish fish fish",
            "reference": "5",
        },
    ]
    status, body = _call(url, "/score", {"items": items})
    assert status == 200 and len(body["results"]) == 2
    good, bad = body["results"]
    assert good["objectives"]["correctness"] == 1.0 and bad["objectives"]["correctness"] == 0.0
    for r in body["results"]:  # weighted_sum: the scalar is the weighted objectives, nothing hidden
        expected = sum(cfg.reward.weights[k] * r["objectives"][k] for k in cfg.reward.weights)
        assert r["reward"] == pytest.approx(expected, abs=1e-5)
    assert good["reward"] > bad["reward"]


@pytest.mark.parametrize(
    "body, status, message",
    [
        (
            {"items": [{"prompt": "hi", "response": "a", "reference": "1"}, {"prompt": "hi"}]},
            400,
            "items[1].response: missing",
        ),
        ({"items": [{"prompt": "hi", "response": 3}]}, 400, "items[0].response: expected a string, got int"),
        ({"items": [{"prompt": 7, "response": "a"}]}, 400, "items[0].prompt:"),
        (
            {"items": [{"prompt": "hi", "response": "a", "meta": [1]}]},
            400,
            "items[0].meta: expected an object",
        ),
        ({"items": []}, 400, "items: expected a non-empty list"),
        (
            {"items": [{"prompt": "hi", "response": "a"}]},
            400,
            "items[0].reference: missing (objective correctness",
        ),
        ({"items": [{"prompt": "hi", "response": "a", "reference": "1"}] * 9}, 413, "over serve.max_items=8"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_field(service, body, status, message):
    url, _, _ = service
    got, answer = _call(url, "/score", body)
    assert got == status and message in answer["error"], answer
    assert set(answer) == {"error", "request_id"}  # every error names its request for the server's log


def test_malformed_json_and_unknown_paths(service):
    url, _, _ = service
    status, answer = _call(url, "/score", raw=b"{nope")
    assert status == 400 and answer["error"].startswith("body: not valid JSON")
    status, answer = _call(url, "/nothing", {"items": []})
    assert status == 404 and "POST /score" in answer["error"]
    # a body declared over serve.max_body_mb is refused before it is read
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.putrequest("POST", "/score")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(17 << 20))
    connection.endheaders()
    reply = connection.getresponse()
    assert reply.status == 413 and "serve.max_body_mb" in json.loads(reply.read())["error"]
    assert reply.getheader("X-Request-ID")
    connection.close()


def test_a_bearer_token_is_required_when_configured(ray_session, monkeypatch):
    monkeypatch.setenv("TROUPE_TEST_TOKEN", "let-me-in")
    cfg = tiny_config("job=rm_serve", "serve.port=0", "serve.token_env=TROUPE_TEST_TOKEN")
    server, svc = start_service(cfg)
    url = f"http://{server.server_address[0]}:{server.server_address[1]}"
    try:
        assert _call(url, "/health")[0] == 401
        assert _call(url, "/health", headers={"Authorization": "Bearer nope"})[0] == 401
        assert _call(url, "/health", headers={"Authorization": "Bearer let-me-in"})[0] == 200
    finally:
        server.shutdown()
        svc.fleet.shutdown()


def test_best_of_n_keeps_the_highest_scored_sample(service, tmp_path, tiny_model_path):
    url, _, _ = service
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"q": "What is 1 + 1?", "a": 2}\n{"no_q": 1}\n{"q": "What is 4 + 2?", "a": 6}\n')
    out = tmp_path / "best.jsonl"
    summary = troupe.best_of_n(  # `troupe best-of-n <these overrides>` on the command line
        f"best_of_n.url={url}",
        f"best_of_n.prompts={prompts}",
        "data.prompt_key=q",
        "best_of_n.reference_key=a",
        "best_of_n.n=3",
        f"best_of_n.out={out}",
        f"model.policy={tiny_model_path}",
        "generator.backend=hf",
        "generator.dtype=float32",
        "generator.max_new_tokens=12",
    )
    assert summary["prompts"] == 2 and summary["skipped"] == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    for row, answer in zip(rows, ("2", "6"), strict=True):
        assert len(row["rewards"]) == 3 and row["reward"] == max(row["rewards"])
        # the kept text is the one that scored it: scoring it again through the service gives the same reward
        status, again = _call(
            url,
            "/score",
            {
                "items": [
                    {
                        "prompt": row["prompt"],
                        "response": row["best"],
                        "reference": answer,
                        "finish_reason": row["finish_reason"],
                    }
                ]
            },
        )
        assert status == 200 and again["results"][0]["reward"] == pytest.approx(row["reward"], abs=1e-6)
    assert summary["mean_best_reward"] >= summary["mean_first_sample_reward"]
