"""The Hydra config: typed schema, misspelled keys and wrong types fail naming the key, cross-field checks."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from troupe.cluster.config.checks import ConfigError, validate
from troupe.cluster.config.compose import CONF_DIR
from troupe.cluster.config.schema import TroupeConfig, register

register()


def _compose(name: str = "config", overrides=()):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def test_defaults_and_demo_compose_and_validate():
    for name in ("config", "demo"):
        cfg = OmegaConf.to_object(_compose(name))
        assert isinstance(cfg, TroupeConfig)
        validate(cfg)
    assert _compose("demo").run.name == "demo"


def test_misspelled_key_fails_naming_it():
    with pytest.raises(Exception, match="samples_per_promt"):
        _compose(overrides=["generator.samples_per_promt=4"])


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(Exception, match="iterations"):
        _compose(overrides=["run.iterations=many"])


def test_misspelled_key_in_a_yaml_file_fails_naming_it(tmp_path):
    (tmp_path / "bad.yaml").write_text("defaults:\n  - troupe_schema\n  - _self_\nlearner:\n  zero_stag: 3\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        with pytest.raises(Exception, match="zero_stag"):
            compose(config_name="bad")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["learner.world_size=3"], "learner.world_size"),
        (["generator.samples_per_prompt=1"], "generator.samples_per_prompt"),
        (["learner.zero_stage=4"], "learner.zero_stage"),
        (["generator.backend=sglang"], "generator.backend"),
        (["+reward.weights.quality=1.0"], "reward.weights"),
    ],
)
def test_cross_field_checks_name_the_keys(overrides, key):
    cfg = OmegaConf.to_object(_compose(overrides=overrides))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


ALGOS = ("grpo", "dr_grpo", "rloo", "reinforce", "reinforce_pp", "reinforce_pp_baseline", "ppo", "dpo_online")


@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_is_one_override_of_typed_fields(algo):
    cfg = OmegaConf.to_object(_compose(overrides=[f"algo={algo}"]))
    validate(cfg)
    assert cfg.algo.name == algo
    assert cfg.algo.update == ("dpo" if algo.startswith("dpo") else "policy_gradient")


def test_algorithm_fields_say_what_runs():
    ppo = OmegaConf.to_object(_compose(overrides=["algo=ppo"])).algo
    assert (ppo.estimator, ppo.critic, ppo.kl_placement) == ("gae", True, "reward") and ppo.needs_reference()
    dr = OmegaConf.to_object(_compose(overrides=["algo=dr_grpo"])).algo
    assert not dr.scale_by_std and dr.loss_agg == "seq_mean_token_sum_norm"
    offline = OmegaConf.to_object(_compose(overrides=["algo=dpo_offline", "dataset.path=x.jsonl"]))
    validate(offline)
    assert offline.algo.source == "dataset" and offline.algo.dpo_reference == "initial"


def test_dpo_reference_default_is_stated_once():
    """The schema's default is what the learner gets (no spec restating a different default)."""
    from troupe.cluster.fleet.learners import policy_setup

    cfg = OmegaConf.to_object(_compose(overrides=["algo=dpo_online"]))
    assert policy_setup(cfg, "m").algo.dpo_reference == cfg.algo.dpo_reference == "previous"
    assert policy_setup(cfg, "m").train is cfg.learner


def test_algorithm_and_deepspeed_cross_checks_name_keys():
    cases = [
        (["algo=dpo_offline"], "dataset.path"),
        (["algo=dpo_offline", "dataset.path=x", "algo.dpo_reference=previous"], "algo.dpo_reference"),
        (["learner.lora.enabled=true", "learner.zero_stage=3"], "learner.lora.enabled"),
        (["learner.offload_params=true", "learner.zero_stage=2"], "learner.offload_params"),
        (["algo=dpo_online", "algo.label_smoothing=0.7"], "algo.label_smoothing"),
        (["algo=dpo_online", "algo.pair_strategy=best"], "algo.pair_strategy"),
        (["learner.lr_schedule=step"], "learner.lr_schedule"),
        (["algo=rloo", "algo.kl_placement=reward"], "algo.kl_placement"),
        (["algo.estimator=gae"], "algo.critic"),
        (["algo.estimator=vtrace"], "algo.estimator"),
        (["data.prompts_per_iteration=3", "learner.world_size=2"], "data.prompts_per_iteration"),
    ]
    for overrides, key in cases:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(OmegaConf.to_object(_compose(overrides=overrides)))


