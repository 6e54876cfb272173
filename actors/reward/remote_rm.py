"""Remote reward models as objectives (`type: http`): batches of samples go to a reward service over HTTP, in
`batch_size` requests, at most `max_concurrency` at a time, each retried with exponential backoff on connection
errors, 429 and 5xx (`retries`, `backoff_s`), within the objective's timeout. Three request shapes (`shape`):

- `troupe` (default): a `troupe rm serve`. POST <url>/score {"items": [{prompt: [chat turns], response, reference,
  meta, finish_reason}]} -> {"results": [{"reward", "objectives": {...}}]}; the value is "reward", or
  results[i].objectives[<objective>] with `objective: <name>`. An item the service could not score is a failure.
- `openrlhf`: OpenRLHF's `serve_rm`. POST <url>/get_reward {"query": [prompt text + response], "prompts": [prompt
  text], "labels": [reference]} -> {"rewards": [float]}.
- `vllm`: vLLM's pooling endpoint serving a reward model. POST <url>/pooling {"model": <model>, "input": [prompt
  text + response], "add_special_tokens": false} -> {"data": [{"index", "data": float list (or per-token lists)}]};
  the value is the last float (the last token's reward).

A bearer token, when needed, is read from the environment variable named by `token_env` (never from the config).

    reward:
      objectives:
        rm: {type: http, url: "http://10.0.0.5:8008", shape: troupe, batch_size: 32}
"""

from __future__ import annotations

import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from troupe.actors.reward.objective import BatchFailed, Sample

SHAPES = {"troupe": "/score", "openrlhf": "/get_reward", "vllm": "/pooling"}
RETRY_STATUS = {429, 500, 502, 503, 504}
ITEM_STATUS = {400, 413, 422}  # the request's content: retried item by item; other errors fail the whole call


@dataclass(frozen=True)
class HttpObjective:
    name: str
    url: str
    shape: str = "troupe"
    objective: str | None = None  # troupe shape: which objective of the service's answer ("reward" when None)
    model: str | None = None  # vllm shape: the served model's name
    batch_size: int = 32
    max_concurrency: int = 4
    retries: int = 2
    backoff_s: float = 0.5
    request_timeout_s: float = 10.0  # with retries and backoff, within the objective's timeout_s (checked)
    token_env: str | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(
                f"reward.objectives.{self.name}.shape must be one of {sorted(SHAPES)}, got {self.shape!r}"
            )
        if self.shape == "vllm" and not self.model:
            raise ValueError(
                f"reward.objectives.{self.name}: shape vllm needs model (the served model's name)"
            )
        if self.batch_size < 1 or self.max_concurrency < 1 or self.retries < 0:
            raise ValueError(
                f"reward.objectives.{self.name}: batch_size, max_concurrency >= 1 and retries >= 0"
            )

    @classmethod
    def from_params(cls, name: str, params: dict) -> HttpObjective:
        known = set(cls.__dataclass_fields__) - {"name"}
        extra = sorted(set(params) - known - {"type", "timeout_s", "on_error"})
        if extra:
            raise ValueError(
                f"reward.objectives.{name}: unknown keys {extra} for an http objective; known {sorted(known)}"
            )
        return cls(name, **{k: v for k, v in params.items() if k in known})

    @property
    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        path = SHAPES[self.shape]
        return url if url.endswith(path) else url + path

    def __call__(self, samples: list[Sample]) -> list[float]:
        import httpx

        headers = {}
        if self.token_env:
            token = os.environ.get(self.token_env)
            if not token:
                raise BatchFailed(f"environment variable {self.token_env} (token_env) is not set")
            headers["Authorization"] = f"Bearer {token}"
        chunks = [samples[lo : lo + self.batch_size] for lo in range(0, len(samples), self.batch_size)]
        with (
            httpx.Client(timeout=self.request_timeout_s, headers=headers) as client,
            ThreadPoolExecutor(min(self.max_concurrency, len(chunks))) as pool,
        ):
            parts = list(pool.map(lambda chunk: self._post(client, chunk), chunks))
        return [v for part in parts for v in part]

    def _post(self, client, samples: list[Sample]) -> list[float]:
        import httpx

        body = self.request(samples)
        for attempt in range(self.retries + 1):
            try:
                reply = client.post(self.endpoint, json=body)
            except httpx.TransportError as e:  # refused, reset, timed out: worth another try
                error = f"{type(e).__name__}: {e}"
            else:
                if reply.status_code == 200:
                    return self.values(reply.json(), len(samples))
                error = f"HTTP {reply.status_code}: {reply.text[:300]}"
                if reply.status_code in ITEM_STATUS:  # something in these items: the guard finds which
                    raise RuntimeError(f"{self.endpoint}: {error}")
                if reply.status_code not in RETRY_STATUS:
                    break
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2**attempt * (1 + random.random()))  # noqa: S311 (jitter)
        raise BatchFailed(f"{self.endpoint}: {error} (after {attempt + 1} attempts)")

    def request(self, samples: list[Sample]) -> dict:
        if self.shape == "troupe":
            items = [
                {
                    "prompt": s.messages,
                    "response": s.response,
                    "reference": s.reference,
                    "meta": s.meta,
                    "finish_reason": s.finish_reason,
                }
                for s in samples
            ]
            return {"items": items}
        texts = [s.prompt + s.response for s in samples]
        if self.shape == "openrlhf":
            return {
                "query": texts,
                "prompts": [s.prompt for s in samples],
                "labels": [s.reference for s in samples],
            }
        # the text is already chat-templated (special tokens included)
        return {"model": self.model, "input": texts, "add_special_tokens": False}

    def values(self, answer: dict, n: int) -> list[float]:
        """One value per sample from the service's answer; NaN for an item it reports it could not score."""
        if self.shape == "troupe":
            results = answer.get("results", [])
            out = []
            for r in results:
                if "error" in r:
                    out.append(math.nan)
                elif self.objective is None:
                    out.append(float(r["reward"]))
                else:
                    out.append(float(r.get("objectives", {}).get(self.objective, math.nan)))
        elif self.shape == "openrlhf":
            out = [float(v) for v in answer.get("rewards", [])]
        else:
            rows = sorted(answer.get("data", []), key=lambda d: d.get("index", 0))
            out = [float(_last_float(d["data"])) for d in rows]
        if len(out) != n:
            raise BatchFailed(f"{self.endpoint} answered {len(out)} values for {n} samples")
        return out


def _last_float(data) -> float:
    while isinstance(data, list):
        if not data:
            return math.nan
        data = data[-1]
    return float(data)
