"""The reward service against hostile clients (cluster/jobs/rm_http.py, rm_serve.py, rm_batcher.py): a real uvicorn
server on port 0 serving the real RewardService and Batcher over a fake reward fleet, spoken to over real sockets.
Stalled headers and bodies get a 408 and lose their connection without holding up other requests; oversized
headers, bodies and nesting are refused by name; errors carry a request id and never the fleet's exception text;
a full queue or connection table answers 503 with Retry-After; an item that kills shards costs a bounded number
of them and leaves the pool whole; listening off loopback needs a token."""

import dataclasses
import http.client
import json
import logging
import socket
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from ray.exceptions import RayActorError

from tests.unit.tiny_models import llama3_style_tokenizer
from troupe.actors.protocol import Prompt, Rollout
from troupe.actors.reward.aggregation import WeightedSum
from troupe.cluster.config.checks import ConfigError, validate
from troupe.cluster.config.compose import compose
from troupe.cluster.config.reward_checks import check_serve
from troupe.cluster.config.reward_schema import ServeConfig
from troupe.cluster.config.schema import TroupeConfig
from troupe.cluster.durability.faults import RetriesExhausted
from troupe.cluster.fleet import pool as pool_module
from troupe.cluster.fleet.pool import Pool
from troupe.cluster.fleet.reward_pools import RewardFleet
from troupe.cluster.jobs.rm_batcher import Batcher
from troupe.cluster.jobs.rm_http import json_depth, make_app
from troupe.cluster.jobs.rm_listen import listen
from troupe.cluster.jobs.rm_serve import RewardService

OBJECTIVES = ("correctness", "format", "length")
ITEM = {"prompt": "What is 2 + 3?", "response": "5", "reference": "5"}
SECRET = 'Traceback (most recent call last):\n  File "/home/alice/plugins/shout.py", line 3\nValueError: no'
QUICK = dict(header_timeout_s=0.5, body_timeout_s=0.5, keep_alive_s=0.5, max_body_mb=1)


class FakeFleet:
    """What RewardService and Batcher use of the reward fleet: its pools and `score`. "SLOW" waits for `release`;
    "BOOM" fails the way a remote shard does, with a traceback that names a path on the server."""

    def __init__(self) -> None:
        member = SimpleNamespace(info={"objectives": list(OBJECTIVES)})
        self.pools = {"rules": SimpleNamespace(live=lambda: [member], healthy=lambda: [member], budget=None)}
        self.release, self.busy = threading.Event(), threading.Event()
        self.release.set()

    def score(self, rollouts, deadline_s=None):
        if any(r.response_text == "SLOW" for r in rollouts):
            self.busy.set()
            self.release.wait(10)
        if any(r.response_text == "BOOM" for r in rollouts):
            raise RuntimeError(SECRET)
        return {name: torch.full((len(rollouts),), 0.5) for name in OBJECTIVES}


@pytest.fixture(scope="module")
def tokenizer():
    return llama3_style_tokenizer()


@pytest.fixture
def serve(tokenizer):
    """`serve(**fields)`: a running service with those serve.* fields (and QUICK timeouts); stopped after the test."""
    started = []

    def start(token=None, **fields):
        cfg = TroupeConfig()
        cfg.serve = dataclasses.replace(cfg.serve, port=0, **(QUICK | fields))
        service = RewardService(cfg, FakeFleet(), WeightedSum(dict(cfg.reward.weights)), tokenizer)
        srv = listen(make_app(service, cfg.serve, token), cfg.serve)
        started.append((srv, service))
        return srv, service

    yield start
    for srv, service in started:
        service.fleet.release.set()
        srv.stop()
        service.batcher.close()


def _call(srv, method, path, body=None, headers=None):
    connection = http_client(srv)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    connection.request(method, path, body=data, headers=headers or {})
    reply = connection.getresponse()
    answer = json.loads(reply.read() or b"null")
    connection.close()
    return reply.status, reply.headers, answer


def http_client(srv):
    return http.client.HTTPConnection(srv.host, srv.port, timeout=10)


