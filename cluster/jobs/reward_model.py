"""`troupe rm train ...` and `troupe rm eval ...`: reward-model training stages and pairwise evaluation.

troupe rm train rm.stage=regression rm.ratings_path=r.jsonl 'rm.scales={helpfulness: [1, 5]}'  [rm.scales_path=y]
troupe rm train rm.stage=gating rm.stage1=<bundle> dataset.path=pairs.jsonl rm.verbosity=length
troupe rm train rm.stage=probe dataset.path=pairs.jsonl      (frozen linear Bradley-Terry probe)
troupe rm train rm.stage=bt|haf dataset.path=pairs.jsonl      (DeepSpeed learner group)
troupe rm eval rm.bundle=<bundle> dataset.path=test.jsonl [rm.subset_key=subset] [rm.max_length=N]
              [dataset.max_pairs=N] [dataset.max_pairs_per_subset=N] [dataset.sample=first|random]
Every report counts the records the loader dropped (by reason) and the rows or pairs the truncation rule cut;
every training stage warns when the rule cut any, and prints the exact next command(s) (`next: troupe ...`).
A gating or probe stage whose Bradley-Terry loss stays at chance fails (the bundle is marked failed) unless
rm.allow_chance=true.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import replace
from pathlib import Path

from troupe.actors.learner.config import LoraConfig
from troupe.actors.models import resolve_model
from troupe.cluster.config.checks import ConfigError
from troupe.cluster.config.schema import TroupeConfig
from troupe.cluster.data.preferences import load_preferences
from troupe.cluster.data.ratings import load_ratings, resolve_scales
from troupe.cluster.observe.metrics import RM_COLUMNS
from troupe.cluster.run.job import Job


def run_rm_job(cfg: TroupeConfig) -> dict:
    if cfg.job == "rm_serve":
        from troupe.cluster.jobs.rm_serve import run_rm_serve

        return run_rm_serve(cfg)
    if cfg.job == "rm_import":
        from troupe.cluster.jobs.rm_import import run_rm_import

        return run_rm_import(cfg)
    from troupe.actors.reward.bundle import FailedBundle
    from troupe.cluster.jobs.rm_training import ChanceLevel

    # bt / haf write metrics.jsonl and TensorBoard: a new run of them. The other stages and rm eval add their
    # bundle or report beside the earlier stages' (they share the feature cache).
    learner_stage = cfg.job == "rm_train" and cfg.rm.stage in ("bt", "haf")
    with Job(cfg, RM_COLUMNS, fresh=learner_stage and not cfg.resume) as job:
        try:
            folder, stats = _train(cfg, job) if cfg.job == "rm_train" else (None, evaluate_bundle(cfg, job))
        except (ChanceLevel, FailedBundle) as e:  # the CLI prints a ConfigError's message alone, exit 2
            raise ConfigError(str(e)) from e
        if folder is not None:
            print(f"reward bundle: {folder}\n{json.dumps(stats, indent=2, default=str)}", flush=True)
        result = job.finish(bundle=folder, report=stats.get("path")) | {"stats": stats}
        if folder is not None:
            for line in next_commands(cfg, folder, stats):
                print(f"next: {line}", flush=True)
        return result


def _train(cfg: TroupeConfig, job: Job) -> tuple[Path, dict]:
    rm = cfg.rm
    if rm.stage == "regression":
        from troupe.cluster.jobs.rm_training import train_regression

        scales = resolve_scales(rm.scales, rm.scales_path)
        ratings = load_ratings(rm.ratings_path, scales, cfg.dataset.prompt_key, rm.response_key)
        print(
            f"stage 1: {len(ratings.responses)} rated responses (dropped {dict(ratings.skipped)}), "
            f"scales {scales}, features cached in {rm.cache}",
            flush=True,
        )
        folder, stats = train_regression(
            resolve_model(rm.backbone, key="rm.backbone"),
            ratings,
            rm.name,
            rm.output,
            rm.cache,
            train_length(cfg),
            seed=cfg.run.seed,
            progress=cfg.run.progress_bar,
            report=True,
        )
        stats["scales"] = scales
    elif rm.stage == "gating":
        from troupe.actors.reward.bundle import read_info
        from troupe.cluster.jobs.gating_checkpoints import gating_checkpoints
        from troupe.cluster.jobs.rm_training import train_gating_stage

        stage1_length = read_info(rm.stage1).max_length
        if rm.max_length is not None and rm.max_length != stage1_length:
            raise ConfigError(
                f"rm.max_length={rm.max_length} differs from the stage-1 bundle's max_length {stage1_length} "
                f"(rm.stage1={rm.stage1}): the gate must see the features its heads were fitted on"
            )
        prefs, skipped = _prefs(cfg)
        print(f"stage 2: {len(prefs)} pairs (dropped {skipped}), features cached in {rm.cache}", flush=True)
        folder, stats = train_gating_stage(
            rm.stage1,
            prefs,
            rm.output,
            rm.cache,
            rm.verbosity,
            rm.verbosity_threshold,
            rm.gating_steps,
            rm.gating_lr,
            rm.gating_batch,
            rm.gating_hidden,
            rm.gating_layers,
            rm.gating_temperature,
            rm.gating_dropout,
            cfg.run.seed,
            progress=cfg.run.progress_bar,
            report=True,
            allow_chance=rm.allow_chance,
            checkpoints=gating_checkpoints(cfg, job),
        )
        stats["dropped"] = skipped
    elif rm.stage == "probe":
        from troupe.cluster.jobs.rm_training import train_probe_stage

        prefs, skipped = _prefs(cfg)
        max_length = train_length(cfg)
        print(
            f"probe: {len(prefs)} pairs (dropped {skipped}), max_length {max_length}, features cached in "
            f"{rm.cache}",
            flush=True,
        )
        folder, stats = train_probe_stage(
            resolve_model(rm.backbone, key="rm.backbone"),
            prefs,
            rm.name,
            rm.output,
            rm.cache,
            max_length,
            rm.probe_l2,
            rm.probe_steps,
            progress=cfg.run.progress_bar,
            report=True,
            allow_chance=rm.allow_chance,
        )
        stats["dropped"] = skipped
    else:
        folder, stats = train_bt_or_haf(cfg, job=job)
    return folder, stats


def _prefs(cfg: TroupeConfig):
    d = cfg.dataset
    prefs, skipped = load_preferences(
        d.path,
        d.prompt_key,
        d.chosen_key,
        d.rejected_key,
        d.max_pairs,
        cfg.rm.subset_key,
        d.sample,
        cfg.run.seed,
        d.max_pairs_per_subset,
    )
    if not prefs:
        raise ValueError(f"{d.path}: no usable preference pairs (skipped: {dict(skipped)})")
    return prefs, dict(skipped)


def train_length(cfg: TroupeConfig) -> int:
    """rm.max_length when set, else dataset.max_length (see RmConfig.max_length)."""
    return cfg.rm.max_length if cfg.rm.max_length is not None else cfg.dataset.max_length


def train_bt_or_haf(cfg: TroupeConfig, prefs=None, job: Job | None = None) -> tuple[Path, dict]:
    """BT (alpha = 0) or HaF on the learner group; the bundle holds the trained body and the reward head."""
    if job is None:
        with Job(cfg, RM_COLUMNS) as own:
            return train_bt_or_haf(cfg, prefs, own)
    from transformers import AutoTokenizer

    from troupe.actors.learner.reward_trainer import RewardTrainer
    from troupe.cluster.durability.fingerprint import resume_point
    from troupe.cluster.fleet.learners import LearnerGroup, policy_setup
    from troupe.cluster.jobs.bundle_output import save_reward_head_bundle
    from troupe.cluster.jobs.pair_checkpoints import PairCheckpoints, restore, rewind
    from troupe.cluster.jobs.pair_passes import PairPasses
    from troupe.cluster.jobs.rm_training import (
        tokenize_for_rm,
        train_reward_head,
        warn_cut,
    )
    from troupe.cluster.run.runtime import learner_env

    rm, lc = cfg.rm, cfg.learner
    backbone = resolve_model(rm.backbone, key="rm.backbone")
    skipped = {}
    if prefs is None:
        prefs, skipped = _prefs(cfg)
    max_length = train_length(cfg)
    pairs, cut = tokenize_for_rm(prefs, AutoTokenizer.from_pretrained(backbone), max_length)
    warn_cut(cut, len(pairs), "pairs (either side)", max_length)
    per_call = max(cfg.dataset.pairs_per_iteration, lc.world_size)
    passes = PairPasses(len(pairs), rm.epochs, per_call, lc.world_size, cfg.run.seed)
    steps = passes.total * lc.mini_batches
    alpha = rm.haf_alpha if rm.stage == "haf" else 0.0
    policy = policy_setup(cfg, backbone, total_steps=steps)
    # The reward model trains its full body; LoRA applies to the policy learner only.
    spec = replace(policy, train=replace(lc, lora=LoraConfig()), haf_alpha=alpha, haf_beta=rm.haf_beta)
    # verified and admitted before any actor starts (the folder is held by `job`)
    resume, identity = resume_point(cfg, job.out_dir)
    checkpoints = PairCheckpoints(cfg, job.out_dir, identity)
    job.connect_ray()
    job.on_exit(checkpoints.watch_signals(), "__call__")  # after ray.init, whose handler it replaces
    group = job.on_exit(
        LearnerGroup(spec, learner_env(lc), cfg.ray.actor_timeout_s, role=RewardTrainer), "shutdown"
    )
    group.wait_ready()
    if resume is not None:
        restore(group, passes, *resume)
    job.start(
        f"troupe: {rm.stage} reward model on {len(pairs)} pairs (dropped {skipped}, cut {cut} to "
        f"max_length {max_length}), backbone {rm.backbone}"
        + (f"; resumed from {resume[0]} at step {passes.step}" if resume else "")
    )
    redone = rewind(job, resume[1]) if resume else 0
    history = train_reward_head(group, pairs, passes, job.record, checkpoints)
    earlier = resume[1] if resume else {}
    stats = {
        "stage": rm.stage,
        "alpha": alpha,
        "pairs": len(pairs),
        "dropped": skipped,
        "cut": cut,
        "max_length": max_length,
        "first": earlier["first"] if earlier else history[0],
        "last": history[-1] if history else earlier["last"],
        "redone_steps": redone,
    }
    folder = save_reward_head_bundle(group, rm.output, rm.name, backbone, max_length, {rm.stage: stats})
    return folder, stats


def _arg(path) -> str:
    return shlex.quote(str(path))


def _eval_pairs(cfg: TroupeConfig) -> str:
    """The preference file to suggest for `rm eval`: the held-out twin of dataset.path (`*train*` -> `*test*`)
    when it exists, else dataset.path itself, else the file `troupe rm data pairs --split test` writes."""
    path = cfg.dataset.path
    if not path:
        return "test.jsonl"
    twin = Path(path).with_name(Path(path).name.replace("train", "test"))
    return str(twin) if twin != Path(path) and twin.exists() else str(path)


def _carried(cfg: TroupeConfig) -> list[str]:
    """Overrides the next command needs to find this run's feature cache when it is not the default."""
    out = []
    if Path(cfg.rm.cache) != Path(cfg.run.output_dir) / "feature-cache":
        out.append(f"rm.cache={_arg(cfg.rm.cache)}")
    return out


