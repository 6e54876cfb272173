"""`troupe dpo dataset.path=...`: DPO on a preference file with the learner group alone
(no generators, no reward shards). `run.iterations` passes over the file, `dataset.pairs_per_iteration` pairs
per learner call; the reference is the frozen initial model. `run.checkpoint_every=N` writes a run checkpoint
every N learner calls (cluster/jobs/pair_checkpoints.py); `resume=latest` continues after the newest one.
"""

from __future__ import annotations

import time

from troupe.actors.models import resolve_model
from troupe.cluster.config.compose import config_record
from troupe.cluster.config.schema import TroupeConfig
from troupe.cluster.data.preferences import load_preferences, tokenize
from troupe.cluster.durability.checkpoint import save_hf_checkpoint
from troupe.cluster.durability.fingerprint import resume_point
from troupe.cluster.fleet.learners import LearnerGroup, policy_setup
from troupe.cluster.jobs.pair_checkpoints import PairCheckpoints, restore, rewind
from troupe.cluster.jobs.pair_passes import PairPasses
from troupe.cluster.observe.metrics import OFFLINE_DPO_COLUMNS
from troupe.cluster.run.job import Job
from troupe.cluster.run.runtime import learner_env


def load_pairs(cfg: TroupeConfig, model_path: str):
    from transformers import AutoTokenizer

    d = cfg.dataset
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    prefs, skipped = load_preferences(d.path, d.prompt_key, d.chosen_key, d.rejected_key, d.max_pairs)
    pairs, too_long = tokenize(prefs, tokenizer, d.max_length)
    skipped.update(too_long)
    if not pairs:
        raise ValueError(f"{d.path}: no usable preference pairs (skipped: {dict(skipped)})")
    return pairs, dict(skipped)


def run_offline_dpo(cfg: TroupeConfig) -> dict:
    model_path = resolve_model(cfg.model.policy)
    pairs, skipped = load_pairs(cfg, model_path)
    lc = cfg.learner
    per_call = max(cfg.dataset.pairs_per_iteration, lc.world_size)
    passes = PairPasses(len(pairs), cfg.run.iterations, per_call, lc.world_size, cfg.run.seed)
    calls = passes.total
    with Job(cfg, OFFLINE_DPO_COLUMNS, total=calls, fresh=not cfg.resume) as job:
        # the folder is held before the checkpoint is read; it is verified and admitted before any actor starts
        resume, identity = resume_point(cfg, job.out_dir)
        checkpoints = PairCheckpoints(cfg, job.out_dir, identity)
        job.connect_ray()
        job.on_exit(checkpoints.watch_signals(), "__call__")  # after ray.init, whose handler it replaces
        spec = policy_setup(cfg, model_path, total_steps=calls * lc.epochs * lc.mini_batches)
        group = job.on_exit(LearnerGroup(spec, learner_env(lc), cfg.ray.actor_timeout_s), "shutdown")
        group.wait_ready()
        if resume is not None:
            restore(group, passes, *resume)
        job.start(
            f"troupe: offline DPO on {len(pairs)} pairs from {cfg.dataset.path} (skipped {skipped})"
            + (f"; resumed from {resume[0]} at step {passes.step}" if resume else "")
        )
        redone = rewind(job, resume[1]) if resume else 0
        for epoch, step, chunk in passes:
            t0 = time.perf_counter()
            train = group.train_dpo([pairs[i] for i in chunk])
            row = {"iteration": step, "epoch": epoch, "time/learn": time.perf_counter() - t0}
            job.record(row | {f"train/{k}": v for k, v in train.items()})
            if checkpoints.due(step):
                checkpoints.save(group, passes, step)
        checkpoint = None
        if cfg.run.save_checkpoint:
            state = {
                "passes": cfg.run.iterations,
                "pairs": len(pairs),
                "skipped": skipped,
                "config": config_record(cfg),
                "run_id": identity["run_id"],
            }
            checkpoint = save_hf_checkpoint(group, job.out_dir / "checkpoint-final", model_path, state)
        return job.finish(checkpoint=checkpoint, skipped=skipped, redone_steps=redone)
