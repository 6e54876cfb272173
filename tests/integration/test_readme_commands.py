"""Every command in README.md, run as a user runs it, on tiny settings.

Commands come from the README's ```bash blocks (continuation lines joined, comments dropped) and its ```python
block; each README section runs in its own empty working directory, its commands in order, so a section that
builds a file for the next command (a reward bundle, a checkpoint, a run folder) is followed as written. What makes
them tiny is appended (`TINY`, and `TINY_DEFAULTS` where the command does not set the key). A command that cannot
run on this machine (a hub download, a cloud cluster, a Docker engine) must match `ELSEWHERE`, which names the test
that covers it instead; any other command that is not run fails `test_every_readme_command_is_run_or_covered`.
Inline commands in the prose must appear in a block or in `ELSEWHERE` too."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
CLUSTER_FILE = (
    Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
)  # where `ray start` records its head
# Appended to every train/dpo/best-of-n command (later overrides win): short runs of a tiny random model.
TINY = ["run.iterations=2", "generator.max_new_tokens=16", "eval.prompts=4", "run.progress_bar=false"]
# Appended only where the command does not set the key itself.
TINY_DEFAULTS = {
    "model.policy": "builtin:tiny-llama",
    "generator.max_model_len": "512",
    "generator.num_cpus": "0.5",
    "data.prompts_per_iteration": "4",
    "ray.num_cpus": "2",
    "rm.backbone": "builtin:tiny-llama",
    "rm.allow_chance": "true",  # a tiny random backbone carries no preference signal: its gate ends at chance
}
ELSEWHERE = {
    r"^make test$": "the suite itself",
    r"^make test-fast$": "the unit tests, which this suite runs",
    r"^make bench(-[a-z]+)?$": "tests/integration/test_bench_smoke.py runs every benchmark's --smoke mode",
    r"^\.venv/bin/python -m bench\.": "tests/integration/test_bench_smoke.py runs every benchmark's --smoke mode",
    r"^pip install ": "tests/integration/test_wheel_install.py installs the wheel; test_packaging checks the lock",
    r"^source \.venv/bin/activate$": "shell set-up",
    r"^huggingface-cli download ": "needs the hub; tests/unit/test_rm_import.py imports a checkpoint of that layout",
    r"^troupe rm import rm\.checkpoint=ArmoRM-Llama3-8B-v0\.1": "the 8B download above; test_rm_import covers it",
    r"reward\.experts\.armo\.bundle=outputs/armorm": "an 8B bundle on a GPU; the RM section runs the same recipe",
    r"^tensorboard --logdir": "a server; test_cli reads the event files",
    r"^troupe inspect ": "tests/integration/test_user_rewards.py runs it on a run's rollouts.jsonl",
    r"^mlflow ui ": "a server; tests/unit/test_trackers.py reads the runs back with MlflowClient",
    r"^(ray up|kubectl apply|sbatch)( |$)": "tests/unit/test_deploy.py checks the recipes against their schemas",
    r"^\.venv/bin/troupe$": "`troupe` in the checkout's environment, which these tests run",
    r"^docker (build|push|run) ": "no Docker engine here; tests/unit/test_docker.py lints the Dockerfiles",
    r"^troupe train --config-name agent_demo$": "tests/integration/test_agent_run.py runs a multi-turn run end to "
    "end (async, partial rollouts, a generator killed); test_config_domains validates the recipe (suite time)",
}


def sections() -> dict[str, list[str]]:
    """{section heading: its commands (bash lines, and "python:" + the source of a python block)}."""
    out: dict[str, list[str]] = {}
    heading = "top"
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            heading = line.lstrip("#").strip()
        elif line.startswith("```bash") or line.startswith("```python"):
            block = []
            i += 1
            while not lines[i].startswith("```"):
                block.append(lines[i])
                i += 1
            if line.startswith("```python"):
                out.setdefault(heading, []).append("python:" + "\n".join(block))
            else:
                out.setdefault(heading, []).extend(_bash_commands(block))
        i += 1
    return out


def _bash_commands(block: list[str]) -> list[str]:
    commands, current = [], ""
    for raw in block:
        line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            current += line[:-1].strip() + " "
            continue
        current += line.strip()
        if current:
            commands.append(current)
        current = ""
    return commands


def inline_commands() -> list[str]:
    words = r"troupe|make|pip|ray up|kubectl|sbatch|docker|curl|tensorboard|mlflow ui|\.venv/bin/[\w-]+"
    found = re.findall(rf"`((?:{words})(?: [^`]*)?)`", README.read_text())
    return [c for c in found if not any(s in c for s in ("<", "...", " / "))]


def _elsewhere(command: str) -> str | None:
    return next((why for pattern, why in ELSEWHERE.items() if re.search(pattern, command)), None)


def _runnable(command: str) -> bool:
    return command.startswith(
        ("troupe ", "curl ", "python:", "make demo", "make lint", "ray start ", "ray stop")
    )


def test_every_readme_command_is_run_or_covered():
    block_commands = [c for commands in sections().values() for c in commands]
    assert len(block_commands) >= 20, "README.md: fewer command blocks than expected (did the parser break?)"
    orphans = [c for c in block_commands if not _runnable(c) and _elsewhere(c) is None]
    assert not orphans, f"README commands that no test runs or covers: {orphans}"
    inline = [c for c in inline_commands() if c not in block_commands and _elsewhere(c) is None]
    inline = [c for c in inline if not any(b.startswith(c) for b in block_commands)]
    assert not inline, f"README inline commands in no block and not covered: {inline}"
    # `make demo` is the demo recipe, which the quick-start section runs
    assert re.search(
        r"^demo:.*\n\t\$\(BIN\)/troupe train --config-name demo run\.overwrite=true$",
        (ROOT / "Makefile").read_text(),
        re.M,
    )


def _tiny(command: list[str]) -> list[str]:
    if command[1:2] in (["plot"], ["fleet"]) or command[1:3] in (["rm", "data"], ["rm", "import"]):
        return command  # not Hydra-configured, or nothing to make tiny
    keys = {a.split("=", 1)[0].lstrip("+~") for a in command if "=" in a}
    extra = [] if command[1:3] == ["rm", "serve"] else list(TINY)
    if command[1:2] == ["rm"]:
        extra = [e for e in extra if not e.startswith(("generator.", "eval."))]
    extra += [f"{k}={v}" for k, v in TINY_DEFAULTS.items() if k not in keys]
    return command + extra


def _fixtures(folder: Path) -> None:
    """The files the README's commands name, built from ../shared/data where the README says they come from."""
    prompts = [f"Write a short note about the number {i}." for i in range(12)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    questions = [
        {"question": f"Ava has {i} apples and buys 2 more. How many now?", "answer": i + 2} for i in range(6)
    ]
    (folder / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    pairs = [
        {"prompt": f"Q{i}?", "chosen": f"The answer is {i}.", "rejected": "no " * (i + 3)} for i in range(16)
    ]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    gsm8k = SHARED_DATA / "grade-school-math" / "grade_school_math" / "data" / "train.jsonl"
    if gsm8k.exists():
        rows = gsm8k.read_text().splitlines()
        (folder / "gsm8k_train.jsonl").write_text("\n".join(rows[:16]) + "\n")
        (folder / "gsm8k_dev.jsonl").write_text("\n".join(rows[16:24]) + "\n")
    ifeval = SHARED_DATA / "IFEval" / "data" / "input_data.jsonl"
    if ifeval.exists():
        from datasets import Dataset

        rows = [json.loads(line) for line in ifeval.read_text().splitlines()[:12]]
        Dataset.from_list(rows).save_to_disk(str(folder / "ifeval_ds"))
    arena = SHARED_DATA / "arena-hard-auto" / "data" / "arena-hard-v0.1" / "question.jsonl"
    if arena.exists():
        shutil.copy(arena, folder / "question.jsonl")


def _env() -> dict:
    return dict(
        os.environ, PATH=f"{BIN}:{os.environ['PATH']}", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )


def _run(folder: Path, command: str) -> subprocess.CompletedProcess:
    if command.startswith("python:"):
        argv = [sys.executable, "-c", command[len("python:") :]]
    elif command == "make demo":
        argv = _tiny(["troupe", "train", "--config-name", "demo", "run.overwrite=true"])
    elif command == "make lint":
        # this environment as the Makefile's, taken as up to date (-o): a lint run never reinstalls it
        argv, folder = (
            [
                "make",
                "-o",
                f"{BIN.parent}/.installed",
                "lint",
                f"BIN={BIN}",
                f"STAMP={BIN.parent}/.installed",
            ],
            ROOT,
        )
    else:
        argv = shlex.split(command)
        argv = _tiny(argv) if argv[0] == "troupe" else argv
    proc = subprocess.run(argv, cwd=folder, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _needs_data(commands: list[str]) -> bool:
    return any(name in c for c in commands for name in ("gsm8k_", "ifeval_ds", "shared/data"))


def _serve(folder: Path, command: str):
    """`troupe rm serve` stays up: started in the background, ready when /health answers."""
    argv = _tiny(shlex.split(command))
    server = subprocess.Popen(
        argv,
        cwd=folder,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    port = next((a.split("=", 1)[1] for a in argv if a.startswith("serve.port=")), "8008")
    deadline = time.time() + 300
    while time.time() < deadline:
        assert server.poll() is None, f"{command} exited: {server.stdout.read()[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(2)
    os.killpg(server.pid, signal.SIGKILL)
    raise AssertionError(f"{command}: no /health answer within 300 s")


def _ray_head(folder: Path, command: str):
    """`ray start --head` held in the foreground (--block), so the test stops this cluster alone: a plain
    `ray stop` would also end the suite's own Ray on this machine. Up once it says it blocks (`ray status`
    cannot tell: it does not read the token Ray 2.60 sets on local clusters)."""
    log = folder / "ray-head.log"
    with log.open("w") as out:
        head = subprocess.Popen(
            [*shlex.split(command), "--block", "--disable-usage-stats"],
            cwd=folder,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.time() + 120
    while time.time() < deadline:
        assert head.poll() is None, f"{command} exited: {log.read_text()[-3000:]}"
        if "block forever" in log.read_text():
            head.cluster_file = CLUSTER_FILE.read_text() if CLUSTER_FILE.exists() else None
            return head
        time.sleep(1)
    os.killpg(head.pid, signal.SIGKILL)
    raise AssertionError(f"{command}: not up within 120 s: {log.read_text()[-3000:]}")


def _stop_head(head: subprocess.Popen | None) -> None:
    """What `ray stop` does for this head: end it, and forget it as the machine's current cluster (a later
    `ray.init()` would otherwise try to join the address Ray left there)."""
    if head is None:
        return
    _stop(head, signal.SIGTERM)
    if (
        head.cluster_file is not None
        and CLUSTER_FILE.exists()
        and CLUSTER_FILE.read_text() == head.cluster_file
    ):
        CLUSTER_FILE.unlink()


def _stop(process: subprocess.Popen | None, sig: int) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # each runs in a session of its own: its children go too


SECTIONS = {name: commands for name, commands in sections().items() if any(_runnable(c) for c in commands)}


@pytest.mark.parametrize("section", list(SECTIONS))
def test_readme_section_runs_as_written(section, tmp_path):
    commands = [c for c in SECTIONS[section] if _runnable(c) and _elsewhere(c) is None]
    if _needs_data(commands) and not SHARED_DATA.exists():
        pytest.skip(f"needs ../shared/data ({SHARED_DATA}), absent here")
    # the README's relative paths (../shared/data) as in a checkout beside ../shared
    work = tmp_path / "work"
    work.mkdir()
    if SHARED_DATA.exists():
        (tmp_path / "shared").symlink_to(SHARED_DATA.parent, target_is_directory=True)
    _fixtures(work)
    server = head = None
    try:
        for command in commands:
            if command.startswith("troupe rm serve"):
                server = _serve(work, command)
            elif command.startswith("ray start "):
                head = _ray_head(work, command)
            elif command == "ray stop":
                _stop_head(head)
                head = None
            else:
                proc = _run(work, command)
                if command.startswith("curl "):
                    assert json.loads(proc.stdout)["results"][0]["objectives"], proc.stdout
    finally:
        _stop(server, signal.SIGINT)
        _stop_head(head)
