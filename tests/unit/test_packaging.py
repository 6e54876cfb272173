"""The package as pip sees it: one `troupe` namespace whose package list matches the tree, every third-party
import declared in pyproject.toml, the generated CPU lock in agreement with pyproject.toml, and a wheel that carries
the configs and nothing generic at the top level."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.wheel import build_wheel

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SOURCES = {"troupe": ROOT / "troupe", "troupe.actors": ROOT / "actors", "troupe.cluster": ROOT / "cluster"}
# The extras the CPU lock resolves (scripts/lock_cpu.sh); `gpu` is CUDA vLLM, which the CPU lock leaves out.
LOCK_EXTRAS = re.findall(r"--extra (\w+)", (ROOT / "scripts" / "lock_cpu.sh").read_text())


def _requirements(extras=()) -> list[Requirement]:
    project = PYPROJECT["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def _declared() -> dict[str, str]:
    """{canonical distribution: "core" or the extra that declares it}."""
    found = {canonicalize_name(r.name): "core" for r in _requirements()}
    for extra, reqs in PYPROJECT["project"]["optional-dependencies"].items():
        for r in reqs:
            found.setdefault(canonicalize_name(Requirement(r).name), extra)
    return found


def _imports(top_level_only: bool) -> dict[str, set[str]]:
    """{third-party module: files importing it}; top_level_only: imports that run when the module is imported."""
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    seen: dict[str, set[str]] = {}
    for folder in SOURCES.values():
        for path in folder.rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            nodes = tree.body if top_level_only else ast.walk(tree)
            for node in nodes:
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in stdlib and top != "troupe":
                        seen.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return seen


def test_package_list_matches_the_tree():
    """A new sub-package that pyproject.toml does not list would be missing from the wheel."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {"troupe", "troupe.conf"}
    for prefix, folder in SOURCES.items():
        on_disk |= {
            ".".join([prefix, *init.parent.relative_to(folder).parts]) for init in folder.rglob("__init__.py")
        }
    assert listed == on_disk
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {
        "troupe": "troupe",
        "troupe.actors": "actors",
        "troupe.cluster": "cluster",
        "troupe.conf": "conf",
    }


def test_every_third_party_import_is_declared():
    to_dists = importlib.metadata.packages_distributions()
    declared = _declared()
    undeclared = {}
    for module, files in _imports(top_level_only=False).items():
        dists = {canonicalize_name(d) for d in to_dists.get(module, [])}
        if not dists:
            undeclared[module] = f"not installed here, so its distribution is unknown ({sorted(files)[0]})"
        elif not dists & declared.keys():
            undeclared[module] = f"from {sorted(dists)}, imported by {sorted(files)[0]}"
    assert not undeclared, f"imports missing from pyproject.toml: {undeclared}"


def test_module_level_imports_need_no_extra():
    """What runs at import time must come with a plain `pip install troupe-rlhf` (extras are imported lazily, with
    an error naming the extra), except the generator engine, which is one of the `cpu` / `gpu` extras."""
    to_dists = importlib.metadata.packages_distributions()
    declared = _declared()
    needs_extra = {}
    for module, files in _imports(top_level_only=True).items():
        kinds = {declared.get(canonicalize_name(d)) for d in to_dists.get(module, [])}
        if "core" not in kinds and not kinds & {"cpu", "gpu"}:
            needs_extra[module] = (sorted(kinds - {None}), sorted(files))
    assert not needs_extra, f"module-level imports of extras: {needs_extra}"


def _lock() -> dict[str, tuple[Version, bool]]:
    """{distribution: (pinned version, has a hash)} from requirements/cpu-lock.txt."""
    text = (ROOT / "requirements" / "cpu-lock.txt").read_text()
    pins = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        m = re.match(r"([A-Za-z0-9_.\-]+)==([^\s\\;]+)", block.strip())
        if m:
            pins[canonicalize_name(m.group(1))] = (Version(m.group(2)), "--hash=sha256:" in block)
    return pins


def test_cpu_lock_agrees_with_pyproject():
    """Regenerate with scripts/lock_cpu.sh when this fails."""
    pins = _lock()
    env = default_environment()
    problems = []
    pins_in = [Requirement(x) for x in (ROOT / "requirements" / "cpu-pins.in").read_text().splitlines()
               if x.strip() and not x.startswith("#")]  # fmt: skip
    for req in _requirements(LOCK_EXTRAS) + pins_in:
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req} is not in the lock")
        elif not req.specifier.contains(pins[name][0], prereleases=True):
            problems.append(f"{req}: the lock pins {pins[name][0]}")
    assert not problems, problems
    unhashed = sorted(n for n, (_, hashed) in pins.items() if not hashed)
    assert not unhashed, f"lock entries without hashes: {unhashed}"
    # the other way: what the lock says pyproject asked for is still declared there (a dropped dependency)
    declared = {canonicalize_name(r.name) for r in _requirements(LOCK_EXTRAS)}
    text = (ROOT / "requirements" / "cpu-lock.txt").read_text()
    direct = {
        canonicalize_name(m.group(1))
        for block in re.split(r"\n(?=[A-Za-z0-9])", text)
        if "troupe-rlhf (pyproject.toml)" in block and (m := re.match(r"([A-Za-z0-9_.\-]+)==", block.strip()))
    }
    assert direct - declared == set(), (
        f"locked as troupe's own but not in pyproject: {sorted(direct - declared)}"
    )


def test_lock_extras_are_the_ones_pyproject_has():
    assert set(LOCK_EXTRAS) == set(PYPROJECT["project"]["optional-dependencies"]) - {"gpu"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_holds_the_configs_and_one_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"troupe"}
    tracked = subprocess.run(
        ["git", "ls-files", "conf"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    configs = {f"troupe/{p}" for p in tracked.stdout.split() if p.endswith(".yaml")}
    assert (
        len(configs) > 10
        and {n for n in names if n.startswith("troupe/conf/") and n.endswith(".yaml")} == configs
    )
    assert "troupe/cluster/cli.py" in names and "troupe/actors/generator/actor.py" in names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    requires = {canonicalize_name(Requirement(line.split(":", 1)[1]).name) for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")}  # fmt: skip
    assert {"xxhash", "tensorboard", "hydra-core", "ray"} <= requires
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "troupe = troupe.cluster.cli:main" in entry
