"""One CLI grammar: `troupe <command> [--config-name RECIPE] overrides`, help per command, config errors as one
message, old spellings with a one-line deprecation, and a default reward that fits the data."""

import subprocess
import sys
from pathlib import Path

import pytest

from troupe.cluster.cli import COMMANDS, main, parse_options, split_command
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
    # sizing the reward pool chooses no reward; adding an objective does
    sized = compose([f"data.train={tmp_path / 'p.jsonl'}", "reward.shards=2"])
    assert set(sized.reward.objectives) == {"length", "repetition"} and sized.reward.shards == 2
    own = compose([f"data.train={tmp_path / 'p.jsonl'}", "reward.weights.correctness=2.0"])
    assert own.reward.weights["correctness"] == 2.0 and "correctness" in own.reward.objectives
    # a user's recipe on troupe's defaults adapts like the default recipe; one that sets its reward does not
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"defaults:\n  - config\n  - _self_\ndata:\n  train: {tmp_path / 'p.jsonl'}\n")
    assert set(compose([], recipe=str(mine)).reward.objectives) == {"length", "repetition"}
    assert "correctness" in compose([f"data.train={tmp_path / 'p.jsonl'}"], recipe="demo").reward.objectives


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
    shadow = tmp_path / "demo.yaml"  # named like troupe's: Hydra would find it for `- demo` and recurse
    shadow.write_text("defaults:\n  - demo\n  - _self_\n")
    with pytest.raises(ConfigError, match="holds demo.yaml, named like troupe.s own, which Hydra would read"):
        compose([], recipe=str(shadow))
    shadow.unlink()
    (tmp_path / "reward").mkdir()
    (tmp_path / "reward" / "mine.yaml").write_text("# @package reward\nweights: {length: 2.0}\n")
    assert (
        compose(["reward=mine"], recipe=str(recipe)).reward.weights["length"] == 2.0
    )  # a group option of one's own
    (tmp_path / "reward" / "open.yaml").write_text("# @package reward\n")
    with pytest.raises(ConfigError, match="holds reward/open.yaml"):
        compose([], recipe=str(recipe))


def test_hydra_config_path_spelling_names_the_users_file(tmp_path, capsys):
    for args in (
        ["-cp", str(tmp_path), "-cn", "mine"],
        [f"--config-path={tmp_path}", "--config-name", "mine.yaml"],
    ):
        recipe, overrides, _, _ = parse_options([*args, "run.iterations=3"])
        assert recipe == str(tmp_path / "mine.yaml") and overrides == ["run.iterations=3"]
    assert parse_options(["run.iterations=3"])[0] == "config"
    with pytest.raises(SystemExit):
        parse_options(["-cp", str(tmp_path)])  # a folder without the file's name
    assert parse_options(["-cp", str(tmp_path), "-cn", "config"])[0] == str(tmp_path / "config.yaml")
    (tmp_path / "mine.yaml").write_text("defaults:\n  - demo\n  - _self_\nrun:\n  iterations: 5\n")
    assert main(["train", "-cp", str(tmp_path), "-cn", "mine", "--print-config"]) == 0
    assert "iterations: 5" in capsys.readouterr().out


def test_dpo_refuses_an_online_algorithm(capsys):
    with pytest.raises(SystemExit) as refused:
        main(["dpo", "dataset.path=p.jsonl", "algo=ppo"])
    assert refused.value.code == 2
    assert "algo=ppo: `troupe dpo` is offline DPO" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["dpo", "dataset.path=p.jsonl", "algo.name=grpo"])
    capsys.readouterr()
    assert main(["dpo", "dataset.path=p.jsonl", "algo=dpo_offline", "--print-config"]) == 0
    assert "source: dataset" in capsys.readouterr().out


def test_no_command_prints_usage_to_stderr_and_fails(capsys):
    assert main([]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("usage: troupe <command>")
    assert main(["rm"]) == 2 and "troupe rm train | eval" in capsys.readouterr().err


def test_python_dash_m_troupe_is_the_troupe_command(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "troupe", "rm", "eval", "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0 and proc.stdout.startswith("usage: troupe rm eval"), proc.stderr


class _FakeRay:
    """Stands in for the ray module in sys.modules: up or not, and whether shutdown was called."""

    def __init__(self, up: bool) -> None:
        self.up, self.shutdowns = up, 0

    def is_initialized(self) -> bool:
        return self.up

    def shutdown(self) -> None:
        self.shutdowns += 1
        self.up = False


def test_a_ray_the_caller_started_is_left_running(tmp_path, monkeypatch, capsys):
    """`main()` called from Python (tests, notebooks) inside a caller's Ray must not shut that Ray down; a Ray the
    command started itself is stopped at its end."""
    from troupe.cluster import cli

    callers = _FakeRay(up=True)
    monkeypatch.setitem(sys.modules, "ray", callers)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "learner.zero_stage=7"]) != 0  # a config error: through the command's finally
    assert callers.shutdowns == 0 and callers.up
    ours = _FakeRay(up=True)  # up by the time the command ends, as the embedded Ray it started
    monkeypatch.setitem(sys.modules, "ray", ours)
    cli._stop_ray(callers=False)
    assert ours.shutdowns == 1
