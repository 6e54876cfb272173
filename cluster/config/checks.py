"""Checks of the typed config, each failing with a ConfigError that names the keys involved: first every field's
declared domain (actors/field_domains.py: ranges, finiteness, choices), then what fields mean together."""

from __future__ import annotations

import math
from pathlib import Path

from troupe.actors.field_domains import Domain, domain_errors
from troupe.actors.learner.advantages import lookup
from troupe.actors.learner.config import MASKING
from troupe.actors.plugins import PluginError
from troupe.actors.tasks.arithmetic import ArithmeticTask
from troupe.cluster.config.gpu_checks import check_gpu
from troupe.cluster.config.reward_checks import check_rewards, check_serve
from troupe.cluster.config.schema import TroupeConfig


class ConfigError(ValueError):
    pass


def validate(cfg: TroupeConfig) -> None:
    """Every check that needs no actor, for every job: the CLI and the Python API run it before Ray starts."""
    errors = domain_errors(cfg)
    if errors:
        raise ConfigError("\n".join(errors))
    g, lr, d = cfg.generator, cfg.learner, cfg.data
    a = cfg.algo
    pl = cfg.placement
    check_gpu(cfg, ConfigError)
    for role in ("generator", "reward"):
        _one_of(f"placement.{role}.strategy", getattr(pl, role).strategy, ("DEFAULT", "SPREAD"))
    _one_of(
        "placement.learner.strategy", pl.learner.strategy, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
    )
    _check_custom_resources(cfg)
    if pl.layout == "colocated" and cfg.generator.replicas != cfg.learner.world_size:
        raise ConfigError(
            f"placement.layout=colocated puts generator i in learner rank i's bundle: generator.replicas "
            f"({cfg.generator.replicas}) must equal learner.world_size ({cfg.learner.world_size})"
        )
    if cfg.run.mode == "async" and cfg.run.max_staleness < 1:
        raise ConfigError(
            f"run.mode=async needs run.max_staleness >= 1 (got {cfg.run.max_staleness}); 0 is run.mode=sync"
        )
    _check_autoscale(cfg)
    _check_env(cfg)
    t = cfg.task
    try:
        ArithmeticTask(t.min_operand, t.max_operand, t.operations, t.seed, t.steps)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if len(lr.adam_betas) != 2:
        raise ConfigError(f"learner.adam_betas: expected two numbers [beta1, beta2], got {lr.adam_betas}")
    _check_rm_dataset(cfg)
    if cfg.job == "rl" and cfg.algo.source == "rollouts" and not d.train:
        raise ConfigError(
            "data.train is empty: give a prompt file (.jsonl/.json/.parquet), a datasets folder, a hub id "
            "or builtin:arithmetic"
        )
    if (
        cfg.job == "rl"
        and "correctness" in cfg.reward.objectives
        and not d.train.startswith("builtin:")
        and not d.answer_key
    ):
        raise ConfigError(
            "reward.objectives.correctness compares replies with data.answer_key, which is unset: set it, or "
            "turn the objective off (reward.objectives.correctness=null)"
        )
    if (
        cfg.job == "rm_train"
        and cfg.rm.stage == "regression"
        and not (cfg.rm.ratings_path and (cfg.rm.scales or cfg.rm.scales_path))
    ):
        raise ConfigError(
            "troupe rm train rm.stage=regression needs rm.ratings_path and rm.scales or rm.scales_path"
        )
    if cfg.job == "rm_train" and cfg.rm.stage == "gating" and not (cfg.rm.stage1 and cfg.dataset.path):
        raise ConfigError(
            "troupe rm train rm.stage=gating needs rm.stage1 (the stage-1 bundle folder, printed by stage 1 as "
            "'reward bundle: ...'; stage 1 writes rm.output, default outputs/troupe/rm-armo) and dataset.path "
            "(a preference file: troupe rm data pairs ...)"
        )
    if (
        cfg.job == "rm_train"
        and cfg.rm.stage == "gating"
        and Path(cfg.rm.output).resolve() == Path(cfg.rm.stage1).resolve()
    ):
        raise ConfigError(
            f"rm.output={cfg.rm.output} is the stage-1 bundle rm.stage1: stage 2 would overwrite it; give stage 2 "
            "its own rm.output (e.g. rm.output=outputs/armo2)"
        )
    if cfg.job == "rm_train":
        _check_bundle_output(cfg)
    if cfg.job == "rm_train" and cfg.rm.stage in ("probe", "bt", "haf") and not cfg.dataset.path:
        raise ConfigError(f"troupe rm train rm.stage={cfg.rm.stage} needs dataset.path (a preference file)")
    if cfg.job == "rm_eval" and not (cfg.rm.bundle and cfg.dataset.path):
        raise ConfigError("troupe rm eval needs rm.bundle and dataset.path")
    if cfg.job == "rm_import" and not cfg.rm.checkpoint:
        raise ConfigError(
            "troupe rm import needs rm.checkpoint (a folder laid out like RLHFlow/ArmoRM-Llama3-8B-v0.1)"
        )
    if cfg.job == "rm_serve":
        check_serve(cfg.serve, ConfigError)
    if cfg.job == "best_of_n" and not cfg.best_of_n.prompts:
        raise ConfigError("troupe best-of-n needs best_of_n.prompts (a JSONL file of prompts)")
    if cfg.job == "rm_serve":
        _check_reward_fleet(cfg)
    _check_resume(cfg)
    for key, stage in (
        ("learner", lr.zero_stage),
        ("critic", cfg.critic.zero_stage if cfg.algo.critic else 0),
    ):
        if lr.compile and stage == 3:
            raise ConfigError(
                f"learner.compile supports {key}.zero_stage 0-2 (ZeRO-3 gathers weights inside each layer)"
            )
    if cfg.job != "rl":
        return
    _validate_algo(cfg)
    if lr.offload_params and lr.zero_stage != 3:
        raise ConfigError("learner.offload_params needs learner.zero_stage=3")
    if lr.lora.enabled and lr.zero_stage == 3:
        raise ConfigError(
            "learner.lora.enabled supports learner.zero_stage 0-2 (adapters are merged on rank 0)"
        )
    if cfg.data.eval and not (cfg.eval.greedy or cfg.eval.samples):
        raise ConfigError("data.eval is set but eval.greedy=false and eval.samples=0: nothing to evaluate")
    _check_durability(cfg)
    _check_reward_fleet(cfg)
    if g.max_new_tokens >= g.max_model_len:
        raise ConfigError(
            f"generator.max_new_tokens ({g.max_new_tokens}) must be < generator.max_model_len ({g.max_model_len})"
        )
    if d.max_prompt_tokens is not None and d.max_prompt_tokens + g.max_new_tokens > g.max_model_len:
        raise ConfigError(
            f"data.max_prompt_tokens ({d.max_prompt_tokens}) + generator.max_new_tokens ({g.max_new_tokens}) "
            f"must be <= generator.max_model_len ({g.max_model_len})"
        )
    if a.update == "policy_gradient" and d.prompts_per_iteration % lr.world_size:
        raise ConfigError(
            f"data.prompts_per_iteration ({d.prompts_per_iteration}) must divide by learner.world_size "
            f"({lr.world_size}): each rank gets whole prompt groups"
        )