def next_commands(cfg: TroupeConfig, folder, stats: dict) -> list[str]:
    """The exact commands that continue from the bundle a training stage just wrote."""
    from troupe.actors.reward.bundle import read_info

    rm = cfg.rm
    info = read_info(folder)
    run = [f"run.output_dir={_arg(cfg.run.output_dir)}"] if cfg.run.output_dir != "outputs/troupe" else []
    carry = run + _carried(cfg)
    test = _eval_pairs(cfg)
    subset = [f"rm.subset_key={rm.subset_key}"] if rm.subset_key else ["rm.subset_key=subset"]
    out = []
    if rm.stage == "regression":
        verbosity = ["rm.verbosity=verbosity"] if "verbosity" in info.objectives else []
        stage2 = Path(folder).with_name(Path(folder).name + "-gating")
        out.append(
            " ".join(
                ["troupe rm train rm.stage=gating", f"rm.stage1={_arg(folder)}", f"rm.output={_arg(stage2)}"]
                + [f"dataset.path={_arg(cfg.dataset.path or 'pairs.jsonl')}"]
                + verbosity
                + carry
            )
        )
        key = [f"rm.eval_key={info.name}/{info.objectives[0]}"] if info.objectives else []
        out.append(
            " ".join(
                ["troupe rm eval", f"rm.bundle={_arg(folder)}", f"dataset.path={_arg(test)}"]
                + key
                + subset
                + carry
            )
        )
    else:
        out.append(
            " ".join(
                ["troupe rm eval", f"rm.bundle={_arg(folder)}", f"dataset.path={_arg(test)}"] + subset + carry
            )
        )
    if rm.stage == "gating":  # the RLHF demo with this bundle as the holistic reward of the ALaRM hierarchy
        holistic = [] if info.name == "armo" else [f"reward.hierarchy.holistic={info.name}"]
        out.append(
            " ".join(["troupe train --config-name demo_hierarchical", f"reward.experts.armo.bundle={_arg(folder)}"]
                     + holistic)
        )  # fmt: skip
    return out


def evaluate_bundle(cfg: TroupeConfig, job: Job) -> dict:
    from troupe.cluster.jobs.rm_eval import evaluate_bundle as evaluate

    prefs, skipped = _prefs(cfg)
    return evaluate(cfg, job.out_dir, prefs, skipped)
