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


# `--smoke`: the tiny model (the integration tests start from these: tests/integration/conftest.py), so a
# benchmark's whole code path runs in about a minute and a broken one exits non-zero.
SMOKE_MODEL = "builtin:tiny-llama"
SMOKE_OVERRIDES = [
    f"model.policy={SMOKE_MODEL}",
    "data.prompts_per_iteration=4",
    "generator.samples_per_prompt=4",  # groups of 4: some group almost surely has unequal rewards
    "generator.max_new_tokens=16",
    "generator.max_model_len=512",
    "generator.num_cpus=0.5",
    "learner.world_size=2",  # the multi-rank paths (ZeRO, gradient reduction, shares) stay under test
    "learner.omp_threads=1",
    "learner.micro_batch_size=2",
    "learner.lr=1e-3",
    "learner.zero_stage=2",
    "ray.num_cpus=2",
    "ray.actor_timeout_s=300",
]


def smoke_out(out: str | None, name: str) -> Path:
    """Where a smoke run writes: --out when given, else a fresh temporary folder."""
    import tempfile

    path = Path(out) if out else Path(tempfile.mkdtemp(prefix=f"bench-smoke-{name}-"))
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()