def _validate_algo(cfg: TroupeConfig) -> None:
    """The algorithm's typed fields and how they fit together (conf/algo/*.yaml)."""
    a, g = cfg.algo, cfg.generator
    try:
        est = lookup(a.estimator)
    except PluginError as e:
        raise ConfigError(str(e)) from e
    if a.kl_placement == "reward" and a.update == "policy_gradient" and not est.token_level:
        raise ConfigError(
            f"algo.kl_placement=reward needs a token-level estimator; algo.estimator={a.estimator} "
            "gives one advantage per sequence, so KL goes in the loss (algo.kl_placement=loss)"
        )
    if est.needs_critic and not a.critic:
        raise ConfigError(
            f"algo.estimator={a.estimator} needs algo.critic=true (it reads the critic's values)"
        )
    if a.kl_target is not None and not a.kl_coef > 0:
        raise ConfigError(
            "algo.kl_target adapts algo.kl_coef by multiplying it, so it needs algo.kl_coef > 0 "
            f"(got {a.kl_coef}: no reference model is loaded and the coefficient stays 0)"
        )
    if cfg.data.dynamic_sampling and a.update != "policy_gradient":
        raise ConfigError(
            f"data.dynamic_sampling keeps prompt groups whose rewards vary, for a policy gradient; algo={a.name} "
            "builds DPO pairs, which skip tied groups already (pairs/skipped_ties)"
        )
    group_relative = (est.compares_group or a.group_baseline) and not a.critic
    if cfg.data.dynamic_sampling and not (
        group_relative and not (a.kl_placement == "reward" and a.kl_coef > 0)
    ):
        raise ConfigError(
            f"data.dynamic_sampling leaves out groups with equal rewards, which teach nothing only under a group "
            f"baseline (algo.estimator=group or rloo, or returns with algo.group_baseline) without a critic or KL "
            f"in the reward; algo={a.name} (estimator {a.estimator}) still learns from them"
        )
    if cfg.data.dynamic_sampling_on == "shaped_reward" and not cfg.data.dynamic_sampling:
        raise ConfigError(
            "data.dynamic_sampling_on=shaped_reward chooses the rewards dynamic sampling's variance test sees, and "
            "data.dynamic_sampling is off: set data.dynamic_sampling=true"
        )
    if a.correction in MASKING and a.tis_scope == "stale" and cfg.run.mode == "sync":
        raise ConfigError(
            f"algo.correction={a.correction} with algo.tis_scope=stale corrects nothing in run.mode=sync (every "
            "row is from the current weights): set algo.tis_scope=all to mask the engine/learner mismatch"
        )
    if a.correction == "seq_tis" and a.tis_cap <= 0:
        raise ConfigError(
            "algo.correction=seq_tis needs algo.tis_cap > 0 (the cap is what makes it truncated)"
        )
    if cfg.data.dynamic_sampling and cfg.run.mode == "async" and cfg.run.max_staleness > 1:
        raise ConfigError(
            "data.dynamic_sampling with run.mode=async needs run.max_staleness=1: its refill batches are drawn "
            f"before the next batch, and run.max_staleness={cfg.run.max_staleness} keeps later batches in flight "
            "already, so a checkpoint could not resume right after the refills"
        )
    buffer = cfg.reward.overlong.buffer_tokens
    if buffer and buffer > cfg.generator.max_new_tokens:
        raise ConfigError(
            f"reward.overlong.buffer_tokens={buffer} is over generator.max_new_tokens="
            f"{cfg.generator.max_new_tokens}: the penalty ramps over the last buffer_tokens of a reply"
        )
    if a.clip_eps >= 1:
        raise ConfigError(
            f"algo.clip_eps={a.clip_eps}: the ratio's lower clip 1 - clip_eps must stay above 0"
        )
    low, high = a.correction_low, a.correction_high
    if (low is not None or high is not None) and a.correction not in MASKING:
        raise ConfigError(
            f"algo.correction_low/high bound the masking corrections ({', '.join(MASKING)}), not {a.correction}"
        )
    if low is not None and high is not None and not low < high:
        raise ConfigError(f"algo.correction_low={low} must be below algo.correction_high={high}")
    if a.group_baseline and a.estimator != "returns":
        raise ConfigError(f"algo.group_baseline applies to algo.estimator=returns, not {a.estimator}")
    if a.source == "dataset" and a.update != "dpo":
        raise ConfigError("algo.source=dataset trains on a preference file: it needs algo.update=dpo")
    if a.source == "dataset" and not cfg.dataset.path:
        raise ConfigError(f"algo={a.name} needs dataset.path (a JSONL/parquet preference file)")
    if a.source == "dataset" and a.dpo_reference != "initial":
        raise ConfigError(f"algo={a.name} needs algo.dpo_reference=initial (there is no previous iteration)")
    if a.critic and cfg.critic.colocate and cfg.critic.world_size != cfg.learner.world_size:
        raise ConfigError("critic.colocate needs critic.world_size == learner.world_size")
    samples = cfg.data.prompts_per_iteration * g.samples_per_prompt
    if a.critic and samples % cfg.critic.world_size:
        raise ConfigError(
            f"data.prompts_per_iteration x generator.samples_per_prompt = {samples} must divide by "
            f"critic.world_size={cfg.critic.world_size} (critic ranks step in lock-step on equal shares)"
        )
    compares_group = a.update == "dpo" or est.compares_group or a.group_baseline
    if a.source == "rollouts" and compares_group and g.samples_per_prompt < 2:
        raise ConfigError(
            f"generator.samples_per_prompt must be >= 2 for algo={a.name} (it compares samples of one prompt)"
        )


