"""The Python API behind `import troupe`: each job takes overrides (as on the command line) or a typed config,
and returns what the job reports (paths, last metrics). The CLI (cluster/cli.py) runs the same `run`."""

from __future__ import annotations

from types import SimpleNamespace

from troupe.cluster.config.compose import DEFAULT_RECIPE, checked
from troupe.cluster.config.compose import compose as _compose
from troupe.cluster.config.schema import TroupeConfig


def compose(*overrides: str, recipe: str = DEFAULT_RECIPE, job: str = "rl") -> TroupeConfig:
    """The typed config of `recipe` with Hydra-style `overrides`, for `job`; change it in Python, then run it."""
    prefix = ("algo=dpo_offline",) if job == "dpo" else ()
    cfg = _compose([*prefix, *overrides], recipe, adapt=job == "rl")
    cfg.job = "rl" if job == "dpo" else job
    return cfg


def _run(job: str, config: TroupeConfig | str | None, overrides: tuple[str, ...], recipe: str) -> dict:
    import ray

    from troupe.cluster.run.driver import run

    if isinstance(config, TroupeConfig):
        if overrides:
            raise TypeError("give overrides or a typed config, not both (change the config's fields instead)")
        cfg = checked(config)
        cfg.job = "rl" if job == "dpo" else job
    else:
        cfg = compose(*([config] if config else []), *overrides, recipe=recipe, job=job)
    ours = not ray.is_initialized()  # a Ray the caller started stays up
    try:
        return run(cfg)
    finally:
        if ours and ray.is_initialized():
            ray.shutdown()


def train(config: TroupeConfig | str | None = None, *overrides: str, recipe: str = DEFAULT_RECIPE) -> dict:
    """RL training (`troupe train`): `train(cfg)`, or `train("run.iterations=2", ..., recipe="demo")`."""
    return _run("rl", config, overrides, recipe)


def dpo(config: TroupeConfig | str | None = None, *overrides: str, recipe: str = DEFAULT_RECIPE) -> dict:
    """Offline DPO on a preference file (`troupe dpo dataset.path=...`)."""
    return _run("dpo", config, overrides, recipe)


def best_of_n(
    config: TroupeConfig | str | None = None, *overrides: str, recipe: str = DEFAULT_RECIPE
) -> dict:
    """N samples per prompt, scored by a running reward service, the best kept (`troupe best-of-n`)."""
    return _run("best_of_n", config, overrides, recipe)


def _rm(job: str):
    def call(config: TroupeConfig | str | None = None, *overrides: str, recipe: str = DEFAULT_RECIPE) -> dict:
        return _run(job, config, overrides, recipe)

    call.__name__ = job
    call.__doc__ = (
        f"`troupe {job.replace('_', ' ')}`: takes overrides or a typed config, like `troupe.train`."
    )
    return call


# troupe.rm.train / eval / serve / import_checkpoint (`import` is a Python keyword)
rm = SimpleNamespace(
    train=_rm("rm_train"), eval=_rm("rm_eval"), serve=_rm("rm_serve"), import_checkpoint=_rm("rm_import")
)
