"""The wheel as a user installs it: built with `python -m build`, installed into a fresh virtual environment (the
third-party packages come from this one's site-packages, read-only, so nothing is downloaded; troupe itself only from
the wheel), then `troupe train` on the tiny model from an empty folder, and `troupe rm eval --help`."""

import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.integration.conftest import TINY_OVERRIDES
from tests.wheel import build_wheel

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel-install")
    wheel = build_wheel(work)  # from a copy of the tracked files: no stale build/ folder leaks in
    env_dir = work / "env"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # dependencies from this environment; a plain path entry, so its editable troupe finder is not loaded
    (Path(purelib) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return env_dir


def test_the_installed_troupe_comes_from_the_wheel(installed, tmp_path):
    where = subprocess.run(
        [str(installed / "bin" / "python"), "-c", "import troupe, troupe.conf; print(troupe.__file__)"],
        capture_output=True, text=True, cwd=tmp_path, check=True,
    ).stdout.strip()  # fmt: skip
    assert where.startswith(str(installed)) and not where.startswith(str(ROOT) + "/troupe")
    proc = subprocess.run(
        [str(installed / "bin" / "troupe"), "rm", "eval", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and "usage: troupe rm eval" in proc.stdout and "gsm8k" in proc.stdout


def test_troupe_train_runs_from_an_empty_folder(installed, tmp_path):
    proc = subprocess.run(
        [
            str(installed / "bin" / "troupe"),
            "train",
            *TINY_OVERRIDES,
            "run.iterations=1",
            "run.progress_bar=false",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "outputs" / "troupe"
    assert (out / "metrics.jsonl").read_text().count("\n") == 1
    assert (out / "checkpoint-final" / "model.safetensors").exists()
