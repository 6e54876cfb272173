"""The reward service's HTTP layer (`troupe rm serve`): a FastAPI app over a small backend (parse, submit, results,
health: the RewardService of rm_serve.py, or a fake in tests), served by uvicorn's h11 protocol with the limits
uvicorn lacks (rm_listen.py). Every stage of a request is bounded:

- connection: at most serve.max_connections open (a request on one more gets a 503 with Retry-After and the
  connection is closed); the request line and headers must arrive within serve.header_timeout_s (408) and fit in
  serve.max_header_kb (431); an idle keep-alive connection is closed after serve.keep_alive_s, and one whose
  client stops reading its responses (the write buffers stay full) after serve.write_timeout_s;
- body: within serve.body_timeout_s (408) and serve.max_body_mb (413, counted as it streams, chunked too); JSON
  nested deeper than serve.max_json_depth gets a 400, measured on the bytes before parsing, without recursion;
- work: parsing and results run on serve.workers threads; at most serve.max_queued items wait for the fleet (503
  with Retry-After); a request not scored within serve.request_timeout_s gets a 504.

Every error body is {"error": <short message>, "request_id": <id>} (the id is also the X-Request-ID header). The
message names the field, header or limit at fault; a failure inside the fleet is logged with its request id and
answered "scoring failed (request_id ...)", so no exception text, traceback or path reaches the client. A response
sent before its request's body arrived leaves the client serve.keep_alive_s to finish sending it, then the
connection is closed: nothing trickles a body into a finished request for ever.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from http import HTTPStatus
from itertools import accumulate
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from troupe.cluster.config.reward_schema import ServeConfig

log = logging.getLogger("troupe.rm_serve")

RETRY_AFTER_S = 1  # what a 503 for load asks a client to wait: the fleet drains its queue batch by batch
ENDPOINTS = {"/score": "POST", "/health": "GET"}


class Refusal(Exception):
    """An answer whose message is safe to show the client: it names the field, header or limit at fault."""

    def __init__(
        self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST, retry: bool = False
    ) -> None:
        super().__init__(message)
        self.status, self.retry = status, retry


class Backend(Protocol):
    def parse(self, body: Any) -> Any:
        """The JSON body -> what `submit` takes; a Refusal naming the field at fault."""

    def submit(self, parsed: Any) -> Future:
        """Queue for scoring; a 503 Refusal (retry=True) when the queue is full."""

    def results(self, parsed: Any, values: Any) -> dict: ...

    def health(self) -> dict: ...


def make_app(backend: Backend, serve: ServeConfig, token: str | None) -> FastAPI:
    workers = ThreadPoolExecutor(serve.workers, thread_name_prefix="rm-http")

    @asynccontextmanager
    async def lifespan(_app):
        yield
        workers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="troupe reward service", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )

    async def on_workers(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(workers, fn, *args)

    async def handle(request: Request, work) -> JSONResponse:
        request_id = new_request_id()
        try:
            if token is not None:
                sent = request.headers.get("authorization", "")
                if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                    raise Refusal("Authorization: a valid bearer token is required", HTTPStatus.UNAUTHORIZED)
            return JSONResponse(await work(request, request_id), headers={"X-Request-ID": request_id})
        except Refusal as e:
            return error_response(e.status, str(e), request_id, e.retry)
        except Exception:  # a bug of ours: logged in full, answered without its text
            log.exception("request %s failed", request_id)
            return error_response(
                HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error (request_id {request_id})", request_id
            )

    async def health(request: Request, request_id: str) -> dict:
        return await on_workers(backend.health)

    async def score(request: Request, request_id: str) -> dict:
        body = await read_body(request, serve)
        parsed = await on_workers(lambda: backend.parse(parse_json(body, serve.max_json_depth)))
        future = backend.submit(parsed)
        try:
            values = await asyncio.wait_for(asyncio.wrap_future(future), serve.request_timeout_s)
        except asyncio.TimeoutError:
            future.cancel()
            raise Refusal(
                f"not scored within serve.request_timeout_s={serve.request_timeout_s}",
                HTTPStatus.GATEWAY_TIMEOUT,
            ) from None
        except asyncio.CancelledError:
            if not future.cancelled():
                raise  # this request's task was cancelled, not its scoring
            raise Refusal("the service is shutting down", HTTPStatus.SERVICE_UNAVAILABLE) from None
        except Exception:  # the fleet's error (a shard's traceback, a remote message): the log keeps it
            log.exception("request %s: scoring failed", request_id)
            raise Refusal(
                f"scoring failed (request_id {request_id})", HTTPStatus.SERVICE_UNAVAILABLE
            ) from None
        return await on_workers(backend.results, parsed, values)

    async def unknown(request: Request, request_id: str) -> dict:
        path = request.url.path
        if path in ENDPOINTS:
            raise Refusal(f"{request.method} {path}: use {ENDPOINTS[path]}", HTTPStatus.METHOD_NOT_ALLOWED)
        raise Refusal(f"{path}: no such endpoint (POST /score, GET /health)", HTTPStatus.NOT_FOUND)

    @app.get("/health")
    async def health_route(request: Request):
        return await handle(request, health)

    @app.post("/score")
    async def score_route(request: Request):
        return await handle(request, score)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    async def unknown_route(request: Request, path: str):
        return await handle(request, unknown)

    return app


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def error_response(
    status: HTTPStatus, message: str, request_id: str, retry: bool = False, close: bool = False
) -> JSONResponse:
    headers = {"X-Request-ID": request_id}
    if retry:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    if close:
        headers["Connection"] = "close"
    if status == HTTPStatus.UNAUTHORIZED:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": message, "request_id": request_id}, int(status), headers)


async def read_body(request: Request, serve: ServeConfig) -> bytes:
    """The whole body within serve.body_timeout_s and serve.max_body_mb (declared or counted as it streams)."""
    limit = serve.max_body_mb << 20
    too_large = f"over serve.max_body_mb={serve.max_body_mb}"
    declared = request.headers.get("content-length")  # h11 checks it on a socket; the app checks it too
    if declared is not None and not declared.isdigit():
        raise Refusal("Content-Length: not an integer", HTTPStatus.BAD_REQUEST)
    if declared is not None and int(declared) > limit:
        raise Refusal(f"body: {declared} bytes, {too_large}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    data = bytearray()

    async def gather() -> None:
        async for chunk in request.stream():
            data.extend(chunk)
            if len(data) > limit:
                raise Refusal(f"body: {too_large}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)

    try:
        await asyncio.wait_for(gather(), serve.body_timeout_s)
    except asyncio.TimeoutError:
        raise Refusal(
            f"body: not received within serve.body_timeout_s={serve.body_timeout_s}",
            HTTPStatus.REQUEST_TIMEOUT,
        ) from None
    except ClientDisconnect:
        raise Refusal("body: the client closed the connection before sending it") from None
    return bytes(data)


_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_STEP = [0] * 256
for _open, _close in (b"[]", b"{}"):
    _STEP[_open], _STEP[_close] = 1, -1


def json_depth(data: bytes) -> int:
    """How deep arrays and objects nest in a UTF-8 JSON text, in linear time and without recursion: drop escaped
    characters, then what lies between quotes, then all but brackets; the deepest running sum is the depth. A
    stray backslash or quote (invalid JSON) can only hide brackets that come after the parser has failed."""
    outside = b"".join(_ESCAPE.sub(b"", data).split(b'"')[::2])
    return max(accumulate(map(_STEP.__getitem__, outside.translate(None, _NOT_BRACKETS))), default=0)


def parse_json(data: bytes, max_depth: int) -> Any:
    depth = json_depth(data)
    if depth > max_depth:
        raise Refusal(f"body: JSON nested {depth} deep, over serve.max_json_depth={max_depth}")
    try:
        return json.loads(data.decode("utf-8") or "null")
    except UnicodeDecodeError as e:
        raise Refusal(f"body: not UTF-8 (byte {e.start})") from None
    except RecursionError:  # not reached when json_depth holds; kept so that no body can give a 500
        raise Refusal(f"body: JSON nested over serve.max_json_depth={max_depth}") from None
    except ValueError as e:
        raise Refusal(f"body: not valid JSON ({e})") from None
