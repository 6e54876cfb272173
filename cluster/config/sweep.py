"""`troupe <command> -m key=a,b other=range(0,3)` (Hydra's multirun): one job per combination of the swept values,
in Hydra's grammar (`a,b`, `range()`, `choice()`, `sort()`, `shuffle()`). Each job writes to its own sub-folder of
its run.output_dir, `<job number>_<swept key=value,...>`, so no two jobs of a sweep share a run folder.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

from troupe.cluster.config.checks import ConfigError

_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
MAX_NAME = 200  # a folder name is at most 255 bytes on common file systems


def sweep_jobs(overrides: Sequence[str]) -> list[tuple[list[str], str]]:
    """Each job's overrides and its sub-folder of run.output_dir, in Hydra's order (the last swept key varies
    fastest)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise ConfigError(str(e)) from e
    choices: list[list[tuple[str, str | None]]] = []  # per override: (override line, swept value or None)
    for o in parsed:
        if not o.is_sweep_override():
            choices.append([(o.input_line, None)])
        elif not o.is_discrete_sweep():
            raise ConfigError(
                f"{o.input_line}: -m sweeps a list of values (a,b / range() / choice()), not this"
            )
        else:
            try:
                values = list(o.sweep_string_iterator())
            except HydraException as e:  # glob() needs Hydra's config loader
                raise ConfigError(f"{o.input_line}: {e}; list the values (a,b) instead") from e
            choices.append([(f"{o.get_key_element()}={v}", v) for v in values])
    jobs = []
    for num, combination in enumerate(itertools.product(*choices)):
        swept = [(line.split("=", 1)[0].lstrip("+~"), v) for line, v in combination if v is not None]
        jobs.append(([line for line, _ in combination], job_folder(num, swept)))
    return jobs


def job_folder(num: int, swept: Sequence[tuple[str, str]]) -> str:
    """`<num>_<key=value,...>` of the swept values (characters a path or OmegaConf would misread replaced by `_`);
    the number alone keeps names distinct when values look alike once cleaned or cut."""
    keys = ",".join(f"{key}={value}" for key, value in swept)
    return f"{num}_{_UNSAFE.sub('_', keys)[:MAX_NAME]}" if keys else str(num)