def _check_durability(cfg: TroupeConfig) -> None:
    f = cfg.faults
    unknown = sorted(set(f.retries) - {"generator", "reward", "learner", "critic"})
    if unknown:
        raise ConfigError(
            f"faults.retries has unknown roles {unknown}; roles: generator, reward, learner, critic"
        )


def _check_resume(cfg: TroupeConfig) -> None:
    """resume= continues a job that writes run checkpoints: RL, offline DPO, rm train rm.stage=gating|bt|haf."""
    if cfg.resume is None:
        return
    if not (cfg.job == "rl" or (cfg.job == "rm_train" and cfg.rm.stage in ("gating", "bt", "haf"))):
        what = f"rm.stage={cfg.rm.stage}" if cfg.job == "rm_train" else f"job={cfg.job}"
        raise ConfigError(
            f"resume={cfg.resume}: {what} has no run checkpoints; resume= continues an RL run, offline DPO, or "
            "rm train with rm.stage=gating|bt|haf"
        )
    if cfg.run.overwrite:
        raise ConfigError(
            f"resume={cfg.resume} and run.overwrite=true contradict each other: overwrite deletes the run "
            "(checkpoints included) that resume continues"
        )


def _check_bundle_output(cfg: TroupeConfig) -> None:
    """A bundle replaces rm.output whole (cluster/jobs/bundle_output.py): rm.output may hold a bundle or nothing,
    and not the run's own outputs or the feature cache."""
    from troupe.cluster.jobs.bundle_output import not_a_bundle

    out = Path(cfg.rm.output).expanduser().resolve()
    for key, inside in (("run.output_dir", cfg.run.output_dir), ("rm.cache", cfg.rm.cache)):
        if Path(inside).expanduser().resolve().is_relative_to(out):
            raise ConfigError(
                f"rm.output={cfg.rm.output} holds {key}={inside}, and writing the bundle replaces rm.output whole; "
                "give the bundle its own folder (default: <run.output_dir>/rm-<rm.name>)"
            )
    refused = not_a_bundle(out)
    if refused:
        raise ConfigError(f"rm.output: {refused}")


