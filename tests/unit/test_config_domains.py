"""Every value with a domain is refused by validate() at compose time, naming its key: declared domains
(actors/field_domains.py) and the cross-field checks that need knowledge (objective names, bounds that relate)."""

import json
import re
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from troupe.actors.field_domains import DOMAIN, Domain, bounded, domain_errors, one_of, resource
from troupe.cluster.config.checks import ConfigError, validate
from troupe.cluster.config.compose import CONF_DIR, groups, recipes
from troupe.cluster.config.schema import TroupeConfig, register

register()


def _compose(name: str = "config", overrides=()) -> TroupeConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return OmegaConf.to_object(compose(config_name=name, overrides=list(overrides)))


BAD = [
    # the list
    (["autoscale.generators.min=0"], "autoscale.generators.min=0: expected an integer >= 1"),
    (["generator.temperature=-1"], "generator.temperature=-1.0: expected a number > 0"),
    (["generator.temperature=nan"], "generator.temperature=nan: expected a finite number"),
    (["faults.learn_s=nan"], "faults.learn_s=nan: expected a finite number"),
    (["learner.lr=-1"], "learner.lr=-1.0: expected a number > 0"),
    (["reward.batch_size=0"], "reward.batch_size=0: expected an integer >= 1"),
    (["serve.max_items=0"], "serve.max_items=0: expected an integer >= 1"),
    (
        ["reward.aggregation=hierarchy"],
        "reward.hierarchy.holistic names ['armo'], which no reward shard produces",
    ),
    (["run.max_staleness=1000"], "run.max_staleness=1000: expected an integer in [0, 8]"),
    # choices
    (["reward.aggregation=foo"], "reward.aggregation='foo': expected one of hierarchy, weighted_sum"),
    (["run.mode=parallel"], "run.mode='parallel'"),
    (["sync.transport=tcp"], "sync.transport='tcp'"),
    (["generator.dtype=fp8"], "generator.dtype='fp8'"),
    (["critic.zero_stage=4"], "critic.zero_stage=4: expected one of 0, 1, 2, 3"),
    (["algo.loss_agg=sum"], "algo.loss_agg='sum'"),
    (["logging.wandb_mode=cloud"], "logging.wandb_mode='cloud'"),
    (["dataset.sample=last"], "dataset.sample='last'"),
    (["placement.layout=mixed"], "placement.layout='mixed'"),
    (["placement.generator.strategy=PACK"], "placement.generator.strategy='PACK'"),
    (["job=train"], "job='train'"),
    # ranges and finiteness
    (["autoscale.reward.min=0"], "autoscale.reward.min"),
    (["autoscale.generators.min=3", "autoscale.generators.max=2"], "autoscale.generators.min (3) must be <="),
    (
        ["autoscale.shrink_wait_frac=0.5"],
        "autoscale.shrink_wait_frac (0.5) must be < autoscale.grow_wait_frac",
    ),
    (["autoscale.grow_wait_frac=1.5"], "autoscale.grow_wait_frac=1.5: expected a number in [0, 1]"),
    (["autoscale.cooldown=-1"], "autoscale.cooldown"),
    (["generator.temperature=0"], "generator.temperature=0.0"),
    (["generator.top_p=0"], "generator.top_p=0.0: expected a number in (0, 1]"),
    (["generator.gpu_memory_utilization=1.2"], "generator.gpu_memory_utilization"),
    (["generator.num_gpus=1.5"], "generator.num_gpus=1.5: expected a number >= 0, whole above 1"),
    (["generator.max_new_tokens=0"], "generator.max_new_tokens"),
    (["faults.score_s=inf"], "faults.score_s=inf: expected a finite number"),
    (["faults.generate_s=-5"], "faults.generate_s"),
    (["faults.retries.learner=-1"], "faults.retries.learner=-1"),
    (["learner.lr=0"], "learner.lr=0.0"),
    (["learner.weight_decay=-0.1"], "learner.weight_decay"),
    (["learner.adam_betas=[0.9,1.0]"], "learner.adam_betas.1=1.0: expected a number in [0, 1)"),
    (["learner.adam_betas=[0.9]"], "learner.adam_betas: expected two numbers"),
    (["learner.min_lr_ratio=2"], "learner.min_lr_ratio"),
    (["learner.lora.dropout=1.0"], "learner.lora.dropout"),
    (["learner.logprob_chunk=0"], "learner.logprob_chunk"),
    (["critic.lr=0"], "critic.lr"),
    (["critic.micro_batch_size=0"], "critic.micro_batch_size"),
    (["reward.shards=0"], "reward.shards"),
    (["reward.weights.length=nan"], "reward.weights.length=nan"),
    (["reward.hierarchy.std=0"], "reward.hierarchy.std"),
    (["reward.hierarchy.threshold=nan"], "reward.hierarchy.threshold=nan"),
    (["reward.hierarchy.min_agreement=1.5"], "reward.hierarchy.min_agreement"),
    (["reward.hierarchy.warmup_samples=-1"], "reward.hierarchy.warmup_samples"),
    (
        [
            "reward.aggregation=hierarchy",
            "reward.hierarchy.holistic=correctness",
            "+reward.hierarchy.aspects.nope=1",
        ],
        "reward.hierarchy.aspects names ['nope']",
    ),
    (["+reward.weights.quality=1.0"], "reward.weights names ['quality']"),
    (["+reward.judges={j: {model: m, gpu_memory_utilization: 0}}"], "reward.judges.j.gpu_memory_utilization"),
    (["+reward.experts={x: {bundle: /b, num_gpus: -1}}"], "reward.experts.x.num_gpus=-1.0"),
    (["serve.port=70000"], "serve.port=70000"),
    (["serve.batch_wait_ms=-1"], "serve.batch_wait_ms"),
    (["serve.retries=-1"], "serve.retries"),
    (["run.seed=-1"], "run.seed"),
    (["run.iterations=0"], "run.iterations"),
    (["sync.bucket_mb=0"], "sync.bucket_mb"),
    (["algo.gamma=1.5"], "algo.gamma"),
    (["algo.lam=-0.1"], "algo.lam"),
    (["algo.clip_eps=0"], "algo.clip_eps"),
    (["algo.kl_coef=-0.1"], "algo.kl_coef"),
    (["algo.kl_target=0.1"], "algo.kl_target adapts algo.kl_coef"),
    (["algo.dpo_beta=0"], "algo.dpo_beta"),
    (["algo.tis_cap=-1"], "algo.tis_cap"),
    (["+algo.estimator_args.c=nan"], "algo.estimator_args.c=nan"),
    (["data.prompts_per_iteration=0"], "data.prompts_per_iteration"),
    (["data.max_prompt_tokens=0"], "data.max_prompt_tokens"),
    (["eval.prompts=0"], "eval.prompts"),
    (["eval.samples=-1"], "eval.samples"),
    (["logging.rollouts=1.5"], "logging.rollouts"),
    (["monitor.length_corr_max=2"], "monitor.length_corr_max"),
    (["dataset.max_length=0"], "dataset.max_length"),
    (["rm.gating_lr=0"], "rm.gating_lr"),
    (["rm.gating_dropout=1"], "rm.gating_dropout"),
    (["ray.num_cpus=0"], "ray.num_cpus"),
    (["ray.actor_timeout_s=0"], "ray.actor_timeout_s"),
    (["placement.wait_s=0"], "placement.wait_s"),
    (["placement.generator.resources={rollout: -1}"], "placement.generator.resources.rollout=-1.0"),
    (["task.min_operand=10"], "task.min_operand (10)"),
    (["task.operations=/"], "task.operations"),
    (["best_of_n.n=0"], "best_of_n.n"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_a_bad_value_is_refused_naming_its_key(overrides, message):
    cfg = _compose(overrides=overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg)


def test_every_bad_value_of_a_config_is_named_at_once():
    cfg = _compose(overrides=["generator.top_p=0", "learner.lr=nan", "serve.max_items=0"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value).splitlines() == [
        "generator.top_p=0.0: expected a number in (0, 1]",
        "learner.lr=nan: expected a finite number",
        "serve.max_items=0: expected an integer >= 1",
    ]


def _bundle(tmp_path: Path) -> str:
    folder = tmp_path / "armo"
    folder.mkdir()
    info = {"name": "armo", "backbone": "b", "objectives": ["helpfulness", "verbosity"], "gating": {}}
    (folder / "bundle.json").write_text(json.dumps(info))
    return str(folder)


def _inputs(recipe: str, option: str, bundle: str) -> list[str]:
    """The inputs a recipe or group option leaves empty on purpose (validate names them)."""
    needs = {
        "gsm8k": ["data.train=train.jsonl"],
        "gsm8k_tools": ["data.train=train.jsonl"],
        "chat_armo": ["data.train=q.jsonl", f"reward.experts.armo.bundle={bundle}"],
        "demo_hierarchical": [f"reward.experts.armo.bundle={bundle}"],
        "algo=dpo_offline": ["dataset.path=pairs.jsonl"],
    }
    return needs.get(recipe, []) + needs.get(option, [])


def _recipes_and_options():
    options = [f"{group}={option}" for group, names in groups().items() for option in names]
    return [(recipe, "") for recipe in recipes()] + [("config", option) for option in options]


@pytest.mark.parametrize(("recipe", "option"), _recipes_and_options())
def test_every_recipe_and_group_option_keeps_to_the_domains_and_validates(recipe, option, tmp_path):
    assert domain_errors(_compose(recipe, [option] if option else [])) == []
    overrides = ([option] if option else []) + _inputs(recipe, option, _bundle(tmp_path))
    validate(_compose(recipe, overrides))


def test_hierarchy_names_are_checked_against_a_readable_bundle(tmp_path):
    bundle = _bundle(tmp_path)
    base = ["reward.aggregation=hierarchy", f"+reward.experts={{armo: {{bundle: '{bundle}'}}}}"]
    validate(_compose(overrides=[*base, "reward.hierarchy.holistic=armo/helpfulness"]))
    with pytest.raises(ConfigError, match=r"reward\.hierarchy\.holistic names \['arm'\].*'armo/helpfulness'"):
        validate(_compose(overrides=[*base, "reward.hierarchy.holistic=arm"]))
    serve = _compose(overrides=[*base, "job=rm_serve"])  # the reward service builds the same fleet
    serve.reward.hierarchy.aspects = {"armo/honesty": 1.0}
    with pytest.raises(ConfigError, match=r"reward\.hierarchy\.aspects names \['armo/honesty'\]"):
        validate(serve)
    # a bundle folder without bundle.json yet: its outputs are unknown, so names are not refused
    validate(_compose(overrides=["reward.aggregation=hierarchy", "+reward.experts={armo: {bundle: /b}}"]))


def test_the_cli_and_the_python_api_refuse_before_ray_starts(capsys, ray_must_not_start):
    import troupe
    from troupe.cluster.cli import main

    assert main(["rm", "serve", "serve.max_items=0"]) == 2
    assert "serve.max_items=0: expected an integer >= 1" in capsys.readouterr().err
    cfg = troupe.compose("model.policy=builtin:tiny-llama")
    cfg.generator.temperature = float("nan")
    with pytest.raises(ConfigError, match=r"generator\.temperature=nan"):
        troupe.train(cfg)
    with pytest.raises(ConfigError, match=r"run\.max_staleness=9"):
        troupe.train("run.mode=async", "run.max_staleness=9")


# Numeric fields with no domain beyond being finite (which every float must be): weights, z-units, extra numbers.
FREE = {
    "reward.weights",
    "reward.hierarchy.threshold",
    "reward.hierarchy.aspects",
    "reward.hierarchy.mean",
    "algo.estimator_args",
}


def _undeclared_numbers(cls, prefix: str = "") -> set[str]:
    hints = typing.get_type_hints(cls)
    out = set()
    for f in fields(cls):
        hint = hints[f.name]
        if is_dataclass(hint):
            out |= _undeclared_numbers(hint, f"{prefix}{f.name}.")
            continue
        args = typing.get_args(hint)
        leaf = args[-1] if args and typing.get_origin(hint) in (dict, list) else hint
        for t in typing.get_args(leaf) or (leaf,):
            if is_dataclass(t):
                out |= _undeclared_numbers(t, f"{prefix}{f.name}.<name>.")
            elif t in (int, float) and DOMAIN not in f.metadata:
                out.add(prefix + f.name)
    return out


def test_every_numeric_field_declares_its_domain():
    """A new int/float field declares a domain (actors/field_domains.py), or is added to FREE with a reason."""
    assert _undeclared_numbers(TroupeConfig) == FREE


@dataclass
class _Inner:
    n: int = bounded(1, ge=1)
    anything: Any = None


@dataclass
class _Outer:
    share: float = bounded(0.5, ge=0, le=1)
    kind: str = one_of("a", "b")
    cpus: float = resource(1.0)
    limit: int | None = bounded(None, gt=0)
    counts: dict[str, int] = bounded(factory=lambda: {"x": 1}, ge=0)
    inner: dict[str, _Inner] = field(default_factory=dict)


def test_the_walk_names_nested_keys_and_skips_unset_and_any():
    assert domain_errors(_Outer(inner={"p": _Inner(anything=float("nan"))})) == []
    bad = _Outer(share=1.5, kind="c", cpus=2.5, limit=0, counts={"x": -1}, inner={"p": _Inner(n=0)})
    assert domain_errors(bad) == [
        "share=1.5: expected a number in [0, 1]",
        "kind='c': expected one of a, b",
        "cpus=2.5: expected a number >= 0, whole above 1",
        "limit=0: expected an integer > 0",
        "counts.x=-1: expected an integer >= 0",
        "inner.p.n=0: expected an integer >= 1",
    ]
    assert _Outer().kind == "a" and OmegaConf.structured(_Outer).counts == {"x": 1}
    assert Domain(choices=(0, 1)).expected(True) == "expected one of 0, 1"  # a bool is not an integer choice
