"""One `troupe` run in a fresh process (its own embedded Ray), for benchmarks that compare whole runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run_troupe(config: str, overrides: list[str], out: Path) -> tuple[list[dict], float]:
    """`troupe --config-name <config> <overrides>` writing to `out`; returns its metrics rows and wall seconds."""
    shutil.rmtree(out, ignore_errors=True)  # metrics.jsonl appends: an interrupted attempt must not mix in
    cmd = [
        str(Path(sys.executable).with_name("troupe")),
        "--config-name",
        config,
        f"run.output_dir={out}",
        "run.progress_bar=false",
        *overrides,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()], wall
