"""Weights that arrive while trajectories are being generated (partial rollouts, async mode).

The generator actor then takes `update_weights` on a second thread (a Ray concurrency group) while `generate`
runs on the first. Only one thread may touch the engine: the generating thread holds `engine` for the whole
run and loads offered weights between two engine steps (the runner stops the turns in flight first, and
continues them on the new weights); when nothing is generating, the offering thread loads them itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class _Pending:
    def __init__(self, load: Callable[[], dict]):
        self.load, self.done = load, threading.Event()
        self.started = False  # taken by the engine's thread (set under the handoff's lock)
        self.result: dict | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.load()
        except BaseException as e:  # noqa: BLE001 - re-raised on the offering thread
            self.error = e
        finally:
            self.done.set()

    def value(self) -> dict:
        if self.error is not None:
            raise self.error
        return self.result


class WeightHandoff:
    def __init__(self):
        self.engine = threading.RLock()  # held by whichever thread uses the engine (re-entered by generate)
        self._lock = threading.Lock()
        self._pending: _Pending | None = None

    def offer(self, load: Callable[[], dict], poll_s: float = 0.05) -> dict:
        """Run `load` on the engine's thread: this one if the engine is free, else the generating one at its
        next step. Returns what `load` returned (or raises what it raised)."""
        p = _Pending(load)
        while True:
            if self.engine.acquire(blocking=False):
                try:
                    with self._lock:
                        if self._pending is p:
                            self._pending = None
                        run_here = not p.started
                        p.started = True
                    if run_here:
                        p.run()
                finally:
                    self.engine.release()
                return p.value()
            with self._lock:
                if self._pending is None and not p.started:  # offered once: a load in progress is not redone
                    self._pending = p
            if p.done.wait(poll_s):
                return p.value()

    def due(self) -> bool:
        return self._pending is not None

    def apply(self) -> bool:
        """On the thread holding `engine`: load the offered weights, if any. True when it loaded some."""
        with self._lock:
            p, self._pending = self._pending, None
            if p is not None:
                p.started = True
        if p is None:
            return False
        p.run()
        return True
