"""The driver is killed with SIGKILL in the middle of a deterministic run and restarted with `resume=latest`: every
iteration appears once in metrics.jsonl, no prompt is lost, and the final weights equal an uninterrupted run's."""

import json
import os
import signal
import subprocess
import time

import pytest
from safetensors.torch import load_file

from tests.integration.conftest import TINY_OVERRIDES
from tests.integration.test_cli import TROUPE
from troupe.actors.models import resolve_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ITERATIONS = 4
RUN = [
    *TINY_OVERRIDES,
    f"run.iterations={ITERATIONS}",
    "run.checkpoint_every=1",
    "run.keep_checkpoints=2",
    "run.deterministic=true",
    "run.progress_bar=false",
]


def _troupe(out, *extra, timeout=600):
    proc = subprocess.run(
        [str(TROUPE), *RUN, f"run.output_dir={out}", *extra], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _iterations(out):
    return [json.loads(x)["iteration"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    whole, killed = root / "whole", root / "killed"
    _troupe(whole)
    victim = subprocess.Popen(
        [str(TROUPE), *RUN, f"run.output_dir={killed}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes Ray's processes down with it
    )
    marker = killed / "checkpoints" / "iter-000001" / "manifest.json"
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert victim.poll() is None, "the run ended before its checkpoint after iteration 1"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    written_before = _iterations(killed)
    resumed = _troupe(killed, "resume=latest")
    return whole, killed, written_before, resumed


def test_resume_continues_with_each_iteration_once(runs):
    _, killed, written_before, resumed = runs
    assert max(written_before) >= 1  # the kill came after the checkpoint of iteration 1
    assert _iterations(killed) == list(range(ITERATIONS))
    assert "resumed from" in resumed.stdout and "iter-000001" in resumed.stdout


def test_no_prompt_is_lost_across_the_kill(runs):
    _, killed, written_before, _ = runs
    summary = json.loads((killed / "summary.json").read_text())["accounting"]
    assert summary["accounting/lost"] == 0
    assert summary["accounting/trained"] == ITERATIONS * 4  # data.prompts_per_iteration=4
    # rows the killed run wrote after its checkpoint (iteration 2, if it got that far) were redone
    assert summary["accounting/retried"] == 4 * sum(1 for i in written_before if i > 1)


def test_resumed_weights_equal_the_uninterrupted_run(runs):
    whole, killed, _, _ = runs
    a = load_file(str(whole / "checkpoint-final" / "model.safetensors"))
    b = load_file(str(killed / "checkpoint-final" / "model.safetensors"))
    assert a.keys() == b.keys()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    # Deterministic on CPU: the same seeded samples, the restored optimizer and RNG states; bitwise equal here.
    assert diff == 0.0, f"max |w_resumed - w_whole| = {diff}"
    initial = load_file(os.path.join(resolve_model("builtin:tiny-llama"), "model.safetensors"))
    assert max(float((a[k].float() - initial[k].float()).abs().max()) for k in a) > 0  # it trained at all