def test_rm_output_is_refused_when_a_bundle_swap_would_replace_other_files(tmp_path):
    """A bundle replaces rm.output whole: a folder of other files, or one holding the run's outputs, is refused."""
    (tmp_path / "notes.txt").write_text("mine")
    train = ["job=rm_train", "rm.stage=probe", "dataset.path=p.jsonl"]
    cases = [
        ([f"rm.output={tmp_path}"], "rm.output: .* is not a reward bundle"),
        ([f"rm.output={tmp_path}/rm", f"run.output_dir={tmp_path}/rm/run"], "holds run.output_dir"),
        ([f"rm.output={tmp_path}/rm", f"rm.cache={tmp_path}/rm/cache"], "holds rm.cache"),
    ]
    for overrides, refused in cases:
        with pytest.raises(ConfigError, match=refused):
            validate(OmegaConf.to_object(_compose(overrides=[*train, *overrides])))
    validate(OmegaConf.to_object(_compose(overrides=[*train, f"rm.output={tmp_path}/rm"])))
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["run.checkpoint_every=-1"], "run.checkpoint_every"),
        (["run.keep_checkpoints=0"], "run.keep_checkpoints"),
        (["faults.learn_s=0"], "faults.learn_s"),
        (["faults.retries.learner=-1"], "faults.retries.learner"),
        (["+faults.retries.planner=1"], "unknown roles"),
        (
            ["resume=latest", "job=rm_train", "rm.stage=probe", "dataset.path=p.jsonl"],
            "rm.stage=probe has no run",
        ),
        (["resume=latest", "algo=dpo_offline", "dataset.path=p.jsonl", "run.overwrite=true"], "contradict"),
    ],
)
def test_durability_keys_are_checked_naming_them(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(OmegaConf.to_object(_compose(overrides=overrides)))


def test_rm_jobs_name_missing_inputs():
    cases = [
        (["job=rm_train", "rm.stage=regression"], "rm.ratings_path"),
        (["job=rm_train", "rm.stage=gating"], "rm.stage1"),
        (["job=rm_train", "rm.stage=haf"], "dataset.path"),
        (["job=rm_eval"], "rm.bundle"),
        (["job=rm_train", "rm.stage=linear"], "rm.stage"),
    ]
    for overrides, key in cases:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(OmegaConf.to_object(_compose(overrides=overrides)))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["reward.on_error=ignore"], "reward.on_error"),
        (["reward.timeout_s=0"], "reward.timeout_s"),
        (["+reward.objectives.mine={target: pkg.mod:fn, on_error: skip}"], "reward.objectives.mine.on_error"),
        (["+reward.objectives.mine={type: grpc}"], "reward.objectives.mine.type"),
        (["+reward.objectives.rm={type: http}"], "reward.objectives.rm"),
        (["+reward.objectives.facts={type: judge, rubric: factuality}"], "reward.objectives.facts.pool"),
        (["+reward.judges={judge: {replicas: 1}}"], "reward.judges.judge.model"),
        (["reward.hierarchy.select=best"], "reward.hierarchy.select"),
        (
            ["reward.hierarchy.select=consistency"],
            "reward.hierarchy.select=consistency needs reward.aggregation",
        ),
    ],
)
def test_reward_entries_are_checked_naming_the_key(overrides, key):
    cfg = OmegaConf.to_object(_compose(overrides=overrides))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        validate(cfg)


def test_plugin_http_and_judge_entries_validate():
    cfg = OmegaConf.to_object(
        _compose(
            overrides=[
                "+reward.objectives.mine={target: /tmp/my_rewards.py:score, bonus: 0.5}",
                "+reward.objectives.rm={type: http, url: 'http://127.0.0.1:8008', on_error: zero}",
                "+reward.objectives.facts={type: judge, pool: judge, rubric: factuality}",
                "+reward.judges={judge: {model: 'builtin:smollm2-135m-instruct'}}",
            ]
        )
    )
    validate(cfg)
    assert cfg.reward.judges["judge"].replicas == 1


def test_weighting_the_debiased_verbosity_output_is_refused(tmp_path):
    bundle = tmp_path / "armo"
    bundle.mkdir()
    (bundle / "bundle.json").write_text(
        '{"name": "armo", "backbone": "b", "objectives": ["helpsteer-helpfulness", "helpsteer-verbosity"], '
        '"verbosity": "helpsteer-verbosity"}'
    )

    def cfg():
        return OmegaConf.to_object(
            _compose(overrides=["reward=open", f"+reward.experts={{armo: {{bundle: '{bundle}'}}}}"])
        )

    fine = cfg()
    fine.reward.weights["armo/helpsteer-helpfulness"] = 1.0
    validate(fine)
    weighted = cfg()
    weighted.reward.weights["armo/helpsteer-verbosity"] = -0.5
    aspect = cfg()
    aspect.reward.aggregation, aspect.reward.hierarchy.holistic = "hierarchy", "armo"
    aspect.reward.hierarchy.aspects = {"armo/helpsteer-verbosity": 0.2}
    for bad, key in ((weighted, "reward.weights"), (aspect, "reward.hierarchy.aspects")):
        with pytest.raises(ConfigError, match=rf"{key} uses 'armo/helpsteer-verbosity'.*always 0"):
            validate(bad)
