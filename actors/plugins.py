"""User code named in the config: an import path (`pkg.module:attr` or `pkg.module.attr`) or, from the Python API,
the object itself. Every extension point that takes code (advantage estimators today; reward objectives, judges
and environments next) resolves it here, so a bad path fails naming the config key.

    algo.estimator: mypkg.advantages:my_estimator      # from a config file or the command line
    cfg.algo.estimator = my_estimator                   # from Python (troupe.train(cfg))
"""

from __future__ import annotations

import importlib
from typing import Any


class PluginError(ValueError):
    """A config key names code that cannot be imported or has the wrong kind."""


def is_import_path(value: Any) -> bool:
    return isinstance(value, str) and ("." in value or ":" in value) and " " not in value


def load_object(ref: Any, key: str) -> Any:
    """`ref` itself when it is not a string; else the object its import path names. Errors name `key`."""
    if not isinstance(ref, str):
        return ref
    module_name, sep, attr = ref.partition(":")
    if not sep:
        module_name, _, attr = ref.rpartition(".")
    if not module_name or not attr:
        raise PluginError(f"{key}={ref!r}: expected an import path such as 'mypkg.module:name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise PluginError(f"{key}={ref!r}: cannot import module {module_name!r} ({e})") from e
    target = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as e:
            raise PluginError(f"{key}={ref!r}: module {module_name!r} has no attribute {attr!r}") from e
    return target


def describe(value: Any) -> Any:
    """A config value as it is recorded (checkpoints, config.yaml, trackers): objects by their import path."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    module = getattr(value, "__module__", None) or type(value).__module__
    name = getattr(value, "__qualname__", None) or type(value).__qualname__
    return f"{module}:{name}"
