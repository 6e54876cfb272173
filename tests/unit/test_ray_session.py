"""The embedded Ray's processes start in a session of their own: a SIGTERM to the driver's group misses them."""

import os
import subprocess
import sys

import pytest
from ray._private import services, utils

from troupe.cluster.run.runtime import own_session

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not utils.detect_fate_sharing_support(),
    reason="Ray keeps its processes in the driver's group where the kernel cannot end them with it",
)


def test_processes_ray_starts_inside_get_their_own_session_and_the_patch_is_undone():
    ours = services.ConsolePopen
    probe = [sys.executable, "-c", "import os; print(os.getsid(0), os.getpgid(0))"]
    with own_session():
        child = services.ConsolePopen(probe, stdout=subprocess.PIPE, text=True)
        out, _ = child.communicate(timeout=60)
    sid, pgid = (int(x) for x in out.split())
    assert sid == pgid == child.pid and sid != os.getsid(0)
    assert services.ConsolePopen is ours
