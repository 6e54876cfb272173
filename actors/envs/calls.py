"""Environment calls that cannot hang the generator: every `reset`/`step` runs on a bounded pool and is polled
against its deadline between engine steps (SkyRL #1173 deadlocked for 29 hours on environment tasks that failed
silently without a timeout).

A synchronous call runs on one of `max_workers` threads; more calls wait their turn, and a call's deadline starts
when it starts. A coroutine runs on one event-loop thread and is cancelled at its deadline. A thread that is
still stuck in user code after its deadline cannot be killed: it keeps its slot, and once every slot is held by a
stuck call, waiting calls fail at once ("no free environment worker") instead of waiting behind them for ever
(`exhausted`: the generator then starts a fresh pool). Every outcome is one of: a value, an error, a timeout.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError, ThreadPoolExecutor
from typing import Any


class EnvTimeout(TimeoutError):
    pass


class PendingCall:
    def __init__(self, pool: EnvCalls, what: str):
        self.pool, self.what = pool, what
        self.future: Future = Future()
        self.started: float | None = None  # monotonic time the call started running
        self.running = False  # on a thread right now
        self.stuck = False  # still on its thread past its deadline

    def poll(self, now: float | None = None) -> tuple[bool, Any, BaseException | None]:
        """(finished, value, error): not finished yet -> (False, None, None); past its deadline -> EnvTimeout."""
        if self.future.done():
            if self.future.cancelled():
                return True, None, CancelledError(f"environment {self.what} was cancelled")
            error = self.future.exception()
            return True, None if error else self.future.result(), error
        now = time.monotonic() if now is None else now
        if self.started is None:  # waiting for a thread
            if self.pool.exhausted:
                self.future.cancel()
                n = self.pool.max_workers
                return (
                    True,
                    None,
                    RuntimeError(f"no free environment worker ({n} calls stuck past their deadline)"),
                )
            return False, None, None
        if now >= self.started + self.pool.timeout_s:
            with self.pool.lock:
                if self.running and not self.stuck:
                    self.stuck = True
                    self.pool.stuck += 1
            self.future.cancel()  # a coroutine is cancelled; a thread keeps running and keeps its slot
            return True, None, EnvTimeout(f"environment {self.what} timed out")
        return False, None, None


class EnvCalls:
    def __init__(self, max_workers: int, timeout_s: float):
        self.timeout_s = timeout_s
        self.max_workers = max_workers
        self.lock = threading.Lock()
        self.stuck = 0  # threads still in user code past their call's deadline
        self._threads = ThreadPoolExecutor(max_workers, thread_name_prefix="troupe-env")
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def exhausted(self) -> bool:
        return self.stuck >= self.max_workers

    def submit(self, fn: Callable[..., Any], *args, what: str = "step") -> PendingCall:
        """Start `fn(*args)` when a thread is free (a coroutine function's result is awaited on the loop thread)."""
        call = PendingCall(self, what)

        def run():
            with self.lock:
                if call.future.cancelled():
                    return
                call.started, call.running = time.monotonic(), True
            try:
                result = fn(*args)
                if inspect.isawaitable(result):  # waits on the loop, not on a thread slot
                    inner = asyncio.run_coroutine_threadsafe(_awaited(result), self._event_loop())
                    inner.add_done_callback(lambda f: _copy(f, call.future))
                    call.future.add_done_callback(lambda f: inner.cancel() if f.cancelled() else None)
                else:
                    _settle(call.future, result)
            except BaseException as e:  # noqa: BLE001 - user code: every error is the call's outcome
                _settle(call.future, error=e)
            finally:
                with self.lock:
                    call.running = False
                    if call.stuck:
                        self.stuck -= 1

        self._threads.submit(run)
        return call

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self.lock:
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
