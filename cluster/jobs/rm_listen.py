"""The reward service's socket side: uvicorn's h11 protocol with the limits uvicorn lacks (a deadline for the
headers, the header cap answered 431, a JSON 503 past serve.max_connections, an end to connections that keep
sending an answered body or stop reading their responses), and `listen`, which serves the app of rm_http.py in a
thread."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from troupe.cluster.config.reward_schema import ServeConfig
from troupe.cluster.jobs.rm_http import error_response, new_request_id

log = logging.getLogger("troupe.rm_serve")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus what it lacks: a deadline for the request line and headers (408), the header
    cap (h11's max incomplete event size) answered 431 instead of 400, a JSON 503 on connections past
    serve.max_connections, an end to connections that keep sending a body already answered, and a deadline for
    a client to read what it was sent (uvicorn's send waits for the buffers to drain for ever)."""

    def __init__(self, *args, serve: ServeConfig, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.serve = serve
        self.header_deadline: asyncio.TimerHandle | None = None
        self.write_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.serve.max_connections:
            log.warning("a connection past serve.max_connections=%d: refused", self.serve.max_connections)
            self.app = functools.partial(over_capacity, self.serve.max_connections)
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # between requests: this data starts the next one's headers
            self._await_headers()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._headers_arrived()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_arrived()
        self._drained()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.write_deadline is None:
            self._await_reader(self.transport.get_write_buffer_size())

    def resume_writing(self) -> None:
        self._drained()
        super().resume_writing()

    def _drained(self) -> None:
        if self.write_deadline is not None:
            self.write_deadline.cancel()
            self.write_deadline = None

    def _await_reader(self, buffered: int) -> None:
        self.write_deadline = self.loop.call_later(self.serve.write_timeout_s, self._write_late, buffered)

    def _write_late(self, buffered: int) -> None:
        """No drain within serve.write_timeout_s: a client that read some of it gets another period, one that
        read nothing loses the connection."""
        self.write_deadline = None
        if self.transport.is_closing():
            return
        now = self.transport.get_write_buffer_size()
        if now < buffered:
            self._await_reader(now)
            return
        log.warning(
            "a client read nothing of its responses for serve.write_timeout_s=%s: connection closed",
            self.serve.write_timeout_s,
        )
        self.transport.abort()  # nothing more can reach it; its pending writes are dropped

    def on_response_complete(self) -> None:
        if self.conn.their_state is h11.SEND_BODY:  # answered before its body arrived (413, 408, 401...)
            self.loop.call_later(self.serve.keep_alive_s, self._drop_unfinished, self.cycle)
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request (uvicorn's answer is a plain 400): say whether the headers were too long."""
        if len(self.conn.trailing_data[0]) > self.serve.max_header_kb << 10:
            status = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
            message = f"request headers: over serve.max_header_kb={self.serve.max_header_kb}"
        else:
            status, message = HTTPStatus.BAD_REQUEST, "not a valid HTTP/1.1 request"
        if self.cycle is None or self.cycle.response_complete:  # else the app is answering this request
            self.transport.write(raw_response(status, message))
        self.transport.close()

    def _await_headers(self) -> None:
        if self.header_deadline is None:
            self.header_deadline = self.loop.call_later(self.serve.header_timeout_s, self._headers_late)

    def _headers_arrived(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def _headers_late(self) -> None:
        self.header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            message = (
                f"request headers not received within serve.header_timeout_s={self.serve.header_timeout_s}"
            )
            self.transport.write(raw_response(HTTPStatus.REQUEST_TIMEOUT, message))
            self.transport.close()

    def _drop_unfinished(self, cycle) -> None:
        if self.cycle is cycle and self.conn.their_state is h11.SEND_BODY:
            self.transport.close()


async def over_capacity(limit: int, scope, receive, send) -> None:
    message = f"{limit} connections are open, serve.max_connections: retry later"
    response = error_response(
        HTTPStatus.SERVICE_UNAVAILABLE, message, new_request_id(), retry=True, close=True
    )
    await response(scope, receive, send)


def raw_response(status: HTTPStatus, message: str) -> bytes:
    """An error answer written straight to the socket, for the protocol's refusals (no request to answer)."""
    request_id = new_request_id()
    body = json.dumps({"error": message, "request_id": request_id}).encode()
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\nx-request-id: {request_id}\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class Listening:
    """A server answering in a thread: its address, and how to stop it."""

    server: Any  # uvicorn.Server
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://[{self.host}]:{self.port}" if ":" in self.host else f"http://{self.host}:{self.port}"

    @property
    def server_address(self) -> tuple[str, int]:
        return self.host, self.port

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def listen(app: FastAPI, serve: ServeConfig) -> Listening:
    """Serve `app` on serve.host:serve.port (port 0: any free one) in a thread, once it accepts connections."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=serve.host,
        port=serve.port,
        http=functools.partial(GuardedH11Protocol, serve=serve),
        ws="none",  # an upgrade would leave these limits behind
        lifespan="on",
        h11_max_incomplete_event_size=serve.max_header_kb << 10,
        timeout_keep_alive=serve.keep_alive_s,
        server_header=False,
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True, name="rm-serve")
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(
                f"the reward service did not start on {serve.host}:{serve.port} (is the port taken?)"
            )
        time.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    return Listening(server, thread, host, port)
