"""`troupe rm serve`: the run's reward fleet (shards + aggregation) served over HTTP, for annotation, best-of-N and
`type: http` objectives of other runs. FastAPI on uvicorn, bound to loopback unless `serve.host` says otherwise.

POST /score   {"items": [{"prompt": str | [{role, content}...], "response": str,
                          "reference": str (optional), "meta": {key: value} (optional),
                          "finish_reason": "stop" | "length" (optional)}, ...]}
          ->  {"results": [{"reward": float, "objectives": {name: float}, "weights": {name: float},
                            "branch": str} | {"error": str, "objectives": {...}}, ...],
               "aggregation": "hierarchy" | "weighted_sum"}
GET  /health  ->  {"objectives": [...], "aggregation": ..., "pools": {name: members}, "batches": {...}}

Why FastAPI + uvicorn rather than Ray Serve: the fleet is already a set of Ray actor pools with their own replicas,
resizing and fault handling, so the server only needs to batch and route; Ray Serve would add a controller and
proxy actors (processes and memory a 2-core node does not have) for nothing the pools lack. It is also the stack
vLLM's and OpenRLHF's servers use, and already installed with vLLM.

Concurrent requests are merged into fleet batches (cluster/jobs/rm_batcher.py). Limits: serve.max_items per
request (413), serve.max_body_mb (413), serve.request_timeout_s (504), serve.max_connections at once (503), and a
bearer token when serve.token_env names an environment variable that holds one (401). A malformed request gets a
400 whose message names the field at fault (`items[2].response: ...`). An item an objective fails on gets an
"error" result under reward.on_error=drop (or a 0 value under zero). Every request scores with its own copy of the
aggregation, so no request changes the next one's normaliser; give `serve.aggregation_state` (a run's
checkpoint-final/troupe_state.json or a checkpoint's state.json) to score with a run's fitted statistics.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from troupe.actors.protocol import Rollout
from troupe.cluster.config.schema import TroupeConfig
from troupe.cluster.data.prompts import SkipRow, prompt_encoder
from troupe.cluster.jobs.rm_batcher import Batcher
from troupe.cluster.run.scoring import DROP_REASON, ErrorPolicy, ObjectiveFailed, score_batch

log = logging.getLogger("troupe.rm_serve")


class BadRequest(ValueError):
    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


class RewardService:
    """Turns request items into rollouts, scores them through the batcher, and reports each breakdown."""

    def __init__(self, cfg: TroupeConfig, fleet, aggregation, tokenizer) -> None:
        self.cfg, self.fleet, self.aggregation, self.tokenizer = cfg, fleet, aggregation, tokenizer
        # prompts up to data.max_prompt_tokens, else generator.max_model_len (the longest the policy takes)
        self.encoder = prompt_encoder(cfg.data, tokenizer, cfg.generator.max_model_len, 0)
        self.on_error = ErrorPolicy.of(cfg.reward)
        s = cfg.serve
        self.batcher = Batcher(
            fleet, s.max_batch_items, s.batch_wait_ms / 1000, s.retries, cfg.faults.score_s
        )

    def rollouts(self, body) -> list[Rollout]:
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            raise BadRequest("items: expected a non-empty list of {prompt, response}")
        if len(items) > self.cfg.serve.max_items:
            raise BadRequest(
                f"items: {len(items)} items, over serve.max_items={self.cfg.serve.max_items}",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        return [self._rollout(i, item) for i, item in enumerate(items)]

    def results(self, rollouts: list[Rollout], values: dict[str, torch.Tensor]) -> dict:
        scored = score_batch(rollouts, values, copy.deepcopy(self.aggregation), self.on_error).scored
        results = []
        for s in scored:
            if s.reward.dropped:
                failed = sorted(k for k, v in s.reward.objectives.items() if v != v)
                error = f"objectives {failed} failed on this item"
                if s.reward.dropped != DROP_REASON:
                    error = "its reward is not finite (inf or NaN)"
                results.append({"error": error, "objectives": _finite(s.reward.objectives)})
                continue
            results.append(
                {
                    "reward": s.reward.scalar,
                    "objectives": s.reward.objectives,
                    "weights": s.reward.weights,
                    "branch": s.reward.branch,
                }
            )
        return {"results": results, "aggregation": self.cfg.reward.aggregation}

    def health(self) -> dict:
        return {
            "objectives": sorted(self.objectives()),
            "aggregation": self.cfg.reward.aggregation,
            "pools": {name: len(pool.healthy()) for name, pool in self.fleet.pools.items()},
            "batches": dict(self.batcher.stats),
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


def _finite(values: dict) -> dict:
    return {k: v for k, v in values.items() if math.isfinite(v)}


def make_app(service: RewardService, max_body: int, token: str | None) -> FastAPI:
    app = FastAPI(title="troupe reward service", docs_url=None, redoc_url=None, openapi_url=None)
    timeout = service.cfg.serve.request_timeout_s

    def answer(status: HTTPStatus, payload: dict) -> JSONResponse:
        return JSONResponse(payload, status_code=int(status))

    @app.middleware("http")
    async def bearer_token(request: Request, call_next):
        if token is not None:
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                return answer(
                    HTTPStatus.UNAUTHORIZED, {"error": "Authorization: a valid bearer token is required"}
                )
        return await call_next(request)

    @app.get("/health")
    async def health():
        return await asyncio.to_thread(service.health)

    @app.post("/score")
    async def score(request: Request):
        try:
            body = await _read_json(request, max_body)
            rollouts = await asyncio.to_thread(service.rollouts, body)
        except BadRequest as e:
            return answer(e.status, {"error": str(e)})
        future = service.batcher.submit(rollouts)
        try:
            values = await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except asyncio.TimeoutError:
            future.cancel()
            return answer(
                HTTPStatus.GATEWAY_TIMEOUT, {"error": f"not scored within serve.request_timeout_s={timeout}"}
            )
        except Exception as e:  # noqa: BLE001 (the fleet failed: the client learns it was not their request)
            log.exception("scoring failed")
            return answer(
                HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"scoring failed: {type(e).__name__}: {e}"}
            )
        try:
            return await asyncio.to_thread(service.results, rollouts, values)
        except (
            ObjectiveFailed
        ) as e:  # reward.on_error=fail: the item cannot be scored, and the client learns why
            return answer(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(e)})

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def unknown(path: str):
        return answer(
            HTTPStatus.NOT_FOUND, {"error": f"/{path}: no such endpoint (POST /score, GET /health)"}
        )

    return app


async def _read_json(request, max_body: int):
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError as e:
            raise BadRequest("Content-Length: not an integer") from e
        if length > max_body:
            raise BadRequest(
                f"body: {length} bytes, over serve.max_body_mb", HTTPStatus.REQUEST_ENTITY_TOO_LARGE
            )
    data = bytearray()
    async for chunk in request.stream():  # chunked bodies are counted as they arrive
        data += chunk
        if len(data) > max_body:
            raise BadRequest("body: over serve.max_body_mb", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    try:
        return json.loads(bytes(data) or b"null")
    except ValueError as e:
        raise BadRequest(f"body: not valid JSON ({e})") from e


@dataclass
class Served:
    """A running service: its address, and how to stop it."""

    server: object  # uvicorn.Server
    thread: threading.Thread
    service: RewardService
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def server_address(self) -> tuple[str, int]:
        return self.host, self.port

    def shutdown(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.service.batcher.close()


def start_service(cfg: TroupeConfig) -> tuple[Served, RewardService]:
    """The fleet, the aggregation (with `serve.aggregation_state` loaded) and the HTTP server, serving in a thread.
    Ray must be started; the caller shuts both down."""
    import uvicorn
    from transformers import AutoTokenizer

    from troupe.actors.models import resolve_model
    from troupe.cluster.fleet.reward_model import build_aggregation, build_reward_fleet, reward_replicas

    s = cfg.serve
    token = None
    if s.token_env:
        token = os.environ.get(s.token_env)
        if not token:
            raise ValueError(f"serve.token_env={s.token_env}: that environment variable is not set")
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model(cfg.model.policy), trust_remote_code=cfg.model.trust_remote_code
    )
    aggregation = build_aggregation(cfg.reward)
    normalizer = getattr(aggregation, "normalizer", None)
    if normalizer is not None and not normalizer.fitted and not s.aggregation_state:
        raise ValueError(
            "reward.aggregation=hierarchy needs fitted statistics to serve: give serve.aggregation_state (a run's "
            "checkpoint-final/troupe_state.json), reward.hierarchy.mean/std, or a bundle that carries them; "
            "otherwise a request's scores would depend on the other items in it"
        )
    if s.aggregation_state:
        state = json.loads(Path(s.aggregation_state).read_text())
        if "reward_aggregation" not in state:
            raise ValueError(f"{s.aggregation_state} has no reward_aggregation (serve.aggregation_state)")
        aggregation.load_state_dict(state["reward_aggregation"])
    selection = getattr(aggregation, "selection", None)
    if selection is not None and not selection.done:
        raise ValueError(
            "reward.hierarchy.select=consistency chooses aspects on a run's warm-up samples: give "
            "serve.aggregation_state (a run's checkpoint-final/troupe_state.json) that holds the choice, or serve "
            "with select=none; otherwise each request would choose on its own items"
        )
    fleet = build_reward_fleet(cfg)
    fleet.spawn(reward_replicas(cfg))
    service = RewardService(cfg, fleet, aggregation, tokenizer)
    config = uvicorn.Config(
        make_app(service, s.max_body_mb << 20, token),
        host=s.host,
        port=s.port,
        limit_concurrency=s.max_connections,
        timeout_keep_alive=5,
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True, name="rm-serve")
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            service.batcher.close()
            fleet.shutdown()
            raise RuntimeError(f"the reward service did not start on {s.host}:{s.port} (is the port taken?)")
        time.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    return Served(server, thread, service, host, port), service


def run_rm_serve(cfg: TroupeConfig) -> dict:
    """Serve until interrupted (Ctrl-C / SIGTERM)."""
    import signal

    from troupe.cluster.fleet.reward_model import plugin_files
    from troupe.cluster.run.runtime import start_ray

    start_ray(cfg.ray, py_modules=plugin_files(cfg.reward))
    served, service = start_service(cfg)
    print(
        f"troupe: reward service on {served.url} (POST /score, GET /health); objectives "
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
        served.shutdown()
        service.fleet.shutdown()
    return {"url": served.url}
