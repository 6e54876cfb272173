"""One CLI grammar: `troupe <command> [--config-name RECIPE] overrides`, help per command, config errors as one
message, old spellings with a one-line deprecation, and a default reward that fits the data."""

import subprocess
import sys
from pathlib import Path

import pytest

from troupe.cluster.cli import COMMANDS, split_command
from troupe.cluster.config.checks import ConfigError
from troupe.cluster.config.compose import compose, groups, recipes

TROUPE = Path(sys.executable).with_name("troupe")


def _troupe(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(TROUPE), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize(
    "argv, command, rest",
    [
        (["rm", "eval", "rm.bundle=b"], "rm eval", ["rm.bundle=b"]),
        (["best-of-n", "best_of_n.n=2"], "best-of-n", ["best_of_n.n=2"]),
        (["run.iterations=2"], "train", ["run.iterations=2"]),  # no command: train
        (["--config-name", "demo"], "train", ["--config-name", "demo"]),
        (["+reward.objectives.x={}"], "train", ["+reward.objectives.x={}"]),
        (["dpo", "dataset.path=p"], "dpo", ["dataset.path=p"]),
    ],
)
def test_commands_split_from_their_overrides(argv, command, rest):
    assert split_command(argv) == (command, rest)


def test_every_command_has_help_listing_recipes_and_groups(tmp_path):
    for name in COMMANDS:
        proc = _troupe(*name.split(), "--help", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert f"usage: troupe {name}" in proc.stdout
        assert "demo" in proc.stdout and "gsm8k" in proc.stdout  # recipes
        assert "algo: " in proc.stdout and "grpo" in proc.stdout and "reward: answers, open" in proc.stdout
    top = _troupe("--help", cwd=tmp_path)
    assert all(name in top.stdout for name in [*COMMANDS, "plot", "fleet", "rm data"])


def test_a_config_error_is_one_message_without_traceback(tmp_path):
    proc = _troupe("train", "run.iterashuns=3", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("troupe: error: ") and "iterashuns" in proc.stderr
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    proc = _troupe("rm", "eval", cwd=tmp_path)  # a cross-field check, after composition
    assert proc.returncode == 2 and "rm.bundle" in proc.stderr and "Traceback" not in proc.stderr
    proc = _troupe("trian", cwd=tmp_path)
    assert proc.returncode == 2 and "unknown command 'trian'" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written for a refused command (no Hydra output folders)


def test_old_spellings_warn_once_and_still_work(tmp_path):
    proc = _troupe("job=rm_eval", "--print-config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "`job=rm_eval` is deprecated; use `troupe rm eval ...`" in proc.stderr
    assert "\njob: rm_eval" in proc.stdout
    proc = _troupe("algo=dpo_offline", "dataset.path=p.jsonl", "--print-config", cwd=tmp_path)
    assert "use `troupe dpo ...`" in proc.stderr and "source: dataset" in proc.stdout
    proc = _troupe("rm", "eval", "job=rm_train", cwd=tmp_path)  # a command and a job: refused
    assert proc.returncode == 2 and "the command sets the job" in proc.stderr


def test_a_prompt_file_without_answers_gets_the_open_reward(tmp_path):
    cfg = compose([f"data.train={tmp_path / 'prompts.jsonl'}"])
    assert set(cfg.reward.objectives) == {"length", "repetition"}
    assert set(cfg.reward.weights) == {"length", "repetition"}
    with_answers = compose([f"data.train={tmp_path / 'p.jsonl'}", "data.answer_key=answer"])
    assert "correctness" in with_answers.reward.objectives
    assert "correctness" in compose([]).reward.objectives  # the built-in task has answers
    chosen = compose([f"data.train={tmp_path / 'p.jsonl'}", "reward=answers"])  # the user's choice stands
    assert "correctness" in chosen.reward.objectives


def test_recipes_and_groups_come_from_the_installed_configs():
    assert recipes()[0] == "config" and {"demo", "gsm8k", "chat_armo"} <= set(recipes())
    assert {"algo", "reward", "autoscale"} <= set(groups()) and "ppo" in groups()["algo"]
    with pytest.raises(ConfigError, match="no such recipe"):
        compose([], recipe="nope")


def test_a_recipe_of_the_users_own_starts_from_troupes(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("defaults:\n  - demo\n  - _self_\nrun:\n  iterations: 7\n")
    cfg = compose(["algo=rloo"], recipe=str(recipe))
    assert cfg.run.iterations == 7 and cfg.run.name == "demo" and cfg.algo.name == "rloo"
    with pytest.raises(ConfigError, match="no such file"):
        compose([], recipe=str(tmp_path / "missing.yaml"))
