"""`troupe rm serve`: the run's reward fleet (shards + aggregation) served over HTTP, for annotation, best-of-N and
`type: http` objectives of other runs. FastAPI on uvicorn (its h11 protocol), bound to loopback unless `serve.host`
says otherwise.

POST /score   {"items": [{"prompt": str | [{role, content}...], "response": str,
                          "reference": str (optional), "meta": {key: value} (optional),
                          "finish_reason": "stop" | "length" (optional)}, ...]}
          ->  {"results": [{"reward": float, "objectives": {name: float}, "weights": {name: float},
                            "branch": str} | {"error": str, "objectives": {...}}, ...],
               "aggregation": "hierarchy" | "weighted_sum"}
GET  /health  ->  {"objectives": [...], "aggregation": ..., "pools": {name: members}, "batches": {...},
                  "queued": items waiting for the fleet}

Why FastAPI + uvicorn rather than Ray Serve: the fleet is already a set of Ray actor pools with their own replicas,
resizing and fault handling, so the server only needs to batch and route; Ray Serve would add a controller and
proxy actors (processes and memory a 2-core node does not have) for nothing the pools lack. It is also the stack
vLLM's and OpenRLHF's servers use, and already installed with vLLM.

Concurrent requests are merged into fleet batches (cluster/jobs/rm_batcher.py); the HTTP layer, with its limits,
is cluster/jobs/rm_http.py: serve.max_items per request and serve.max_body_mb (413), serve.max_json_depth (400),
serve.header_timeout_s / serve.body_timeout_s (408), serve.max_header_kb (431), serve.max_connections and
serve.max_queued items waiting (503 with Retry-After), serve.request_timeout_s (504), and a bearer token when
serve.token_env names an environment variable that holds one (401; required off loopback). Every error is
{"error": <message>, "request_id": <id>}: a malformed request gets a 400 whose message names the field at fault
(`items[2].response: ...`); a failure in the fleet is logged with the request id, not shown. An item an objective
fails on gets an "error" result under reward.on_error=drop (or a 0 value under zero). Every request scores with
its own copy of the aggregation, so no request changes the next one's normaliser; give `serve.aggregation_state` (a
run's checkpoint-final/troupe_state.json or a checkpoint's state.json) to score with a run's fitted statistics.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import torch

from troupe.actors.protocol import Rollout
from troupe.cluster.config.checks import ConfigError
from troupe.cluster.config.reward_checks import check_serve
from troupe.cluster.config.schema import TroupeConfig
from troupe.cluster.data.prompts import SkipRow, prompt_encoder
from troupe.cluster.jobs.rm_batcher import Batcher, QueueFull
from troupe.cluster.jobs.rm_http import Refusal, make_app
from troupe.cluster.jobs.rm_listen import Listening, listen
from troupe.cluster.run.scoring import DROP_REASON, ErrorPolicy, ObjectiveFailed, score_batch

log = logging.getLogger("troupe.rm_serve")


class RewardService:
    """Turns request items into rollouts, scores them through the batcher, and reports each breakdown (the backend
    of rm_http's app)."""

    def __init__(self, cfg: TroupeConfig, fleet, aggregation, tokenizer) -> None:
        self.cfg, self.fleet, self.aggregation, self.tokenizer = cfg, fleet, aggregation, tokenizer
        # prompts up to data.max_prompt_tokens, else generator.max_model_len (the longest the policy takes)
        self.encoder = prompt_encoder(cfg.data, tokenizer, cfg.generator.max_model_len, 0)
        self.on_error = ErrorPolicy.of(cfg.reward)
        self.batcher = Batcher(fleet, cfg.serve, cfg.faults.score_s)

    def parse(self, body) -> list[Rollout]:
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            raise Refusal("items: expected a non-empty list of {prompt, response}")
        if len(items) > self.cfg.serve.max_items:
            raise Refusal(
                f"items: {len(items)} items, over serve.max_items={self.cfg.serve.max_items}",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        return [self._rollout(i, item) for i, item in enumerate(items)]

    def submit(self, rollouts: list[Rollout]) -> Future:
        try:
            return self.batcher.submit(rollouts)
        except QueueFull as e:
            raise Refusal(f"busy: {e}", HTTPStatus.SERVICE_UNAVAILABLE, retry=True) from None

    def results(self, rollouts: list[Rollout], values: dict[str, torch.Tensor]) -> dict:
        try:
            scored = score_batch(rollouts, values, copy.deepcopy(self.aggregation), self.on_error).scored
        except (
            ObjectiveFailed
        ) as e:  # reward.on_error=fail: the item cannot be scored; our own message says why
            raise Refusal(str(e), HTTPStatus.SERVICE_UNAVAILABLE) from None
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
            "queued": self.batcher.queued,
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
            raise Refusal(f"{where}: expected an object with prompt and response")
        for key in ("prompt", "response"):
            if key not in item:
                raise Refusal(f"{where}.{key}: missing")
        prompt, response = item["prompt"], item["response"]
        if not isinstance(response, str):
            raise Refusal(f"{where}.response: expected a string, got {type(response).__name__}")
        reference = item.get("reference", "")
        if not isinstance(reference, str):
            raise Refusal(f"{where}.reference: expected a string, got {type(reference).__name__}")
        meta = item.get("meta", {})
        if not isinstance(meta, dict):
            raise Refusal(f"{where}.meta: expected an object, got {type(meta).__name__}")
        try:
            messages = self.encoder.messages_of(prompt)
            encoded = self.encoder.prompt(
                f"request-{i}",
                messages,
                reference,
                tuple((k, v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items()),
            )
        except SkipRow as e:
            raise Refusal(f"{where}.prompt: {e}") from e
        if not reference.strip() and "correctness" in self.cfg.reward.objectives:
            raise Refusal(f"{where}.reference: missing (objective correctness compares the response with it)")
        ids = tuple(self.tokenizer(response, add_special_tokens=False).input_ids)
        finish = item.get("finish_reason", "stop")
        if finish not in ("stop", "length"):
            raise Refusal(f"{where}.finish_reason: expected 'stop' or 'length', got {finish!r}")
        return Rollout(encoded, 0, ids, response, torch.zeros(len(ids)), 0, finish, 1.0)


def _finite(values: dict) -> dict:
    return {k: v for k, v in values.items() if math.isfinite(v)}


@dataclass
class Served:
    """A running service: its address, and how to stop it (the fleet is the caller's)."""

    http: Listening
    service: RewardService

    @property
    def url(self) -> str:
        return self.http.url

    @property
    def server_address(self) -> tuple[str, int]:
        return self.http.server_address

    def shutdown(self) -> None:
        self.http.stop()
        self.service.batcher.close()


def start_service(cfg: TroupeConfig) -> tuple[Served, RewardService]:
    """The fleet, the aggregation (with `serve.aggregation_state` loaded) and the HTTP server, serving in a thread.
    Ray must be started; the caller shuts both down."""
    from transformers import AutoTokenizer

    from troupe.actors.models import resolve_model
    from troupe.cluster.fleet.reward_model import build_aggregation, build_reward_fleet, reward_replicas

    s = cfg.serve
    check_serve(s, ConfigError)  # also when called without the job's validate (tests, benchmarks)
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
    try:
        http = listen(make_app(service, s, token), s)
    except BaseException:
        service.batcher.close()
        fleet.shutdown()
        raise
    return Served(http, service), service


def run_rm_serve(cfg: TroupeConfig) -> dict:
    """Serve until interrupted (Ctrl-C / SIGTERM)."""
    import signal

    from troupe.cluster.fleet.reward_model import plugin_files
    from troupe.cluster.run.runtime import start_ray

    start_ray(cfg.ray, py_modules=plugin_files(cfg))
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