def _check_rm_dataset(cfg: TroupeConfig) -> None:
    d = cfg.dataset
    if d.max_pairs_per_subset is not None and not cfg.rm.subset_key:
        raise ConfigError(
            "dataset.max_pairs_per_subset needs rm.subset_key (the record field naming the subset)"
        )
    if cfg.job == "rl" and (d.sample != "first" or d.max_pairs_per_subset is not None):
        raise ConfigError(
            "dataset.sample and dataset.max_pairs_per_subset apply to the reward-model jobs (rm train / rm eval); "
            "offline DPO takes the first dataset.max_pairs pairs"
        )


def _check_reward_fleet(cfg: TroupeConfig) -> None:
    """The reward section, for the jobs that build the reward fleet (rl, rm_serve)."""
    for name, expert in cfg.reward.experts.items():
        if not expert.bundle:
            raise ConfigError(
                f"reward.experts.{name} needs a bundle folder (reward.experts.{name}.bundle=...)"
            )
    check_rewards(cfg, ConfigError)


def _check_autoscale(cfg: TroupeConfig) -> None:
    a = cfg.autoscale
    for pool in ("generators", "reward"):
        bounds = getattr(a, pool)
        if bounds.min > bounds.max:
            raise ConfigError(
                f"autoscale.{pool}.min ({bounds.min}) must be <= autoscale.{pool}.max ({bounds.max})"
            )
    if a.shrink_wait_frac >= a.grow_wait_frac:
        raise ConfigError(
            f"autoscale.shrink_wait_frac ({a.shrink_wait_frac}) must be < autoscale.grow_wait_frac "
            f"({a.grow_wait_frac}): otherwise no wait keeps a pool at its size, and it changes every cooldown"
        )


def _check_custom_resources(cfg: TroupeConfig) -> None:
    """placement.<role>.resources: a mapping of amounts under Ray's rule for resources (typed Any, see schema)."""
    amount = Domain(ge=0, whole_above=1)
    for role in ("generator", "reward", "learner"):
        try:
            resources, _ = getattr(cfg.placement, role).needs()
        except (AttributeError, TypeError, ValueError) as e:
            raise ConfigError(
                f"placement.{role}.resources / labels: expected mappings like {{rollout: 1}} ({e})"
            ) from e
        for name, value in resources.items():
            problem = "expected a finite number" if not math.isfinite(value) else amount.expected(value)
            if problem:
                raise ConfigError(f"placement.{role}.resources.{name}={value!r}: {problem}")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """A choice that depends on another field (the domain of a declared field is checked by its declaration)."""
    problem = Domain(choices=allowed).expected(value)
    if problem:
        raise ConfigError(f"{key}={value!r}: {problem}")


def _check_env(cfg: TroupeConfig) -> None:
    """Multi-turn environments: the target loads here (a bad path fails before Ray starts, naming env.target)."""
    e = cfg.env
    if e.target is None:
        return
    if cfg.generator.backend != "vllm":
        raise ConfigError(
            f"env.target needs generator.backend=vllm (the engine loop), got {cfg.generator.backend}"
        )
    if e.max_tokens >= cfg.generator.max_model_len:
        raise ConfigError(
            f"env.max_tokens={e.max_tokens} leaves no room for the prompt in generator.max_model_len="
            f"{cfg.generator.max_model_len}"
        )
    if cfg.reward.overlong.buffer_tokens > 0:
        raise ConfigError(
            "reward.overlong measures a reply against generator.max_new_tokens; a multi-turn trajectory (env.target) "
            "holds several turns and observations: set reward.overlong.buffer_tokens=0 (env.max_tokens bounds it)"
        )
    if e.partial_rollouts and cfg.run.mode == "async" and cfg.run.deterministic:
        raise ConfigError(
            "env.partial_rollouts with run.mode=async and run.deterministic: a turn continued after a weight sync "
            "depends on when the sync arrived; set env.partial_rollouts=false for a deterministic run"
        )
    try:
        e.factory()
    except PluginError as err:
        raise ConfigError(str(err)) from err
