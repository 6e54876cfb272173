"""Run checkpoints of the jobs that train a learner group on preference pairs (offline DPO, reward-model bt / haf).

`<run dir>/checkpoints/iter-NNNNNN/` (written by durability/checkpoint.py: tmp folder, signed manifest, swap in)
holds every rank's DeepSpeed state (`learner-ds/`: weights, optimizer, LR schedule, RNG streams) and state.json:
the step, the data position (`PairPasses.state_dict`), the run id and config fingerprint (`admit`). `resume=latest`
verifies the checkpoint and checks its fingerprint before any actor starts (`resume_point`), then the ranks load
their states, the data position is restored and metrics.jsonl is rewound to the checkpoint's step: the steps after
it are redone (counted in the result as `redone_steps`). SIGTERM/SIGINT: the step finishes, a checkpoint is written
and `Stopped` raised (durability/stop_signal.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from troupe.cluster.config.schema import TroupeConfig
from troupe.cluster.durability.checkpoint import write_checkpoint
from troupe.cluster.durability.stop_signal import Stopped, watch_stop_signals
from troupe.cluster.jobs.pair_passes import PairPasses

LEARNER_DS = "learner-ds"
log = logging.getLogger("troupe.checkpoint")


class PairCheckpoints:
    """Writes a checkpoint after every `run.checkpoint_every` steps (0: never), and after the step a stop signal
    arrived in (`watch_signals`), then raises `Stopped`."""

    def __init__(self, cfg: TroupeConfig, out_dir: Path, identity: dict) -> None:
        self.out_dir, self.identity = Path(out_dir), identity
        self.every, self.keep = cfg.run.checkpoint_every, cfg.run.keep_checkpoints
        self.last: Path | None = None
        self.stop_signal: int | None = None

    def watch_signals(self):
        return watch_stop_signals(self)

    def due(self, step: int) -> bool:
        return self.stop_signal is not None or (self.every > 0 and (step + 1) % self.every == 0)

    def save(self, group, passes: PairPasses, step: int, extra: dict | None = None) -> Path:
        """The state after `step` (`passes` already points at the next one); `extra` goes into state.json. Raises
        `Stopped` once it is written when a stop signal arrived and steps remain."""
        state = {**(extra or {}), "iteration": step, "data": passes.state_dict(), **self.identity}
        self.last, written = write_checkpoint(
            self.out_dir, step, lambda tmp: group.save_state(str(tmp / LEARNER_DS)), state, self.keep
        )
        log.info("checkpoint %s (%.1f MB in %.1fs)", self.last, written["bytes"] / 1e6, written["write_s"])
        if (
            self.stop_signal is not None and passes.step < passes.total
        ):  # after the last step the job just ends
            raise Stopped(self.stop_signal, self.last)
        return self.last


def restore(group, passes: PairPasses, folder: Path, state: dict) -> None:
    """Give the ranks the (verified) checkpoint's DeepSpeed states and `passes` its data position."""
    passes.load_state_dict(state["data"])  # first: a position for other data is refused before the ranks load
    group.load_state(str(Path(folder) / LEARNER_DS))


def rewind(job, state: dict) -> int:
    """Forget the metrics rows after the checkpoint's step; returns how many steps will be redone."""
    redone = len(job.rewind(state["iteration"]))
    if redone:
        log.warning("resume: %d step(s) after step %d are redone", redone, state["iteration"])
    return redone