def _connect(srv) -> socket.socket:
    return socket.create_connection((srv.host, srv.port), timeout=10)


def _read_reply(sock: socket.socket) -> tuple[int, dict, dict]:
    """One HTTP response read off a raw socket: status, headers (lower-case), JSON body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed without an answer: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, json.loads(body)


def _closed(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _until(condition, within_s: float = 10) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.01)


def _is_error(answer: dict, headers) -> None:
    assert set(answer) == {"error", "request_id"}, answer
    assert answer["request_id"] == headers["x-request-id"]


def test_stalled_bodies_get_408_and_their_connections_without_blocking_others(serve):
    srv, _ = serve(max_connections=64)
    stalled = []
    for _ in range(50):
        sock = _connect(srv)
        sock.sendall(b'POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"items": [')
        stalled.append(sock)
    started = time.monotonic()
    status, _, health = _call(srv, "GET", "/health")
    assert status == 200 and health["objectives"] == list(OBJECTIVES)
    status, _, scored = _call(srv, "POST", "/score", {"items": [ITEM]})
    assert status == 200 and scored["results"][0]["reward"] == pytest.approx(0.5 * (1 + 0.2 + 0.1))
    assert time.monotonic() - started < 0.5  # answered while the 50 bodies were still due
    for sock in stalled:
        status, headers, answer = _read_reply(sock)
        assert status == 408 and "serve.body_timeout_s=0.5" in answer["error"]
        _is_error(answer, headers)
    for sock in stalled:  # the connection follows: keep_alive_s to finish the body it will never send
        assert _closed(sock, within_s=5)
        sock.close()
    _until(lambda: not srv.server.server_state.connections)


def test_headers_must_arrive_in_time_and_fit(serve):
    srv, _ = serve(max_header_kb=4)
    silent, partial = _connect(srv), _connect(srv)
    partial.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n")
    for sock in (silent, partial):
        status, headers, answer = _read_reply(sock)
        assert status == 408 and "serve.header_timeout_s=0.5" in answer["error"]
        _is_error(answer, headers)
        assert _closed(sock, within_s=2)
    big = _connect(srv)
    big.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 5000 + b"\r\n")
    status, headers, answer = _read_reply(big)
    assert status == 431 and "serve.max_header_kb=4" in answer["error"]
    _is_error(answer, headers)
    status, _, _ = _call(srv, "GET", "/health")  # the server serves on
    assert status == 200


def test_an_idle_keep_alive_connection_is_closed(serve):
    srv, _ = serve()
    sock = _connect(srv)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _read_reply(sock)[0] == 200
    assert _closed(sock, within_s=3)


def test_a_client_that_stops_reading_its_responses_loses_its_connection(serve, caplog):
    """Pipelined requests from a client that reads nothing: once the socket's buffers are full, the response
    waits serve.write_timeout_s for the client, then the connection is dropped; other clients are served."""
    srv, _ = serve(write_timeout_s=0.5, body_timeout_s=60, keep_alive_s=60)
    sock = socket.socket()
    # a small window: the server's buffers fill fast
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((srv.host, srv.port))
    body = json.dumps({"items": [ITEM] * 256}).encode()
    head = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    request = head % len(body) + body

    def flood() -> None:
        sock.settimeout(30)
        try:
            for _ in range(2000):
                sock.sendall(request)
        except OSError:  # the server dropped the connection, or stopped reading: either ends the flood
            pass

    with caplog.at_level(logging.WARNING, logger="troupe.rm_serve"):
        threading.Thread(target=flood, daemon=True).start()
        _until(lambda: "read nothing of its responses" in caplog.text, within_s=30)
    _until(lambda: not srv.server.server_state.connections)
    status, _, _ = _call(srv, "GET", "/health")
    assert status == 200
    sock.close()


def test_bodies_over_the_limit_get_413_declared_or_streamed(serve):
    srv, _ = serve()
    sock = _connect(srv)
    sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (2 << 20))
    status, headers, answer = _read_reply(sock)
    assert status == 413 and "serve.max_body_mb=1" in answer["error"]
    _is_error(answer, headers)
    chunked = _connect(srv)
    chunked.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"x" * 65536
    for _ in range(20):  # 1.25 MB in chunks, none of them declared up front
        chunked.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
    status, _, answer = _read_reply(chunked)
    assert status == 413 and answer["error"] == "body: over serve.max_body_mb=1"


def test_deep_json_gets_a_400_naming_the_depth(serve):
    srv, _ = serve()
    status, headers, answer = _call(srv, "POST", "/score", b"[" * 100_000)
    assert status == 400 and answer["error"] == "body: JSON nested 100000 deep, over serve.max_json_depth=32"
    _is_error(answer, headers)
    nested = json.dumps({"items": [{**ITEM, "meta": {"a": [[[[[[[[[[]]]]]]]]]]}}]})
    status, _, answer = _call(srv, "POST", "/score", nested.encode())
    assert status == 200  # 13 deep, under the limit
    status, _, answer = _call(srv, "POST", "/score", b"{" * 5 + b'"a": ')
    assert status == 400 and answer["error"].startswith("body: not valid JSON")


def test_json_depth_skips_strings_and_escapes():
    assert json_depth(b'{"a": [1, {"b": "}}}[[["}]}') == 3
    assert json_depth(b'["\\"[[[", "\\\\", [[]]]') == 3  # an escaped quote does not end the string
    assert json_depth(b"7") == 0
    assert json_depth(b"[" * 100_000) == 100_000


def test_errors_carry_a_request_id_and_never_the_fleets_text(serve, caplog):
    srv, _ = serve()
    with caplog.at_level(logging.ERROR, logger="troupe.rm_serve"):
        status, headers, answer = _call(srv, "POST", "/score", {"items": [{**ITEM, "response": "BOOM"}]})
    assert status == 503
    _is_error(answer, headers)
    assert answer["error"] == f"scoring failed (request_id {answer['request_id']})"
    logged = [r for r in caplog.records if answer["request_id"] in r.getMessage()]
    assert logged and "/home/alice/plugins/shout.py" in logged[0].exc_text  # the server's log keeps it all
    status, headers, answer = _call(srv, "POST", "/score", {"items": [ITEM, ITEM, {**ITEM, "response": 3}]})
    assert status == 400 and answer["error"] == "items[2].response: expected a string, got int"
    _is_error(answer, headers)
    status, headers, answer = _call(srv, "GET", "/nowhere")
    assert status == 404 and "/nowhere: no such endpoint" in answer["error"]
    status, headers, answer = _call(srv, "GET", "/score")
    assert status == 405 and answer["error"] == "GET /score: use POST"


def test_a_full_queue_answers_503_with_retry_after(serve):
    srv, service = serve(max_items=4, max_queued=4)
    service.fleet.release.clear()
    answers = []

    def send(items):
        answers.append(_call(srv, "POST", "/score", {"items": items}))

    slow = threading.Thread(target=send, args=([{**ITEM, "response": "SLOW"}],))
    slow.start()
    assert service.fleet.busy.wait(10)  # the slow request holds the fleet
    waiting = threading.Thread(target=send, args=([ITEM] * 4,))
    waiting.start()
    _until(lambda: service.batcher.queued == 4)
    status, headers, answer = _call(srv, "POST", "/score", {"items": [ITEM]})
    assert status == 503 and headers["Retry-After"] == "1"
    assert "serve.max_queued=4" in answer["error"] and answer["error"].startswith("busy:")
    service.fleet.release.set()
    slow.join(10)
    waiting.join(10)
    assert sorted(status for status, _, _ in answers) == [200, 200]
    assert service.batcher.stats["refused"] == 1


def test_connections_past_the_limit_get_a_json_503(serve):
    srv, _ = serve(max_connections=2, header_timeout_s=5)
    held = [_connect(srv), _connect(srv)]
    time.sleep(0.2)  # both accepted
    status, headers, answer = _call(srv, "GET", "/health")
    assert status == 503 and headers["Retry-After"] == "1" and "serve.max_connections" in answer["error"]
    assert headers["Connection"] == "close"
    for sock in held:
        sock.close()
    time.sleep(0.2)
    assert _call(srv, "GET", "/health")[0] == 200


def test_a_bearer_token_guards_every_path(serve):
    srv, _ = serve(token="let-me-in")
    status, headers, answer = _call(srv, "GET", "/health")
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    _is_error(answer, headers)
    assert _call(srv, "GET", "/nowhere")[0] == 401
    assert _call(srv, "GET", "/health", headers={"Authorization": "Bearer let-me-in"})[0] == 200


def test_listening_off_loopback_needs_a_token():
    for host in ("127.0.0.1", "::1", "localhost"):
        check_serve(ServeConfig(host=host), ConfigError)
    check_serve(ServeConfig(host="0.0.0.0", token_env="RM_TOKEN"), ConfigError)
    with pytest.raises(ConfigError, match=r"serve\.host=0\.0\.0\.0 .*serve\.token_env"):
        check_serve(ServeConfig(host="0.0.0.0"), ConfigError)
    with pytest.raises(ConfigError, match=r"serve\.host=10\.0\.0\.5"):
        validate(compose(["job=rm_serve", "serve.host=10.0.0.5"]))  # at compose time, before any actor starts
    with pytest.raises(ConfigError, match=r"serve\.max_queued \(8\) must be >= serve\.max_items \(256\)"):
        check_serve(ServeConfig(max_queued=8), ConfigError)


class _Shard:
    """A reward actor handle whose calls run when their result is fetched; scoring a chunk that holds a POISON item
    kills it (RayActorError), as a segfaulting plug-in does."""

    def __init__(self) -> None:
        self.alive = True
        self.ready = SimpleNamespace(remote=lambda: lambda: {"objectives": ["length"]})
        self.score = SimpleNamespace(remote=lambda chunk: lambda: self._score(chunk))

    def _score(self, chunk):
        if not self.alive or any(r.response_text == "POISON" for r in chunk):
            self.alive = False
            raise RayActorError()
        return {"length": torch.tensor([float(len(r.response_text)) for r in chunk])}


def test_an_item_that_kills_shards_costs_a_bounded_number_and_leaves_the_pool_whole(monkeypatch):
    """The real Pool, RewardFleet and Batcher; only Ray's get/kill are stood in for (calls run in place)."""
    fake_ray = SimpleNamespace(
        get=lambda ref, timeout=None: [r() for r in ref] if isinstance(ref, list) else ref(),
        kill=lambda handle: None,
    )
    monkeypatch.setattr(pool_module, "ray", fake_ray)
    shards: list[_Shard] = []
    pool = Pool("reward-rules", lambda index, slot: shards.append(_Shard()) or shards[-1], timeout_s=5)
    pool.spawn(1)
    serve = ServeConfig(retries=2, batch_wait_ms=300)
    batcher = Batcher(RewardFleet({"rules": pool}), serve, deadline_s=5)
    try:
        clean = batcher.submit([_rollout("fine"), _rollout("also fine")])
        poisoned = batcher.submit([_rollout("fine"), _rollout("POISON")])
        assert [v.tolist() for v in clean.result(timeout=20).values()] == [[4.0, 9.0]]
        with pytest.raises(RetriesExhausted, match="reward: lost 3 time"):
            poisoned.result(timeout=20)
        assert batcher.stats["split_batches"] == 1
        # the merged batch: the first shard and 2 replacements die, the budget ends the third; alone, the poisoned
        # request does the same on the pool topped up again. Nothing else is lost, nothing loops.
        assert sum(not s.alive for s in shards) == 2 * (serve.retries + 1)
        assert len(pool.live()) == 1 and pool.live()[0].handle.alive
        after = batcher.submit([_rollout("still served")])
        assert after.result(timeout=20)["length"].tolist() == [12.0]
    finally:
        batcher.close()


def _rollout(response: str):
    prompt = Prompt("p", (1,), "Q", "ref", messages=(("user", "Q"),))
    return Rollout(prompt, 0, (1, 2), response, torch.zeros(2), 0, "stop", 1.0)
