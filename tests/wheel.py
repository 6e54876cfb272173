"""Builds troupe's wheel the way a release would, from a copy of the tracked files (so no stale build/ folder or
untracked file of this checkout can leak into it). Shared by the packaging tests."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_wheel(work: Path) -> Path:
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    source = work / "src"
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    for new in ("troupe", "actors", "cluster", "conf"):  # a new module not yet committed counts too
        for path in (ROOT / new).rglob("*"):
            if (
                path.is_file()
                and "__pycache__" not in path.parts
                and not (source / path.relative_to(ROOT)).exists()
            ):
                (source / path.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, source / path.relative_to(ROOT))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(work / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = (work / "dist").glob("troupe_rlhf-*.whl")
    return wheel
