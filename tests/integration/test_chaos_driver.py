"""Chaos to the driver process itself, end to end through `troupe train` (each launch a process of its own, with
its own embedded Ray; chaos_child.py injects the faults):

  A  a fresh run, SIGKILLed in the middle of writing checkpoint 2;
  B  while A runs, the same command on the same folder: refused, naming A;
  C  resume=latest, with periodic checkpoints now every 10 iterations (an intended change, allowed): takes
     checkpoint 1 (not A's partial write), and is stopped by a SIGTERM to its whole process group in the middle of
     its first learn phase: it finishes iteration 2, writes checkpoint 2 (not due) and exits 143;
  D  resume=latest: runs iterations 3 to 5 to the end.

Every iteration appears once in the metrics and the accounting loses no prompt.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import TINY_OVERRIDES
from troupe.cluster.durability.checkpoint import complete, verify

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ITERATIONS = 6
REPO = Path(__file__).resolve().parents[2]


def launch(fault: str, at: int, marker: Path, overrides: list[str], log: Path) -> subprocess.Popen:
    code = "from tests.integration.chaos_child import main; main()"
    with log.open("w") as sink:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-c", code, fault, str(at), str(marker), *overrides],
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its group is its own: the group SIGTERM stays inside it
        )


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> dict:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return {"rc": proc.returncode, "output": log.read_text()}


def lock_holder(out: Path, timeout: float = 120) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            return json.loads((out / ".troupe.lock").read_text())
        except (FileNotFoundError, ValueError):
            time.sleep(0.05)
    raise AssertionError(f"no process claimed {out} within {timeout}s")


def checkpoint_names(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chaos_driver")
    out = folder / "run"
    command = [
        *TINY_OVERRIDES,
        f"run.output_dir={out}",
        f"run.iterations={ITERATIONS}",
        "run.checkpoint_every=1",
        "run.keep_checkpoints=3",
        "run.progress_bar=false",
    ]
    facts = {}
    a = launch("kill-in-checkpoint-write", 2, folder / "a.json", command, folder / "a.log")
    facts["holder"] = lock_holder(out)
    b = launch("none", 0, folder / "b.json", command, folder / "b.log")
    facts["b"] = finish(b, folder / "b.log", timeout=300)
    (folder / "a.go").touch()  # A may die now (it waits in its checkpoint write)
    facts["a"] = finish(a, folder / "a.log")
    facts["a_marker"] = json.loads((folder / "a.json").read_text())
    facts["after_kill"] = checkpoint_names(out)
    facts["rows_after_kill"] = [
        json.loads(x)["iteration"] for x in (out / "metrics.jsonl").read_text().splitlines()
    ]
    resume = [
        *command,
        "run.checkpoint_every=10",
        "resume=latest",
        "resume_allow_changes=[run.checkpoint_every]",
    ]
    c = launch("sigterm-group-in-learn", 1, folder / "c.json", resume, folder / "c.log")
    facts["c"] = finish(c, folder / "c.log")
    facts["c_marker"] = json.loads((folder / "c.json").read_text())
    facts["after_sigterm"] = checkpoint_names(out)
    d = launch("none", 0, folder / "d.json", resume, folder / "d.log")
    facts["d"] = finish(d, folder / "d.log")
    facts["rows"] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return out, a.pid, facts


def test_a_second_process_on_the_folder_is_refused_naming_the_holder(launches):
    _, a_pid, facts = launches
    assert facts["holder"]["pid"] == a_pid
    b = facts["b"]
    assert b["rc"] == 2, b["output"][-3000:]
    assert f"is in use by another troupe process (host {facts['holder']['host']}, pid {a_pid}" in b["output"]
    assert "Traceback" not in b["output"]


def test_a_kill_during_a_checkpoint_write_leaves_the_earlier_checkpoints_whole(launches):
    out, a_pid, facts = launches
    assert facts["a"]["rc"] == -signal.SIGKILL, facts["a"]["output"][-3000:]
    assert facts["a_marker"]["killed_in_write_of"] == 2 and "state.json" in facts["a_marker"]["files"]
    partial = [n for n in facts["after_kill"] if n.endswith(".tmp")]
    assert partial == [f"iter-000002.{facts['holder']['host']}-{a_pid}.tmp"]  # the parts, no manifest
    assert [n for n in facts["after_kill"] if not n.endswith(".tmp")] == ["iter-000000", "iter-000001"]
    assert facts["rows_after_kill"] == [0, 1, 2]  # iteration 2's row came before its checkpoint


def test_a_group_sigterm_while_learning_ends_with_a_complete_checkpoint(launches):
    out, _, facts = launches
    c = facts["c"]
    assert c["rc"] == 128 + signal.SIGTERM, c["output"][-3000:]
    assert facts["c_marker"]["signalled_while_learning"]
    assert "stopped by signal 15; resume with resume=" in c["output"]
    # resumed from 1 (not the partial 2), learnt 2 and saved it; the dead writer's partial folder was cleaned up
    assert facts["after_sigterm"] == ["iter-000000", "iter-000001", "iter-000002"]


def test_the_run_finishes_with_every_iteration_once_and_nothing_lost(launches):
    out, _, facts = launches
    assert facts["d"]["rc"] == 0, facts["d"]["output"][-3000:]
    rows = facts["rows"]
    assert [r["iteration"] for r in rows] == list(range(ITERATIONS))
    last = rows[-1]
    assert last["weight_version"] == ITERATIONS
    assert last["accounting/lost"] == 0 and last["accounting/in_flight"] == 0
    # data.prompts_per_iteration=4, each batch trained once
    assert last["accounting/trained"] == ITERATIONS * 4
    assert [p.name for p in complete(out / "checkpoints")] == ["iter-000000", "iter-000001", "iter-000002"]
    assert verify(out / "checkpoints" / "iter-000002")["iteration"] == 2
    final = json.loads((out / "checkpoint-final" / "troupe_state.json").read_text())
    assert final["run_id"] == json.loads((out / "run.json").read_text())["run_id"]  # one run, 3 launches
    assert final["weight_version"] == ITERATIONS
    assert (out / "checkpoint-final" / "model.safetensors").is_file()
