"""User code named in the config: an import path or the object itself (the Python API), resolved in one place, with
errors that name the config key; an advantage estimator given either way is the one the learners call."""

import pytest
import torch

from troupe.actors.learner.advantages import ESTIMATORS, AdvantageInputs, Estimator, estimate, lookup
from troupe.actors.learner.config import AlgoConfig
from troupe.actors.plugins import PluginError, describe, load_object
from troupe.cluster.config.checks import ConfigError, validate
from troupe.cluster.config.compose import checked, compose, config_record


def doubled(inputs: AdvantageInputs, algo: AlgoConfig):
    return 2 * inputs.rewards[:, None] * inputs.mask, None


GROUPED = Estimator(doubled, token_level=False, compares_group=True, needs_critic=False)


def _inputs():
    rewards = torch.tensor([1.0, -0.5])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    return AdvantageInputs(rewards, torch.zeros(2, 3), mask, group_size=2)


@pytest.mark.parametrize(
    "ref", ["tests.unit.test_plugins:doubled", "tests.unit.test_plugins.doubled", doubled]
)
def test_a_path_or_the_object_resolve_to_the_same_code(ref):
    assert load_object(ref, "algo.estimator") is doubled
    advantages, _ = estimate(AlgoConfig(estimator=ref), _inputs())
    assert torch.equal(advantages, torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))


def test_an_estimator_object_keeps_what_it_declares():
    assert lookup("tests.unit.test_plugins:GROUPED") is GROUPED
    bare = lookup(doubled)  # a bare function: sequence-level, needs neither group nor critic
    assert (bare.token_level, bare.compares_group, bare.needs_critic) == (False, False, False)
    assert lookup("group") is ESTIMATORS["group"]


@pytest.mark.parametrize(
    "ref, message",
    [
        ("nope_pkg.mod:fn", "cannot import module 'nope_pkg.mod'"),
        ("tests.unit.test_plugins:missing", "has no attribute 'missing'"),
        ("grup", "must be one of"),  # a misspelled registered name, not a path
        ("tests.unit.test_plugins:_inputs_value", "has no attribute"),
    ],
)
def test_bad_references_name_the_key(ref, message):
    with pytest.raises(PluginError, match=message) as e:
        lookup(ref)
    assert "algo.estimator" in str(e.value)


def test_validation_and_records_take_objects():
    cfg = compose(["model.policy=builtin:tiny-llama"])
    cfg.algo.estimator = doubled
    validate(checked(cfg))  # type-checked and validated with a Python object in it
    assert config_record(cfg)["algo"]["estimator"] == "tests.unit.test_plugins:doubled"
    assert describe(GROUPED) == "troupe.actors.learner.advantages:Estimator"
    cfg.algo.estimator = "nope_pkg:fn"
    with pytest.raises(ConfigError, match="algo.estimator"):
        validate(cfg)
    cfg.run.iterations = "many"
    with pytest.raises(ConfigError, match="run.iterations"):
        checked(cfg)
