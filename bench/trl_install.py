"""TRL for bench/vs_trl.py, installed outside troupe's dependencies (.bench-trl/): the versions the lock allows,
refused when they would change a package troupe runs with.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRL_VERSION = "1.16.0"
TRL_REQUIREMENTS = (f"trl=={TRL_VERSION}", "datasets==5.2.0")
LOCK = ROOT / "requirements" / "cpu-lock.txt"


def lock_pins() -> str:
    """requirements/cpu-lock.txt's `name==version` lines without hashes, comments or markers' continuations."""
    pins = [m.group(1) for m in re.finditer(r"^([A-Za-z0-9_.\-\[\],]+==[^\s\\;]+)", LOCK.read_text(), re.M)]
    return "".join(p + "\n" for p in pins)


def installed_trl(target: Path) -> dict | None:
    """The install record of TRL in `target` when it holds TRL_REQUIREMENTS, else None (nothing is installed)."""
    stamp = target / ".bench-trl.json"
    if stamp.exists():
        info = json.loads(stamp.read_text())
        if info.get("requirements") == list(TRL_REQUIREMENTS):
            return {**info, "installed_now": False}
    return None


def ensure_trl(target: Path) -> dict:
    """TRL and the packages it needs that this environment lacks, in `target` (installed once)."""
    info = installed_trl(target)
    if info is not None:
        return info
    pip = [sys.executable, "-m", "pip"]
    started = time.perf_counter()
    # Resolve against this environment with the lock's pins as constraints: the report lists only what is missing.
    # The lock carries hashes, which would switch pip to --require-hashes for TRL too: its pins alone go in.
    constraints = Path(tempfile.mkdtemp(prefix="bench-trl-")) / "constraints.txt"
    constraints.write_text(lock_pins())
    plan = subprocess.run(
        [*pip, "install", "--dry-run", "--quiet", "--report", "-", "-c", str(constraints), *TRL_REQUIREMENTS],
        capture_output=True,
        text=True,
    )
    if plan.returncode != 0:
        raise SystemExit(f"bench/vs_trl: pip could not resolve {TRL_REQUIREMENTS}:\n{plan.stderr[-3000:]}")
    wanted = [(i["metadata"]["name"], i["metadata"]["version"]) for i in json.loads(plan.stdout)["install"]]
    changed = []
    for name, version in wanted:
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        changed.append(f"{name} {have} -> {version}")
    if changed:
        raise SystemExit(
            "bench/vs_trl: installing TRL would change packages troupe runs with: "
            + ", ".join(changed)
            + ". Refusing; pick TRL_REQUIREMENTS that fit requirements/cpu-lock.txt."
        )
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pins = [f"{n}=={v}" for n, v in wanted]
    print(f"bench/vs_trl: installing {' '.join(pins)} into {target} (once)", flush=True)
    done = subprocess.run(
        [*pip, "install", "--quiet", "--no-deps", "--target", str(tmp), *pins], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"bench/vs_trl: installing {pins} failed:\n{done.stderr[-3000:]}")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    info = {
        "requirements": list(TRL_REQUIREMENTS),
        "packages": pins,
        "install_s": round(time.perf_counter() - started, 1),
        "size_mb": round(sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) / 2**20, 1),
    }
    (target / ".bench-trl.json").write_text(json.dumps(info, indent=1))
    return {**info, "installed_now": True}
