"""LLM-judge arithmetic and rubrics (actors/reward/judge.py), the http objective's three request shapes
(actors/reward/remote_rm.py) against a local server, and the reward service's request splitting."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from troupe.actors.protocol import Prompt, Rollout
from troupe.actors.reward.aggregation import token_key
from troupe.actors.reward.judge import builtin_rubrics, expected_rating, load_rubric, rating_token_ids
from troupe.actors.reward.objective import BatchFailed, GuardedObjective, sample_of
from troupe.actors.reward.remote_rm import HttpObjective
from troupe.cluster.jobs.rm_batcher import cut


def test_expected_rating_is_the_mean_under_the_rating_probabilities():
    ratings = {1: [11], 2: [12], 3: [13, 23], 4: [14], 5: [15]}
    top = {13: math.log(0.2), 23: math.log(0.2), 15: math.log(0.4), 99: math.log(0.2)}
    value, mass = expected_rating(top, ratings, (1, 5), min_mass=0.1)
    # renormalised over the ratings: P(3) = 0.4 / 0.8, P(5) = 0.4 / 0.8 -> E = 4 -> (4 - 1) / 4
    assert mass == pytest.approx(0.8) and value == pytest.approx(0.75)
    assert expected_rating({15: 0.0}, ratings, (1, 5), 0.1)[0] == pytest.approx(1.0)
    assert expected_rating({11: 0.0}, ratings, (1, 5), 0.1)[0] == pytest.approx(0.0)
    low, mass = expected_rating({11: math.log(0.05), 99: math.log(0.95)}, ratings, (1, 5), 0.1)
    assert math.isnan(low) and mass == pytest.approx(0.05)  # mostly off-scale: invalid, not a guess


def test_rating_tokens_need_a_single_token_spelling():
    vocab = {"1": [1], " 1": [101], "2": [2], " 2": [7, 2], "3": [3, 3], " 3": [3, 3]}
    assert rating_token_ids(lambda t: vocab[t], (1, 2)) == {1: [1, 101], 2: [2]}
    with pytest.raises(ValueError, match="no single token for rating 3"):
        rating_token_ids(lambda t: vocab[t], (1, 3))


def test_builtin_and_user_rubrics(tmp_path):
    assert {"factuality", "relevance", "helpfulness", "safety"} <= set(builtin_rubrics())
    facts = load_rubric("factuality")
    assert facts.needs_reference and facts.scale == (1, 5)
    chat = facts.prompt("Q?", "A.", "Ref.")
    assert chat[0]["role"] == "system" and "Ref." in chat[-1]["content"] and "A." in chat[-1]["content"]
    mine = tmp_path / "tone.yaml"
    mine.write_text("template: 'Q: {question} R: {response} Rate 0-3.'\nscale: [0, 3]\n")
    assert load_rubric(str(mine)).name == "tone" and load_rubric(str(mine)).scale == (0, 3)
    mine.write_text("template: 'R: {response}'\n")
    with pytest.raises(ValueError, match="lacks {question}"):
        load_rubric(str(mine))
    mine.write_text("template: 'Q: {question} R: {response}'\nscales: [1, 5]\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_rubric(str(mine))
    with pytest.raises(ValueError, match="not a built-in"):
        load_rubric("grammarr")
    mine.write_text("template: 'Q: {question} R: {response} as JSON {score: 1}'\n")
    with pytest.raises(ValueError, match="a field other than"):
        load_rubric(str(mine))


class _Fake(BaseHTTPRequestHandler):
    """A reward service speaking one of the three shapes; `fail_first` 503s to exercise retries."""

    seen: list = []
    fail_first = 0

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Fake.seen.append((self.path, body, self.headers.get("Authorization")))
        if _Fake.fail_first:
            _Fake.fail_first -= 1
            return self._send(503, {"error": "busy"})
        if self.path == "/score":
            results = [
                {"reward": float(len(i["response"])), "objectives": {"len": 2.0}} for i in body["items"]
            ]
            results[-1] = (
                {"error": "cannot score"} if body["items"][-1]["response"].endswith("!") else results[-1]
            )
            return self._send(200, {"results": results})
        if self.path == "/get_reward":
            return self._send(200, {"rewards": [float(len(q)) for q in body["query"]]})
        if self.path == "/pooling":
            data = [{"index": i, "data": [[0.0], [float(len(t))]]} for i, t in enumerate(body["input"])]
            return self._send(200, {"data": list(reversed(data))})
        self._send(404, {"error": "no"})

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def fake_service():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _samples(texts):
    prompt = Prompt("p", (1,), "<user>Q</user>", "ref", messages=(("user", "Q"),))
    return [
        sample_of(Rollout(prompt, i, (1, 2), t, torch.zeros(2), 0, "stop", 1.0)) for i, t in enumerate(texts)
    ]


def test_http_shapes_batches_and_values(fake_service, monkeypatch):
    texts = ["a", "bb", "ccc", "dddd", "eeeee"]
    _Fake.seen.clear()
    troupe_rm = HttpObjective("rm", fake_service, batch_size=2, max_concurrency=2)
    assert troupe_rm(_samples(texts)) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert sorted(len(b["items"]) for _, b, _ in _Fake.seen) == [1, 2, 2]
    assert _Fake.seen[0][1]["items"][0]["prompt"] == [{"role": "user", "content": "Q"}]
    named = HttpObjective("rm", fake_service, objective="len")
    assert named(_samples(texts[:2])) == [2.0, 2.0]
    openrlhf = HttpObjective("rm", fake_service + "/get_reward", shape="openrlhf")
    assert openrlhf(_samples(["ab"])) == [float(len("<user>Q</user>ab"))]
    assert _Fake.seen[-1][1]["labels"] == ["ref"]
    vllm = HttpObjective("rm", fake_service, shape="vllm", model="rm-model")
    assert vllm(_samples(["a", "bcd"])) == [float(len("<user>Q</user>a")), float(len("<user>Q</user>bcd"))]
    assert _Fake.seen[-1][1]["model"] == "rm-model"
    monkeypatch.setenv("RM_TOKEN", "s3cret")
    HttpObjective("rm", fake_service, token_env="RM_TOKEN")(_samples(["a"]))
    assert _Fake.seen[-1][2] == "Bearer s3cret"


def test_http_retries_then_fails_the_batch(fake_service):
    _Fake.fail_first = 2
    assert HttpObjective("rm", fake_service, retries=2, backoff_s=0.01)(_samples(["a"])) == [1.0]
    _Fake.fail_first = 5
    with pytest.raises(BatchFailed, match="HTTP 503.*after 2 attempts"):
        HttpObjective("rm", fake_service, retries=1, backoff_s=0.01)(_samples(["a"]))
    _Fake.fail_first = 0
    with pytest.raises(BatchFailed, match="ConnectError"):
        HttpObjective("rm", "http://127.0.0.1:9", retries=0)(_samples(["a"]))


def test_an_item_the_service_cannot_score_fails_alone(fake_service):
    guarded = GuardedObjective("rm", HttpObjective("rm", fake_service), timeout_s=30)
    prompt = Prompt("p", (1,), "q", "")
    rollouts = [
        Rollout(prompt, i, (1,), t, torch.zeros(1), 0, "stop", 1.0) for i, t in enumerate(["ok", "no!"])
    ]
    values = guarded.score(rollouts)
    assert values[0] == 2.0 and math.isnan(values[1])


def test_http_config_errors_name_the_key():
    with pytest.raises(ValueError, match="reward.objectives.rm.shape"):
        HttpObjective("rm", "http://x", shape="grpc")
    with pytest.raises(ValueError, match="shape vllm needs model"):
        HttpObjective("rm", "http://x", shape="vllm")
    with pytest.raises(ValueError, match=r"unknown keys \['urll'\]"):
        HttpObjective.from_params("rm", {"type": "http", "url": "http://x", "urll": 1})


def test_cut_splits_merged_values_per_request():
    prompt = Prompt("p", (1,), "q", "")
    rollouts = [
        Rollout(prompt, i, tuple(range(n)), "", torch.zeros(n), 0, "stop", 1.0)
        for i, n in enumerate([1, 2, 3])
    ]
    values = {"a": torch.tensor([1.0, 2.0, 3.0]), token_key("a"): torch.arange(6, dtype=torch.float32)}
    first, second = cut(values, rollouts, [2, 1])
    assert first["a"].tolist() == [1.0, 2.0] and first[token_key("a")].tolist() == [0, 1, 2]
    assert second["a"].tolist() == [3.0] and second[token_key("a")].tolist() == [3, 4, 5]
