"""`troupe rm serve`: the run's reward fleet (shards + aggregation) served over HTTP, for annotation and
best-of-N outside training. Bound to loopback unless `serve.host` says otherwise.

POST /score   {"items": [{"prompt": str | [{role, content}...], "response": str,
                          "reference": str (optional), "meta": {key: value} (optional)}, ...]}
          ->  {"results": [{"reward": float, "objectives": {name: float}, "weights": {name: float},
                            "branch": str}, ...], "aggregation": "hierarchy" | "weighted_sum"}
GET  /health  ->  {"objectives": [...], "aggregation": ..., "pools": {name: members}}
A malformed request gets a 4xx whose message names the field at fault (`items[2].response: ...`). Every request
scores with its own copy of the aggregation, so no request changes the next one's normaliser; give
`serve.aggregation_state` (a run's checkpoint-final/troupe_state.json or a checkpoint's state.json) to score
with a run's fitted statistics.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from troupe.actors.protocol import Rollout
from troupe.actors.reward.aggregation import score_rollouts
from troupe.cluster.config.schema import TroupeConfig
from troupe.cluster.data.prompts import SkipRow, prompt_encoder

log = logging.getLogger("troupe.rm_serve")


class BadRequest(ValueError):
    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


class RewardService:
    """Turns request items into rollouts, scores them on the reward fleet, and reports each breakdown."""

    def __init__(self, cfg: TroupeConfig, fleet, aggregation, tokenizer) -> None:
        self.cfg, self.fleet, self.aggregation, self.tokenizer = cfg, fleet, aggregation, tokenizer
        # prompts up to data.max_prompt_tokens, else generator.max_model_len (the longest the policy takes)
        self.encoder = prompt_encoder(cfg.data, tokenizer, cfg.generator.max_model_len, 0)
        self.lock = threading.Lock()  # one batch on the fleet at a time; requests queue

    def score(self, body: dict) -> dict:
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            raise BadRequest("items: expected a non-empty list of {prompt, response}")
        if len(items) > self.cfg.serve.max_items:
            raise BadRequest(
                f"items: {len(items)} items, over serve.max_items={self.cfg.serve.max_items}",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        rollouts = [self._rollout(i, item) for i, item in enumerate(items)]
        with self.lock:
            values = self.fleet.score(rollouts, deadline_s=self.cfg.faults.score_s)
        scored = score_rollouts(rollouts, values, copy.deepcopy(self.aggregation))
        return {
            "results": [
                {
                    "reward": s.reward.scalar,
                    "objectives": s.reward.objectives,
                    "weights": s.reward.weights,
                    "branch": s.reward.branch,
                }
                for s in scored
            ],
            "aggregation": self.cfg.reward.aggregation,
        }

    def health(self) -> dict:
        return {
            "objectives": sorted(self.objectives()),
            "aggregation": self.cfg.reward.aggregation,
            "pools": {name: len(pool.healthy()) for name, pool in self.fleet.pools.items()},
        }

    def objectives(self) -> list[str]:
        names = []
        for pool in self.fleet.pools.values():
            for m in pool.healthy()[:1]:
                names += m.info.get("objectives", [])
        return names

    def _rollout(self, i: int, item) -> Rollout:
        where = f"items[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{where}: expected an object with prompt and response")
        for key in ("prompt", "response"):
            if key not in item:
                raise BadRequest(f"{where}.{key}: missing")
        prompt, response = item["prompt"], item["response"]
        if not isinstance(response, str):
            raise BadRequest(f"{where}.response: expected a string, got {type(response).__name__}")
        reference = item.get("reference", "")
        if not isinstance(reference, str):
            raise BadRequest(f"{where}.reference: expected a string, got {type(reference).__name__}")
        meta = item.get("meta", {})
        if not isinstance(meta, dict):
            raise BadRequest(f"{where}.meta: expected an object, got {type(meta).__name__}")
        try:
            messages = self.encoder.messages_of(prompt)
            encoded = self.encoder.prompt(
                f"request-{i}",
                messages,
                reference,
                tuple((k, v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items()),
            )
        except SkipRow as e:
            raise BadRequest(f"{where}.prompt: {e}") from e
        if not reference.strip() and "correctness" in self.cfg.reward.objectives:
            raise BadRequest(
                f"{where}.reference: missing (objective correctness compares the response with it)"
            )
        ids = tuple(self.tokenizer(response, add_special_tokens=False).input_ids)
        finish = item.get("finish_reason", "stop")
        if finish not in ("stop", "length"):
            raise BadRequest(f"{where}.finish_reason: expected 'stop' or 'length', got {finish!r}")
        return Rollout(encoded, 0, ids, response, torch.zeros(len(ids)), 0, finish, 1.0)


def make_handler(service: RewardService, max_body: int):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            if self.path.rstrip("/") == "/health":
                self._send(HTTPStatus.OK, service.health())
            else:
                self._send(HTTPStatus.NOT_FOUND, {"error": f"{self.path}: no such endpoint (GET /health)"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/score":
                self._send(HTTPStatus.NOT_FOUND, {"error": f"{self.path}: no such endpoint (POST /score)"})
                return
            try:
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError as e:
                    raise BadRequest("Content-Length: not an integer") from e
                if length < 0:
                    raise BadRequest("Content-Length: negative")
                if length > max_body:
                    raise BadRequest(
                        f"body: {length} bytes, over serve.max_body_mb", HTTPStatus.REQUEST_ENTITY_TOO_LARGE
                    )
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except ValueError as e:
                    raise BadRequest(f"body: not valid JSON ({e})") from e
                self._send(HTTPStatus.OK, service.score(body))
            except BadRequest as e:
                self._send(e.status, {"error": str(e)})
            except Exception as e:  # the fleet failed: the client learns it was not their request
                log.exception("scoring failed")
                self._send(
                    HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"scoring failed: {type(e).__name__}: {e}"}
                )

        def _send(self, status: HTTPStatus, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args) -> None:
            log.info("%s " + fmt, self.address_string(), *args)

    return Handler


def start_service(cfg: TroupeConfig) -> tuple[ThreadingHTTPServer, RewardService]:
    """The fleet, the aggregation (with `serve.aggregation_state` loaded) and the HTTP server, serving in a thread.
    Ray must be started; the caller shuts both down."""
    from transformers import AutoTokenizer

    from troupe.actors.models import resolve_model
    from troupe.cluster.fleet.reward_model import build_aggregation, build_reward_fleet, reward_replicas

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model(cfg.model.policy), trust_remote_code=cfg.model.trust_remote_code
    )
    aggregation = build_aggregation(cfg.reward)
    normalizer = getattr(aggregation, "normalizer", None)
    if normalizer is not None and not normalizer.fitted and not cfg.serve.aggregation_state:
        raise ValueError(
            "reward.aggregation=hierarchy needs fitted statistics to serve: give serve.aggregation_state (a run's "
            "checkpoint-final/troupe_state.json), reward.hierarchy.mean/std, or a bundle that carries them; "
            "otherwise a request's scores would depend on the other items in it"
        )
    if cfg.serve.aggregation_state:
        state = json.loads(Path(cfg.serve.aggregation_state).read_text())
        if "reward_aggregation" not in state:
            raise ValueError(
                f"{cfg.serve.aggregation_state} has no reward_aggregation (serve.aggregation_state)"
            )
        aggregation.load_state_dict(state["reward_aggregation"])
    fleet = build_reward_fleet(cfg)
    fleet.spawn(reward_replicas(cfg))
    service = RewardService(cfg, fleet, aggregation, tokenizer)
    server = ThreadingHTTPServer(
        (cfg.serve.host, cfg.serve.port), make_handler(service, cfg.serve.max_body_mb << 20)
    )
    threading.Thread(target=server.serve_forever, daemon=True, name="rm-serve").start()
    return server, service


def run_rm_serve(cfg: TroupeConfig) -> dict:
    """Serve until interrupted (Ctrl-C / SIGTERM)."""
    import signal

    from troupe.cluster.run.runtime import start_ray

    start_ray(cfg.ray)
    server, service = start_service(cfg)
    host, port = server.server_address[:2]
    print(
        f"troupe: reward service on http://{host}:{port} (POST /score, GET /health); objectives "
        f"{sorted(service.objectives())}",
        flush=True,
    )
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.shutdown()
        service.fleet.shutdown()
    return {"url": f"http://{host}:{port}"}
