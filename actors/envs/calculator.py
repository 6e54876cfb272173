"""The calculator tool: arithmetic evaluated in a separate, limited process (calc_worker.py).

The worker runs as `python -I -S` (no site packages, no user paths, no environment), parses instead of executing,
and caps its own memory and CPU time per request; the wall-clock timeout here kills and restarts it when a request
still hangs. One worker per process, shared by every trajectory behind a lock: an evaluation takes microseconds.

    from troupe.actors.envs.calculator import Calculator
    Calculator().evaluate("127 * 48")   # -> "6096"; a refused expression raises CalcError with the reason
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

from troupe.actors.envs.calc_worker import CalcError

WORKER = Path(__file__).with_name("calc_worker.py")
MAX_REPLY_BYTES = 4096


class Calculator:
    def __init__(self, timeout_s: float = 2.0, worker: Path = WORKER):
        self.timeout_s, self.worker = timeout_s, worker
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self.restarts = 0  # workers killed for hanging or dying

    def evaluate(self, expression: str) -> str:
        """The expression's value as text; CalcError (refused, failed or timed out) with a message for the model."""
        request = json.dumps({"expression": expression}) + "\n"
        with self._lock:
            proc = self._worker()
            reply: list[bytes] = []
            reader = threading.Thread(
                target=lambda: reply.append(proc.stdout.readline(MAX_REPLY_BYTES)), daemon=True
            )
            try:
                proc.stdin.write(request.encode())
                proc.stdin.flush()
            except OSError:
                self._kill()
                raise CalcError("calculator unavailable (worker exited)") from None
            reader.start()
            reader.join(self.timeout_s)
            hung = reader.is_alive()
            if hung or not reply or not reply[0].endswith(b"\n"):
                self._kill()  # hung, died or wrote garbage: the next call starts a fresh worker
                raise CalcError("timed out" if hung else "calculator failed (worker exited)")
        answer = json.loads(reply[0])
        if "error" in answer:
            raise CalcError(answer["error"])
        return answer["value"]

    def close(self) -> None:
        with self._lock:
            self._kill()

    def _worker(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(self.worker)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env={},
                cwd="/",
                close_fds=True,
            )
        return self._proc

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
            self.restarts += 1

    def __del__(self):  # a best effort; actors call close()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()


_shared: Calculator | None = None
_shared_lock = threading.Lock()


def shared_calculator() -> Calculator:
    """The process's calculator (one worker, however many trajectories use it)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Calculator()
        return _shared
