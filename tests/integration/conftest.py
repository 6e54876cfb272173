"""Session fixtures for the integration suite: one local Ray and one tiny-model fleet (real vLLM, real DeepSpeed)."""

from contextlib import contextmanager

import pytest
import ray
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench.troupe_run import SMOKE_OVERRIDES
from troupe.actors.models import resolve_model
from troupe.cluster.config.checks import validate
from troupe.cluster.config.compose import CONF_DIR
from troupe.cluster.config.schema import register
from troupe.cluster.run.driver import build_fleet
from troupe.cluster.run.runtime import check_capacity, start_ray

register()

# the benchmarks' smoke settings (tiny model, short generations), plus what these tests need on top
TINY_OVERRIDES = [
    *SMOKE_OVERRIDES,
    "algo.kl_coef=0.05",
    # A random model never answers: the repetition objective varies on its text, so advantages are non-zero.
    "+reward.objectives.repetition={}",
    "+reward.weights.repetition=1.0",
]


def tiny_config(*extra: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=TINY_OVERRIDES + list(extra)))
    validate(cfg)
    return cfg


@pytest.fixture(scope="session")
def tiny_cfg():
    return tiny_config()


@pytest.fixture(scope="session")
def tiny_model_path(tiny_cfg):
    return resolve_model(tiny_cfg.model.policy)


@pytest.fixture(scope="session")
def tiny_prompts(tiny_cfg, tiny_model_path):
    """Chat-templated task prompts, without starting any actor."""
    from transformers import AutoTokenizer

    from troupe.cluster.data.prompts import build_prompt_sources

    return build_prompt_sources(tiny_cfg, AutoTokenizer.from_pretrained(tiny_model_path))[0]


@pytest.fixture(scope="session")
def ray_session(tiny_cfg):
    start_ray(tiny_cfg.ray)
    yield
    ray.shutdown()


@contextmanager
def running_fleet(cfg, model_path):
    """A fleet for one test module: local Ray has 2 CPUs, so fleets live one at a time."""
    check_capacity(cfg)
    f = build_fleet(cfg, model_path)
    try:
        yield f
    finally:
        f.shutdown()


@pytest.fixture(scope="module")
def fleet(ray_session, tiny_cfg, tiny_model_path):
    with running_fleet(tiny_cfg, tiny_model_path) as f:
        yield f


class Killed(Exception):
    """What `killed_at_step` raises in place of a SIGKILL."""


@contextmanager
def killed_at_step(monkeypatch, step: int):
    """A pairs job (offline DPO, rm bt/haf) dies when it asks whether step `step` is due for a checkpoint: after
    that step's row and before its checkpoint, like a kill at the worst moment."""
    from troupe.cluster.jobs.pair_checkpoints import PairCheckpoints

    real_due = PairCheckpoints.due

    def due_or_die(self, at):
        if at == step:
            raise Killed
        return real_due(self, at)

    with monkeypatch.context() as patched, pytest.raises(Killed):
        patched.setattr(PairCheckpoints, "due", due_or_die)
        yield
