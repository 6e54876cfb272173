"""`troupe train` in a process of its own, with one real fault injected at a chosen point (for
test_chaos_driver.py). The faults are the real thing, only their timing is chosen here:

  kill-in-checkpoint-write N   SIGKILL to this process while checkpoint N is written: the learners' parts and
                               state.json are on disk, the manifest is not (once MARKER.go exists: the test
                               keeps this process alive until it has tried a second one on the folder)
  sigterm-group-in-learn N     SIGTERM to this process's whole group while the learners train, in the Nth learn
                               phase of this process (as Slurm or `kill -TERM -<pgid>` stop a job)
  none                         no fault

Run as `python -c "from tests.integration.chaos_child import main; main()" FAULT N MARKER OVERRIDES...`; MARKER
is a JSON file where the fault records when it struck. The caller starts this process in a session of its own:
the group SIGTERM must not reach the test runner.
"""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path


def kill_in_checkpoint_write(at: int, marker: Path) -> None:
    from troupe.cluster.durability import checkpoint

    sign = checkpoint.sign

    def sign_or_die(manifest: dict, key: bytes) -> dict:
        if manifest["iteration"] == at:
            marker.write_text(json.dumps({"killed_in_write_of": at, "files": sorted(manifest["files"])}))
            while not marker.with_suffix(".go").exists():
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        return sign(manifest, key)

    checkpoint.sign = sign_or_die


def sigterm_group_in_learn(at: int, marker: Path) -> None:
    from troupe.cluster.fleet.learners import LearnerGroup

    if os.getpgid(0) != os.getpid():
        raise SystemExit("chaos_child: not the leader of its own process group; refusing to signal the group")
    train, calls, learning = LearnerGroup.train, [0], threading.Event()

    def signal_group() -> None:
        while not learning.is_set():
            time.sleep(0.005)
        time.sleep(0.05)  # the learners have their batch and are working on it
        os.killpg(os.getpgid(0), signal.SIGTERM)
        marker.write_text(json.dumps({"signalled_while_learning": learning.is_set(), "learn_call": at}))

    def train_and_signal(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] != at:
            return train(self, *args, **kwargs)
        threading.Thread(target=signal_group, daemon=True).start()
        learning.set()
        try:
            return train(self, *args, **kwargs)
        finally:
            learning.clear()

    LearnerGroup.train = train_and_signal


FAULTS = {
    "kill-in-checkpoint-write": kill_in_checkpoint_write,
    "sigterm-group-in-learn": sigterm_group_in_learn,
}


def main() -> None:
    fault, at, marker, *overrides = sys.argv[1:]
    if fault != "none":
        FAULTS[fault](int(at), Path(marker))
    from troupe.cluster.cli import main as troupe

    sys.exit(troupe(overrides))
