"""Environment calls that cannot hang the generator: every `reset`/`step` runs on a bounded pool and is polled
against its deadline between engine steps (SkyRL #1173 deadlocked for 29 hours on environment tasks that failed
silently without a timeout).

A synchronous call runs on one of `max_workers` threads; a coroutine runs on one event-loop thread and is
cancelled at its deadline. A thread that is still stuck in user code after its deadline cannot be killed: it keeps
its slot, and once every slot is held by a stuck call, new calls fail at once ("no free environment worker")
instead of queueing behind them. Every outcome is one of: a value, an error (the exception), a timeout.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


class EnvTimeout(TimeoutError):
    pass


@dataclass
class PendingCall:
    future: Future
    deadline: float
    what: str  # "reset" or "step", for the error message

    def poll(self, now: float | None = None) -> tuple[bool, Any, BaseException | None]:
        """(finished, value, error): not finished yet -> (False, None, None); past its deadline -> EnvTimeout."""
        if self.future.done():
            error = self.future.exception()
            return True, None if error else self.future.result(), error
        if (time.monotonic() if now is None else now) >= self.deadline:
            self.future.cancel()  # a coroutine is cancelled; a thread keeps running and keeps its slot
            return True, None, EnvTimeout(f"environment {self.what} timed out")
        return False, None, None


class EnvCalls:
    def __init__(self, max_workers: int, timeout_s: float):
        self.timeout_s = timeout_s
        self.max_workers = max_workers
        self._threads = ThreadPoolExecutor(max_workers, thread_name_prefix="troupe-env")
        self._busy = 0  # thread slots held (running or stuck)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def submit(self, fn: Callable[..., Any], *args, what: str = "step") -> PendingCall:
        """Start `fn(*args)` (a coroutine function's result is awaited on the loop thread)."""
        deadline = time.monotonic() + self.timeout_s
        with self._lock:
            if self._busy >= self.max_workers:
                failed: Future = Future()
                failed.set_exception(
                    RuntimeError(f"no free environment worker ({self._busy} calls still running)")
                )
                return PendingCall(failed, deadline, what)
            self._busy += 1
        outer: Future = Future()

        def run():
            try:
                result = fn(*args)
                if inspect.isawaitable(result):
                    inner = asyncio.run_coroutine_threadsafe(_awaited(result), self._event_loop())
                    with self._lock:  # a coroutine waits on the loop, not on a thread slot
                        self._busy -= 1
                    inner.add_done_callback(lambda f: _copy(f, outer))
                    outer.add_done_callback(lambda f: inner.cancel() if f.cancelled() else None)
                    return
                _settle(outer, result)
            except BaseException as e:  # noqa: BLE001 - user code: every error is the call's outcome
                _settle(outer, error=e)
            with self._lock:
                self._busy -= 1

        self._threads.submit(run)
        return PendingCall(outer, deadline, what)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="troupe-env-loop", daemon=True).start()
            return self._loop

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)


async def _awaited(awaitable):
    return await awaitable


def _settle(future: Future, value: Any = None, error: BaseException | None = None) -> None:
    """Set a result unless the poller has already given up on (cancelled) the call."""
    try:
        future.set_exception(error) if error is not None else future.set_result(value)
    except InvalidStateError:
        pass


def _copy(source: Future, target: Future) -> None:
    if source.cancelled():
        target.cancel()
    else:
        _settle(target, None if source.exception() else source.result(), source.exception())
