"""best_of_n writes its rows as requests come back and saves the candidates first, so scoring that fails part-way
loses nothing and the same command finishes the rest without generating again. The reward service is a real HTTP
server on loopback; only the generator is replaced (the unit under test is the job's bookkeeping)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from troupe.cluster.config.compose import compose
from troupe.cluster.jobs import best_of_n as job


class Scorer(BaseHTTPRequestHandler):
    """Rewards the response's length; fails the request numbered `fail_at`; an item "bad" gets an error result."""

    calls = 0
    fail_at: int | None = None

    def do_POST(self):  # noqa: N802 (http.server's name)
        type(self).calls += 1
        items = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["items"]
        if type(self).calls == type(self).fail_at:
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b'{"error": "fleet lost"}')
            return
        results = [
            {"error": "objective failed"} if i["response"] == "bad" else {"reward": float(len(i["response"]))}
            for i in items
        ]
        body = json.dumps({"results": results}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def scorer():
    Scorer.calls, Scorer.fail_at = 0, None
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scorer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _cfg(tmp_path, url, n=2):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"q": f"question {i}"}) + "\n" for i in range(5)))
    return compose(
        [
            f"best_of_n.prompts={prompts}",
            "data.prompt_key=q",
            f"best_of_n.n={n}",
            "best_of_n.batch=4",  # 2 prompts per request
            f"best_of_n.out={tmp_path / 'best.jsonl'}",
            f"best_of_n.url={url}",
        ]
    )


def _generated(calls):
    def generate(cfg, prompts):
        calls.append(len(prompts))
        texts = lambda i: ["x" * (i + 1), "bad" if i == 3 else "yy", *["z"] * (cfg.best_of_n.n - 2)]  # noqa: E731
        return [[{"text": t, "finish_reason": "stop"} for t in texts(i)] for i in range(len(prompts))]

    return generate


def test_a_failure_part_way_keeps_the_rows_and_the_rerun_scores_only_the_rest(tmp_path, scorer, monkeypatch):
    generated: list[int] = []
    monkeypatch.setattr(job, "generate_candidates", _generated(generated))
    cfg = _cfg(tmp_path, scorer)
    Scorer.fail_at = 2  # the second request (prompts 2 and 3) fails
    with pytest.raises(RuntimeError, match=r"after 2 of 5 prompts.*run the same command again"):
        job.best_of_n(cfg)
    out = tmp_path / "best.jsonl"
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == [
        "question 0",
        "question 1",
    ]
    Scorer.calls, Scorer.fail_at = 0, None
    summary = job.best_of_n(cfg)
    assert generated == [5]  # the rerun reused the saved candidates
    assert Scorer.calls == 2  # prompts 2-3 and 4 only
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [f"question {i}" for i in range(5)]
    assert rows[0]["best"] == "yy" and rows[2]["best"] == "xxx"  # the longer response scores higher
    assert rows[3]["rewards"][1] is None and rows[3]["errors"] == 1 and rows[3]["best"] == "xxxx"
    assert summary["prompts"] == 5 and summary["errors"] == 1 and summary["unscored"] == 0


def test_other_sampling_settings_generate_again_and_start_the_output_over(tmp_path, scorer, monkeypatch):
    generated: list[int] = []
    monkeypatch.setattr(job, "generate_candidates", _generated(generated))
    job.best_of_n(_cfg(tmp_path, scorer))
    job.best_of_n(_cfg(tmp_path, scorer, n=3))  # another N: the saved candidates do not apply
    assert generated == [5, 5]
    assert len((tmp_path / "best.jsonl").read_text().splitlines()) == 5
