"""Weights offered while the engine is busy are loaded by the engine's thread between steps, and by the offering
thread when the engine is free; never by two threads at once."""

import threading
import time

import pytest

from troupe.actors.generator.weight_handoff import WeightHandoff


def test_a_free_engine_loads_on_the_offering_thread():
    handoff = WeightHandoff()
    assert handoff.offer(lambda: {"version": 2, "thread": threading.current_thread().name}) == {
        "version": 2,
        "thread": threading.current_thread().name,
    }
    assert not handoff.due()


def test_a_busy_engine_loads_between_its_steps_and_errors_reach_the_caller():
    handoff = WeightHandoff()
    log, stop = [], threading.Event()
    users = []

    def generating():  # the engine's thread: steps, and applies offered weights between steps
        with handoff.engine:
            while not stop.is_set():
                users.append("step")
                handoff.apply()
                time.sleep(0.005)

    def load():
        log.append(threading.current_thread().name)
        return {"version": 3}

    worker = threading.Thread(target=generating, name="engine")
    worker.start()
    time.sleep(0.02)
    assert handoff.offer(load) == {"version": 3} and log == ["engine"]
    with pytest.raises(RuntimeError, match="bad bucket"):
        handoff.offer(lambda: (_ for _ in ()).throw(RuntimeError("bad bucket")))
    stop.set()
    worker.join()


def test_weights_offered_as_the_run_ends_are_not_lost():
    handoff = WeightHandoff()
    handoff.engine.acquire()  # a run in progress that never calls apply() again, then ends
    result = {}
    offering = threading.Thread(target=lambda: result.update(handoff.offer(lambda: {"version": 4})))
    offering.start()
    time.sleep(0.1)
    assert handoff.due() and not result
    handoff.engine.release()
    offering.join(5)
    assert result == {"version": 4} and not handoff.due()


def test_a_load_slower_than_the_poll_runs_once():
    handoff = WeightHandoff()
    runs, stop = [], threading.Event()

    def generating():
        with handoff.engine:
            while not stop.is_set():
                handoff.apply()
                time.sleep(0.005)

    def slow_load():
        runs.append(1)
        time.sleep(0.3)  # six polls of the offering thread
        return {"version": 5}

    worker = threading.Thread(target=generating)
    worker.start()
    try:
        assert handoff.offer(slow_load, poll_s=0.05) == {"version": 5}
        time.sleep(0.1)
        assert runs == [1] and not handoff.due()
    finally:
        stop.set()
        worker.join()
