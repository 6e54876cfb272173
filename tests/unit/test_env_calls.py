"""Environment calls (actors/envs/calls.py) never hang the caller: a call that hangs times out at its deadline, one
that raises returns its error, async calls are cancelled, and stuck threads cannot starve later calls silently."""

import asyncio
import threading
import time

import pytest

from troupe.actors.envs.calls import EnvCalls, EnvTimeout


def _wait(pending, limit_s=10.0):
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        finished, value, error = pending.poll()
        if finished:
            return value, error
        time.sleep(0.01)
    raise AssertionError("poll never finished: the call hung its caller")


@pytest.fixture
def calls():
    pool = EnvCalls(max_workers=2, timeout_s=0.3)
    yield pool
    pool.close()


def test_a_value_and_an_error(calls):
    assert _wait(calls.submit(lambda x: x + 1, 41)) == (42, None)
    value, error = _wait(calls.submit(lambda: 1 / 0))
    assert value is None and isinstance(error, ZeroDivisionError)


def test_a_call_that_hangs_times_out_and_holds_its_slot_until_it_returns(calls):
    release = threading.Event()
    start = time.monotonic()
    value, error = _wait(calls.submit(release.wait, what="reset"))
    assert isinstance(error, EnvTimeout) and "reset timed out" in str(error)
    assert 0.3 <= time.monotonic() - start < 3
    assert _wait(calls.submit(lambda: "ok")) == ("ok", None)  # one slot left
    second = threading.Event()
    assert isinstance(_wait(calls.submit(second.wait))[1], EnvTimeout)
    assert calls.exhausted
    value, error = _wait(calls.submit(lambda: "ok"))  # both slots stuck: refused at once, not queued for ever
    assert isinstance(error, RuntimeError) and "no free environment worker (2 calls stuck" in str(error)
    release.set()
    second.set()
    deadline = time.monotonic() + 5
    while calls.stuck and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _wait(calls.submit(lambda: "ok")) == ("ok", None)  # the slots came back


def test_async_calls_return_raise_and_are_cancelled_at_the_deadline(calls):
    async def add(x):
        await asyncio.sleep(0.01)
        return x + 1

    async def fails():
        raise ValueError("bad observation")

    cancelled = threading.Event()

    async def hangs():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    assert _wait(calls.submit(add, 1)) == (2, None)
    assert isinstance(_wait(calls.submit(fails))[1], ValueError)
    for _ in range(3):  # more hung coroutines than thread slots: they wait on the loop, not on threads
        assert isinstance(_wait(calls.submit(hangs))[1], EnvTimeout)
    assert cancelled.wait(5)
    assert _wait(calls.submit(add, 2)) == (3, None)


def test_a_burst_of_calls_waits_its_turn_and_deadlines_start_when_a_call_starts():
    pool = EnvCalls(max_workers=4, timeout_s=0.3)
    try:
        quick = [pool.submit(lambda i: i, i) for i in range(32)]
        assert [_wait(c) for c in quick] == [(i, None) for i in range(32)]
        slow = [pool.submit(lambda: time.sleep(0.2) or "done") for _ in range(8)]  # 2 rounds of 0.2 s > 0.3 s
        assert [_wait(c) for c in slow] == [("done", None)] * 8
    finally:
        pool.close()


def test_a_cancelled_coroutine_is_an_error_not_a_crash(calls):
    async def cancels_itself():
        raise asyncio.CancelledError()

    value, error = _wait(calls.submit(cancels_itself))
    assert value is None and error is not None and "cancelled" in str(error)
