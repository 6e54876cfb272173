"""From a recipe and Hydra-style overrides to the typed config: the one path the CLI, the Python API, the tests and
the benchmarks take. Errors come out as `ConfigError`s carrying the message alone (no Hydra banner, no traceback).

A recipe is a file in troupe.conf (`config`, `demo`, `gsm8k`, ...) or a path to the user's own YAML file, which
can start from troupe's (`defaults: [demo, _self_]`); config groups are its folders (`algo=ppo`,
`reward=open`, `autoscale=backlog`). A prompt file without answers (`data.answer_key` unset) and a command line
that chooses no reward gets `reward=open`, since the default reward checks answers.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from importlib import resources
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from troupe.cluster.config.checks import ConfigError
from troupe.cluster.config.schema import RewardConfig, TroupeConfig, register

# absolute: Hydra would read a relative path as a module; inside a wheel this is site-packages/troupe/conf
CONF_DIR = str(Path(str(resources.files("troupe.conf"))).resolve())
DEFAULT_RECIPE = "config"


def recipes() -> list[str]:
    """The recipe names (`--config-name`), the defaults first."""
    names = sorted(p.stem for p in Path(CONF_DIR).glob("*.yaml") if p.stem != DEFAULT_RECIPE)
    return [DEFAULT_RECIPE, *names]


def groups() -> dict[str, list[str]]:
    """{config group: its options}, e.g. {"algo": ["dpo_offline", "grpo", ...]}."""
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(Path(CONF_DIR).iterdir())
        if d.is_dir() and not d.name.startswith("_")
    }


def _answers(composed) -> bool:
    data = composed.data
    return data.train == "builtin:arithmetic" or data.answer_key is not None


# reward keys that size or place the reward fleet: setting them chooses no reward
_REWARD_SIZING = ("shards", "num_cpus", "batch_size")


def _default_reward(composed, overrides: Sequence[str]) -> bool:
    """The reward nobody chose: the schema's reward section (sizing aside), and no command-line override of it
    (`reward=...`, `reward.weights.x=...`, `+reward.experts=...`)."""
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if key == "reward" or (key.startswith("reward.") and key.split(".")[1] not in _REWARD_SIZING):
            return False

    def choice(section) -> dict:
        plain = OmegaConf.to_container(section)
        return {k: v for k, v in plain.items() if k not in _REWARD_SIZING}

    return choice(composed.reward) == choice(OmegaConf.structured(RewardConfig))


def compose(
    overrides: Sequence[str] = (),
    recipe: str = DEFAULT_RECIPE,
    adapt: bool = True,
    run_subfolder: str | None = None,
) -> TroupeConfig:
    """The typed config of `recipe` with `overrides` applied. `adapt`: pick the reward from the data (see above).
    `run_subfolder` is appended to run.output_dir, and what derives from it (rm.output, ...) follows (multirun)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    register()
    config_dir, search = CONF_DIR, []
    if recipe.endswith((".yaml", ".yml")) or "/" in recipe:  # the user's own recipe file
        path = Path(recipe).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"--config-name {recipe}: no such file")
        # Hydra searches the user's folder first: a recipe there named like one of troupe's (or a group option
        # like reward/open.yaml) would stand in for it, and `defaults: [demo]` in a demo.yaml would recurse
        if path.parent != Path(CONF_DIR):
            clashes = [f"{name}.yaml" for name in recipes() if (path.parent / f"{name}.yaml").is_file()]
            clashes += [f"{group}/{option}.yaml" for group, options in groups().items() for option in options
                        if (path.parent / group / f"{option}.yaml").is_file()]  # fmt: skip
            if clashes:
                raise ConfigError(
                    f"--config-name {recipe}: {path.parent} holds {', '.join(clashes)}, named like troupe's own, "
                    f"which Hydra would read instead of troupe's: rename them (e.g. my_{Path(clashes[0]).name}) "
                    "or move your recipe to a folder of its own"
                )
        # troupe's recipes stay on the search path, so the file can start from them (defaults: [config, _self_])
        config_dir, recipe, search = str(path.parent), path.stem, [f"hydra.searchpath=[file://{CONF_DIR}]"]
    elif recipe not in recipes():
        raise ConfigError(
            f"--config-name {recipe}: no such recipe; recipes: {', '.join(recipes())}, or a path to your own .yaml"
        )
    overrides = list(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            composed = hydra_compose(config_name=recipe, overrides=[*search, *overrides])
            if adapt and not _answers(composed) and _default_reward(composed, overrides):
                print(
                    "troupe: data.train has no answers (data.answer_key unset): rewarding with reward=open "
                    "(length, repetition); choose with reward=answers|open or reward.*",
                    file=sys.stderr,
                )
                composed = hydra_compose(config_name=recipe, overrides=[*search, *overrides, "reward=open"])
            if run_subfolder is not None:
                composed.run.output_dir = f"{composed.run.output_dir}/{run_subfolder}"
            return OmegaConf.to_object(composed)
    except (HydraException, OmegaConfBaseException, ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(_message(e)) from e
    finally:
        GlobalHydra.instance().clear()


def _message(e: BaseException) -> str:
    """Hydra wraps the useful line ("Key 'x' is not in struct") in its own; keep both, name the key, drop the rest."""
    chain = [e] + ([e.__cause__ or e.__context__] if (e.__cause__ or e.__context__) else [])
    lines = []
    for exc in chain:
        for line in str(exc).strip().splitlines()[:3]:
            if (
                line.strip()
                and "$" not in line
                and not any(k in line for k in ("full_key", "object_type", "reference_type"))
            ):
                lines.append(line.strip())
    key = next((getattr(x, "full_key", None) for x in chain if getattr(x, "full_key", None)), None)
    message = "\n".join(dict.fromkeys(lines)) or type(e).__name__
    return f"{key}: {message}" if key and key not in message else message


def checked(cfg: TroupeConfig) -> TroupeConfig:
    """A typed config built or changed in Python, type-checked like a composed one (Python objects are allowed
    where the config takes code)."""
    for section in fields(cfg):  # one section at a time, so an error names its full key (run.iterations)
        value = getattr(cfg, section.name)
        if is_dataclass(value):
            try:
                OmegaConf.structured(value, flags={"allow_objects": True})
            except OmegaConfBaseException as e:
                raise ConfigError(f"{section.name}.{_message(e)}") from e
    try:
        return OmegaConf.to_object(OmegaConf.structured(cfg, flags={"allow_objects": True}))
    except OmegaConfBaseException as e:
        raise ConfigError(_message(e)) from e


def config_record(cfg: TroupeConfig) -> dict:
    """The config as plain data (checkpoints, trackers): Python objects given through the API as import paths."""
    from troupe.actors.plugins import describe

    def plain(value):
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return describe(value)

    return plain(OmegaConf.to_container(OmegaConf.structured(cfg, flags={"allow_objects": True})))
