"""Runs a job from its typed config: validate it, start or join Ray, build the fleet, run the loop, write metrics
(JSONL) and a final HF checkpoint. The CLI (cluster/cli.py) and the Python API (troupe.train, ...) both call `run`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path

import ray

from troupe.actors.generator.actor import Generator
from troupe.actors.generator.sampling import Sampling
from troupe.actors.learner.ppo import AdaptiveKL
from troupe.actors.models import resolve_model
from troupe.cluster.config.checks import validate
from troupe.cluster.config.compose import config_record
from troupe.cluster.config.schema import TroupeConfig, register
from troupe.cluster.data.prompts import build_prompt_sources
from troupe.cluster.durability.checkpoint import save_hf_checkpoint
from troupe.cluster.durability.faults import RetryBudget
from troupe.cluster.durability.fingerprint import resume_point
from troupe.cluster.durability.run_checkpoints import (
    RunCheckpoints,
    driver_state,
    rejoin_generators,
    restore_driver_state,
)
from troupe.cluster.durability.signing import load_key
from troupe.cluster.fleet.elastic import FleetControl
from troupe.cluster.fleet.learners import LearnerGroup, critic_group, critic_setup, policy_setup
from troupe.cluster.fleet.placement import RankPlacement, pool_options
from troupe.cluster.fleet.pool import Pool
from troupe.cluster.fleet.reward_model import build_aggregation, build_reward_fleet, reward_replicas
from troupe.cluster.jobs.offline_dpo import run_offline_dpo
from troupe.cluster.observe.metrics import rl_columns
from troupe.cluster.run.job import Job
from troupe.cluster.run.loop import RunState, initial_eval, train
from troupe.cluster.run.pipeline import RolloutPipeline
from troupe.cluster.run.runtime import check_capacity, generator_env, learner_env
from troupe.cluster.run.scoring import ErrorPolicy
from troupe.cluster.run.shaping import OverlongShaping
from troupe.cluster.sync.ipc import IpcSync
from troupe.cluster.sync.nccl import NcclSync
from troupe.cluster.sync.object_store import WEIGHTS_GROUP
from troupe.cluster.sync.transport import weight_transport

log = logging.getLogger("troupe.driver")
register()


def build_fleet(cfg: TroupeConfig, model_path: str, resume: tuple[Path, dict] | None = None) -> RunState:
    """Every actor of the run. `resume` (a verified checkpoint and its state): the pools start at its layout."""
    from transformers import AutoTokenizer

    timeout, faults = cfg.ray.actor_timeout_s, cfg.faults
    g, r, lc = cfg.generator, cfg.reward, cfg.learner
    # Prompts first: a bad data path or key fails before minutes of actor start-up.
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    train_prompts, eval_set = build_prompt_sources(cfg, tokenizer)
    budget = RetryBudget(faults.retries, faults.retry_window_iterations)
    placement = _rank_placement(cfg)
    generators = _generator_pool(cfg, model_path, budget, placement)
    rewards = build_reward_fleet(cfg, budget)

    policy = policy_setup(cfg, model_path)
    # Learners first and not awaited: their DeepSpeed setup overlaps with the generators' engine start.
    deterministic = cfg.run.deterministic
    learners = LearnerGroup(
        policy,
        learner_env(lc, deterministic),
        timeout,
        placement=placement,
        deadline_s=faults.learn_s,
        owns_placement=True,
    )
    critic = None
    if cfg.algo.critic:
        critic_cfg = critic_setup(cfg, policy)
        env = learner_env(critic_cfg.train, deterministic)
        c, p = cfg.critic, cfg.placement
        own = None if c.colocate else RankPlacement(c.world_size, c.num_cpus, c.num_gpus, timeout, p.learner)
        critic = critic_group(
            critic_cfg, env, timeout, own or placement, faults.learn_s, owns=own is not None
        )
    layout = resume[1]["fleet"] if resume else {"generators": g.replicas, "reward": reward_replicas(cfg)}
    rewards.spawn(layout["reward"])
    generators.spawn(layout["generators"])
    learners.wait_ready()
    if critic is not None:
        critic.wait_ready()
    sampling = Sampling(
        n=g.samples_per_prompt, temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens
    )
    a = cfg.algo
    return RunState(
        generators,
        rewards,
        learners,
        build_aggregation(r),
        train_prompts,
        sampling,
        iterations=cfg.run.iterations,
        eval_set=eval_set,
        eval=cfg.eval,
        monitor=cfg.monitor,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        algo=a,
        critic=critic,
        kl=AdaptiveKL(a.kl_coef, a.kl_target, a.kl_horizon),
        rng=random.Random(cfg.run.seed),
        faults=faults,
        budget=budget,
        seed=cfg.run.seed if deterministic else None,
        on_error=ErrorPolicy.of(r),
        overlong=OverlongShaping(g.max_new_tokens, r.overlong.buffer_tokens, r.overlong.penalty),
        max_batches_drawn=cfg.data.max_oversampling if cfg.data.dynamic_sampling else 1,
        judge_shaped=cfg.data.dynamic_sampling_on == "shaped_reward",
        samples_logged=cfg.logging.rollouts,
        # sync is depth 0, and every rollout then comes from the learners' current weights
        pipeline=RolloutPipeline(*(2 * [cfg.run.max_staleness if cfg.run.mode == "async" else 0])),
        sync_bucket_mb=cfg.sync.bucket_mb,
        sleep_level=g.sleep_level,
        gpu_sync={"nccl": NcclSync(faults.sync_s, g.tensor_parallel_size), "ipc": IpcSync(faults.sync_s)}.get(
            transport_of(cfg)
        ),
        fleet=FleetControl(
            Path(cfg.run.output_dir).resolve(),
            cfg.autoscale,
            fixed={"generators"} if cfg.placement.layout == "colocated" else set(),
        ),
    )


def _rank_placement(cfg: TroupeConfig) -> RankPlacement:
    """One bundle per learner rank, holding what shares it: the critic rank (critic.colocate) and generator i
    (placement.layout=colocated), with fractional GPUs each."""
    lc, c, g, p = cfg.learner, cfg.critic, cfg.generator, cfg.placement
    cpus, gpus = lc.num_cpus, lc.num_gpus
    if cfg.algo.critic and c.colocate:
        cpus, gpus = cpus + c.num_cpus, gpus + c.num_gpus
    colocated = p.layout == "colocated"
    if colocated:
        cpus, gpus = cpus + g.num_cpus, gpus + g.num_gpus
    return RankPlacement(
        lc.world_size,
        cpus,
        gpus,
        cfg.ray.actor_timeout_s,
        p.learner,
        reserve=colocated,
        wait_s=p.wait_s,
        may_grow=cfg.ray.address is not None,
    )


def transport_of(cfg: TroupeConfig) -> str:
    g = cfg.generator
    return weight_transport(
        cfg.sync.transport, g.backend, g.num_gpus, cfg.learner.num_gpus, cfg.placement.layout
    )


def _generator_pool(cfg: TroupeConfig, model_path: str, budget: RetryBudget, ranks: RankPlacement) -> Pool:
    """Generators placed by placement.generator (split), or generator i in learner rank i's bundle (colocated)."""
    g, p = cfg.generator, cfg.placement
    if p.layout == "colocated":
        where = ranks.options_for
    else:
        demand = {"CPU": g.num_cpus, "GPU": g.num_gpus}
        options = pool_options("generator", p.generator, demand, p.wait_s, cfg.ray.address is not None)
        where = lambda _slot: options  # noqa: E731
    env = cfg.env if cfg.env.target else None
    # partial rollouts (async mode): weights are taken on a second thread while a multi-turn generate runs
    partial = env is not None and env.partial_rollouts and cfg.run.mode == "async"
    if env is not None:  # the generator's effective setting: sync runs need no mid-turn weight loads
        env = dataclasses.replace(env, partial_rollouts=partial)
    remote = (
        ray.remote(concurrency_groups={WEIGHTS_GROUP: 1})(Generator) if partial else ray.remote(Generator)
    )

    transfer = transport_of(cfg)  # nccl / ipc: the engines take weights from the learners on vLLM's engines

    def make(index: int, slot: int):
        return remote.options(
            num_cpus=g.num_cpus,
            num_gpus=g.num_gpus,
            runtime_env={"env_vars": generator_env(g)},
            max_restarts=0,
            **where(slot),
        ).remote(
            g,
            model_path,
            index,
            cfg.run.seed,
            cfg.model.trust_remote_code,
            env,
            p.layout == "colocated",
            transfer,
        )

    pool = Pool("generator", make, cfg.ray.actor_timeout_s, budget)
    pool.weights_group = WEIGHTS_GROUP if partial else None
    return pool


