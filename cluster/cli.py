"""The `troupe` command: one grammar, `troupe <command> [--config-name RECIPE] [key=value ...]`.

    troupe train | dpo | rm train | rm eval | rm import | rm serve | rm data | best-of-n | plot | inspect | fleet |
           checkpoint trust

The Hydra-configured commands take overrides of the typed schema after the subcommand; `troupe <overrides>` with no
subcommand means `troupe train`; `-m` sweeps (Hydra's multirun, cluster/config/sweep.py). A config error prints its
message alone and exits 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, fields

DEPRECATED_JOBS = {"rl": "train", "rm_train": "rm train", "rm_eval": "rm eval", "rm_import": "rm import",
                   "rm_serve": "rm serve"}  # fmt: skip


@dataclass(frozen=True)
class Command:
    name: str  # as typed: "rm eval"
    job: str  # the schema's `job`
    summary: str
    example: str
    prefix: tuple[str, ...] = ()  # overrides applied before the user's
    sections: tuple[str, ...] = ()  # the config sections this command reads, listed first by --help


COMMANDS = {
    c.name: c
    for c in (
        Command(
            "train",
            "rl",
            "RL training: generators sample, the reward fleet scores, the learners update (GRPO by default; "
            "algo=ppo|rloo|dr_grpo|reinforce|reinforce_pp|dpo_online)",
            "troupe train --config-name demo algo=rloo run.iterations=20",
            sections=("run", "model", "data", "generator", "reward", "algo", "learner", "eval"),
        ),
        Command(
            "dpo",
            "rl",
            "offline DPO on a preference file, with the learner group alone",
            "troupe dpo dataset.path=pairs.jsonl run.iterations=2",
            prefix=("algo=dpo_offline",),
            sections=("dataset", "model", "learner", "algo", "run"),
        ),
        Command(
            "rm train",
            "rm_train",
            "train a reward model: rm.stage=regression|gating (ArmoRM), probe (frozen linear Bradley-Terry), "
            "bt|haf (fine-tuned on the learner group)",
            "troupe rm train rm.stage=haf dataset.path=pairs.jsonl",
            sections=("rm", "dataset", "learner", "run"),
        ),
        Command(
            "rm eval",
            "rm_eval",
            "pairwise accuracy of a reward bundle on preference pairs (per subset, group and section)",
            "troupe rm eval rm.bundle=outputs/troupe/rm-armo dataset.path=test.jsonl",
            sections=("rm", "dataset", "run"),
        ),
        Command(
            "rm import",
            "rm_import",
            "turn a local ArmoRM checkpoint (RLHFlow/ArmoRM-Llama3-8B-v0.1 layout) into a reward bundle",
            "troupe rm import rm.checkpoint=ArmoRM-Llama3-8B-v0.1 rm.output=outputs/armorm",
            sections=("rm",),
        ),
        Command(
            "rm serve",
            "rm_serve",
            "serve the configured reward fleet over HTTP on loopback (POST /score, GET /health)",
            "troupe rm serve --config-name demo serve.port=8008",
            sections=("serve", "reward", "ray"),
        ),
        Command(
            "best-of-n",
            "best_of_n",
            "sample N responses per prompt and keep the one a running `troupe rm serve` scores best",
            "troupe best-of-n best_of_n.prompts=prompts.jsonl data.prompt_key=question best_of_n.n=8",
            sections=("best_of_n", "model", "generator", "data"),
        ),
    )
}
PLAIN = {
    "plot": "PNG charts of a run from its metrics.jsonl: troupe plot <run_dir>",
    "inspect": "the best and worst samples of a run with their reward breakdown: troupe inspect <run_dir>",
    "fleet": "resize a running run's pools: troupe fleet <run_dir> generators=N reward.<pool>=M",
    "rm data": "build reward-model files from public data: troupe rm data --help",
    "checkpoint trust": "sign a run checkpoint made elsewhere with this machine's key: troupe checkpoint trust <dir>",
}

GROUPS = {"rm": "train | eval | import | serve | data", "checkpoint": "trust"}  # two-word commands


def usage() -> str:
    width = max(len(n) for n in [*COMMANDS, *PLAIN]) + 2
    lines = ["usage: troupe <command> [--config-name RECIPE] [key=value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}{c.summary}" for name, c in COMMANDS.items()]
    lines += [f"  {name:<{width}}{text}" for name, text in PLAIN.items()]
    lines += ["", "`troupe <key=value ...>` with no command means `troupe train`.",
              "`-m key=a,b ...` (multirun) runs one job per combination, job N in <run.output_dir>/<N>_<key=value>.",
              "`troupe <command> --help` lists its recipes, config groups and config sections."]  # fmt: skip
    return "\n".join(lines)


def command_help(command: Command) -> str:
    from troupe.cluster.config.compose import groups, recipes
    from troupe.cluster.config.schema import TroupeConfig

    sections = [f.name for f in fields(TroupeConfig) if f.name not in ("job",)]
    first = [s for s in command.sections if s in sections]
    lines = [
        f"usage: troupe {command.name} [--config-name RECIPE] [-m] [key=value ...] [--print-config]",
        "",
        command.summary,
        "",
        f"example: {command.example}",
        "",
        f"recipes (--config-name): {', '.join(recipes())}, or the path of your own .yaml (defaults: [demo, _self_])",
        "config groups (group=option):",
        *(f"  {g}: {', '.join(options)}" for g, options in groups().items()),
        f"config sections this command reads: {', '.join(first)}",
        f"all sections: {', '.join(sections)}",
        "Each section's keys, types and defaults: troupe.cluster.config.schema (print them with --print-config).",
    ]
    return "\n".join(lines)


def split_command(argv: list[str]) -> tuple[str, list[str]]:
    """("rm eval", rest) from the words before the first option or override; "train" when there are none."""
    if argv and argv[0] in GROUPS and len(argv) > 1 and f"{argv[0]} {argv[1]}" in {*COMMANDS, *PLAIN}:
        return f"{argv[0]} {argv[1]}", argv[2:]
    if argv and argv[0] in GROUPS:
        return argv[0], argv[1:]
    if argv and (argv[0] in COMMANDS or argv[0] in PLAIN):
        return argv[0], argv[1:]
    if argv and not any(c in argv[0] for c in "=+~") and not argv[0].startswith("-"):
        raise SystemExit(_fail(f"unknown command {argv[0]!r}\n\n{usage()}"))
    return "train", argv


# Hydra's multirun: one job per combination of the swept values (cluster/config/sweep.py)
MULTIRUN = ("-m", "--multirun")
# options that take a value: Hydra's long and short spellings
VALUE_OPTIONS = {
    "--config-name": "recipe",
    "-cn": "recipe",
    "--config-path": "config_path",
    "-cp": "config_path",
}


def parse_options(args: list[str]) -> tuple[str, list[str], bool, bool]:
    """(recipe, overrides, help, print_config). `--config-path DIR --config-name NAME` names DIR/NAME.yaml."""
    from troupe.cluster.config.compose import DEFAULT_RECIPE

    values, overrides, want_help, print_config = (
        {"recipe": DEFAULT_RECIPE, "config_path": None},
        [],
        False,
        False,
    )
    i = 0
    while i < len(args):
        arg = args[i]
        option, has_value, value = arg.partition("=") if arg.startswith("--") else (arg, False, None)
        if arg in ("-h", "--help"):
            want_help = True
        elif arg == "--print-config" or (arg == "--cfg" and i + 1 < len(args) and args[i + 1] == "job"):
            print_config = True
            i += arg == "--cfg"
        elif option in VALUE_OPTIONS:
            if not has_value:
                if i + 1 == len(args):
                    raise SystemExit(_fail(f"{arg} needs a value"))
                i, value = i + 1, args[i + 1]
            values[VALUE_OPTIONS[option]] = value
        elif arg.startswith("-"):
            raise SystemExit(
                _fail(
                    f"unknown option {arg!r} (options: --config-name, --config-path, --multirun, --print-config, --help)"
                )
            )
        else:
            overrides.append(arg)
        i += 1
    recipe, config_path = values["recipe"], values["config_path"]
    if config_path is not None and not any(VALUE_OPTIONS.get(a.split("=", 1)[0]) == "recipe" for a in args):
        raise SystemExit(
            _fail(f"--config-path {config_path} needs --config-name: the name of your recipe file there")
        )
    if config_path is not None:
        recipe = os.path.join(config_path, recipe if recipe.endswith((".yaml", ".yml")) else f"{recipe}.yaml")
    return recipe, overrides, want_help, print_config


def resolve_deprecated(name: str, overrides: list[str]) -> tuple[str, list[str]]:
    """Old spellings keep working with one line: `troupe job=rm_eval ...`, `troupe algo=dpo_offline ...`."""
    jobs = [o for o in overrides if o.startswith("job=")]
    if jobs and name != "train":
        raise SystemExit(_fail(f"{jobs[0]}: the command sets the job; drop it (`troupe {name} ...`)"))
    if jobs:
        old = jobs[-1].split("=", 1)[1]
        if old not in DEPRECATED_JOBS:
            raise SystemExit(_fail(f"{jobs[-1]}: no such job; commands: {', '.join(COMMANDS)}"))
        name = DEPRECATED_JOBS[old]
        overrides = [o for o in overrides if not o.startswith("job=")]
        print(f"troupe: `{jobs[-1]}` is deprecated; use `troupe {name} ...`", file=sys.stderr)
    if name == "train" and "algo=dpo_offline" in overrides:
        print("troupe: `algo=dpo_offline` is deprecated; use `troupe dpo ...`", file=sys.stderr)
        name = "dpo"
        overrides = [o for o in overrides if o != "algo=dpo_offline"]
    return name, overrides


def _fail(message: str) -> int:
    print(f"troupe: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if (
        os.getcwd() not in sys.path
    ):  # user code named by import path (algo.estimator=myadv:fn), as `python -m` finds it
        sys.path.insert(0, os.getcwd())
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = split_command(argv)
    if name == "plot":
        from troupe.cluster.observe.plot import main as plot_main

        return plot_main(rest)
    if name == "inspect":
        from troupe.cluster.observe.rollouts import main as inspect_main

        return inspect_main(rest)
    if name == "fleet":
        from troupe.cluster.fleet.requests import main as fleet_main

        return fleet_main(rest)
    if name == "rm data":
        from troupe.cluster.data.rm_data_command import main as rm_data_main

        return rm_data_main(rest)
    if name == "checkpoint trust":
        from troupe.cluster.durability.trust_command import main as trust_main

        return trust_main(["trust", *rest])
    if name in GROUPS:
        print(f"usage: troupe {name} {GROUPS[name]} [--help]", file=sys.stderr)
        return 2
    return run_command(name, rest)


def run_command(name: str, args: list[str]) -> int:
    callers_ray = _ray_up()  # called from Python with a Ray already up: it is the caller's, left running
    multirun = any(a in MULTIRUN for a in args)
    recipe, overrides, want_help, print_config = parse_options([a for a in args if a not in MULTIRUN])
    name, overrides = resolve_deprecated(name, overrides)
    command = COMMANDS[name]
    chosen_algo = [
        o
        for o in overrides
        if o.lstrip("+").startswith(("algo=", "algo.name=")) and not o.endswith("=dpo_offline")
    ]
    if name == "dpo" and chosen_algo:
        raise SystemExit(
            _fail(
                f"{chosen_algo[0]}: `troupe dpo` is offline DPO (algo=dpo_offline); for online algorithms use "
                "`troupe train " + chosen_algo[0] + "`"
            )  # fmt: skip
        )
    if multirun and command.job == "rm_serve":
        raise SystemExit(_fail("-m runs jobs one after the other; `troupe rm serve` serves until stopped"))
    if want_help:
        print(command_help(command))
        return 0
    from troupe.actors.plugins import PluginError
    from troupe.cluster.config.checks import ConfigError
    from troupe.cluster.config.compose import compose, config_record
    from troupe.cluster.config.sweep import sweep_jobs
    from troupe.cluster.durability.checkpoint import CheckpointError
    from troupe.cluster.durability.run_folder import RunFolderError
    from troupe.cluster.durability.signing import CheckpointKeyError
    from troupe.cluster.durability.stop_signal import Stopped

    logging.basicConfig(level=os.environ.get("TROUPE_LOG_LEVEL", "WARNING"))
    try:
        jobs = sweep_jobs(overrides)
        if not multirun:
            swept = [o for o, first in zip(overrides, jobs[0][0], strict=True) if o != first]
            if swept:
                raise ConfigError(
                    f"{swept[0]} lists several values: add -m to run one job per value (multirun), or write a "
                    "list as key=[a,b] and a string as key='a,b'"
                )
            jobs = [(overrides, None)]
        # every job's config first: a config error in the last job fails before the first one runs
        configs = []
        for job_overrides, subfolder in jobs:
            cfg = compose(
                [*command.prefix, *job_overrides], recipe, adapt=command.job == "rl", run_subfolder=subfolder
            )
            cfg.job = command.job
            configs.append(cfg)
        if print_config:
            import yaml

            print("---\n".join(yaml.safe_dump(config_record(cfg), sort_keys=False) for cfg in configs))
            return 0
        from troupe.cluster.run.driver import run

        for num, cfg in enumerate(configs):
            if multirun:
                print(
                    f"troupe: job {num} of {len(configs)}: {cfg.run.output_dir}", file=sys.stderr, flush=True
                )
            result = run(cfg)
            if command.job == "best_of_n":
                print(json.dumps(result))
            _stop_ray(callers_ray)  # the next job of a sweep starts its own, with its own settings
        return 0
    except (ConfigError, PluginError, CheckpointError, CheckpointKeyError, RunFolderError) as e:
        if os.environ.get("TROUPE_TRACEBACK"):
            raise
        return _fail(str(e))
    except Stopped as stopped:  # SIGTERM/SIGINT: a checkpoint was written; exit as the signal would
        print(f"troupe: {stopped}", file=sys.stderr, flush=True)
        return 128 + stopped.signum
    finally:
        _stop_ray(callers_ray)


def _ray_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _stop_ray(callers: bool) -> None:
    if not callers and _ray_up():
        sys.modules["ray"].shutdown()


if __name__ == "__main__":
    sys.exit(main())
