"""SIGTERM / SIGINT as a request to stop: the job finishes its current step (an RL iteration, a DPO or reward-model
step, a gating step), writes a checkpoint and raises `Stopped`, which the CLI turns into exit status 128 + the
signal. A second signal stops at once (KeyboardInterrupt).

Installed after ray.init, whose own SIGTERM handler it replaces. A SIGTERM to the driver's whole process group works
too: the embedded Ray's processes are in a session of their own (runtime.own_session)."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("troupe.checkpoint")


class Stopped(Exception):
    """The job stopped on a signal after writing a checkpoint."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        super().__init__(f"stopped by signal {signum}; resume with resume={checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


def watch_stop_signals(holder, what: str = "step") -> Callable[[], None]:
    """Set `holder.stop_signal` on the first SIGTERM/SIGINT. Returns a function that puts the previous handlers
    back."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def ask(signum, _frame) -> None:
        if holder.stop_signal is not None:
            raise KeyboardInterrupt
        holder.stop_signal = signum
        log.warning("signal %d: stopping after this %s with a checkpoint", signum, what)

    for sig in previous:
        signal.signal(sig, ask)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