def run(cfg: TroupeConfig) -> dict:
    """Run a whole job; returns paths and the last iteration's metrics."""
    validate(cfg)
    if cfg.job == "best_of_n":
        from troupe.cluster.jobs.best_of_n import best_of_n

        return best_of_n(cfg)
    if cfg.job != "rl":
        from troupe.cluster.jobs.reward_model import run_rm_job

        return run_rm_job(cfg)
    if cfg.algo.source == "dataset":
        return run_offline_dpo(cfg)
    model_path = resolve_model(cfg.model.policy)
    out_dir = Path(cfg.run.output_dir).resolve()
    load_key()  # every run can write a checkpoint (on SIGTERM): a key that cannot be used fails now
    # The folder is held (and, for a fresh run, checked) before the checkpoint is read or any actor starts.
    with Job(cfg, _table_columns(cfg), total=cfg.run.iterations, fresh=not cfg.resume) as job:
        resume, identity = resume_point(cfg, out_dir)
        job.connect_ray()
        check_capacity(cfg)
        run_state = build_fleet(cfg, model_path, resume)
        job.on_exit(run_state, "shutdown")
        run_state.fleet.publish(run_state)  # the pools `troupe fleet` may resize, and their bounds
        checkpoints = RunCheckpoints(
            out_dir, cfg.run.checkpoint_every, cfg.run.keep_checkpoints, model_path, identity=identity
        )
        start = 0
        if resume is not None:
            start = resume_run(run_state, checkpoints, job, *resume)
        job.start(
            f"troupe: fleet ready in {job.elapsed_s:.0f}s ({cfg.generator.replicas} generator, "
            f"{cfg.reward.shards} reward shard, {_count(cfg.learner.world_size, 'learner rank')}); "
            f"policy {cfg.model.policy}"
            + (f"; resumed from {resume[0]} at iteration {start}" if resume else "")
        )
        if resume is not None:
            run_state.ledger.resumed(job.rewind(start - 1))
        checkpoints.initial = driver_state(run_state, -1)
        job.on_exit(checkpoints.watch_signals(), "__call__")
        if cfg.run.checkpoint_every == 0 and cfg.faults.retries.get("learner", 0):
            log.info(  # the log file, not the console: the demo runs without checkpoints
                "run.checkpoint_every=0: a lost learner rank restarts the run from its first iteration; "
                "set run.checkpoint_every=N to lose at most N iterations"
            )
        # The baseline later evaluations are read against (a resumed run has its row already).
        if run_state.eval_set is not None and resume is None:
            job.record(initial_eval(run_state))
        try:
            train(run_state, job, checkpoints, start)
        finally:
            _write_summary(job.out_dir, run_state)
        checkpoint = None
        if cfg.run.save_checkpoint:
            state = {
                "iteration": cfg.run.iterations,
                "weight_version": run_state.version,
                "policy": cfg.model.policy,
                # The holistic normaliser's statistics: a resumed run or a served RM scores with the same ones.
                "reward_aggregation": run_state.aggregation.state_dict(),
                "data": run_state.pipeline.cursor_state(run_state.prompts),  # the cursor: epoch, position
                "config": config_record(cfg),
                "run_id": identity["run_id"],
            }
            checkpoint = save_hf_checkpoint(
                run_state.learners, job.out_dir / "checkpoint-final", model_path, state
            )
        return job.finish(checkpoint=checkpoint)


def resume_run(run_state: RunState, checkpoints: RunCheckpoints, job: Job, folder: Path, state: dict) -> int:
    """Give the ranks their DeepSpeed states, the driver its state and the generators the checkpoint's weights
    (pushed like a sync, so a replacement generator catches up the same way); returns the next iteration."""
    checkpoints.load_ranks(run_state, folder)
    restore_driver_state(run_state, state, counters=True)
    rejoin_generators(run_state)
    checkpoints.last = folder
    return state["iteration"] + 1


def _write_summary(out_dir: Path, run_state: RunState) -> None:
    """<run dir>/summary.json: where every prompt went, and the losses per role."""
    summary = {"accounting": run_state.ledger.summary(), **run_state.budget.metrics()}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))


def _table_columns(cfg: TroupeConfig) -> tuple:
    from troupe.actors.reward.bundle import read_info

    r = cfg.reward
    objectives = [read_info(e.bundle).name for e in r.experts.values()] + list(r.objectives)
    eval_mode = ("greedy" if cfg.eval.greedy else "sampled") if cfg.data.eval else None
    return rl_columns(objectives, r.aggregation == "hierarchy", eval_mode, env=cfg.env.target is not None)


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"
