"""`troupe dpo dataset.path=...`: DPO on a preference file with the learner group alone
(no generators, no reward shards). `run.iterations` passes over the file, `dataset.pairs_per_iteration` pairs
per learner call; the reference is the frozen initial model.
"""

from __future__ import annotations

import random
import time

from troupe.actors.models import resolve_model
from troupe.cluster.config.compose import config_record
from troupe.cluster.config.schema import TroupeConfig
from troupe.cluster.data.preferences import load_preferences, tokenize
from troupe.cluster.durability.checkpoint import save_hf_checkpoint
from troupe.cluster.fleet.learners import LearnerGroup, policy_setup
from troupe.cluster.observe.metrics import OFFLINE_DPO_COLUMNS
from troupe.cluster.run.job import Job
from troupe.cluster.run.learn import pad_to_multiple
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
    calls = cfg.run.iterations * -(-len(pairs) // per_call)
    with Job(cfg, OFFLINE_DPO_COLUMNS, total=calls, fresh=True) as job:
        job.connect_ray()
        spec = policy_setup(cfg, model_path, total_steps=calls * lc.epochs * lc.mini_batches)
        group = job.on_exit(LearnerGroup(spec, learner_env(lc), cfg.ray.actor_timeout_s), "shutdown")
        group.wait_ready()
        job.start(f"troupe: offline DPO on {len(pairs)} pairs from {cfg.dataset.path} (skipped {skipped})")
        rng = random.Random(cfg.run.seed)
        step = 0
        for epoch in range(cfg.run.iterations):
            order = pairs[:]
            rng.shuffle(order)
            for lo in range(0, len(order), per_call):
                chunk = pad_to_multiple(order[lo : lo + per_call], lc.world_size, rng)
                t0 = time.perf_counter()
                train = group.train_dpo(chunk)
                row = {"iteration": step, "epoch": epoch, "time/learn": time.perf_counter() - t0}
                job.record(row | {f"train/{k}": v for k, v in train.items()})
                step += 1
        checkpoint = None
        if cfg.run.save_checkpoint:
            state = {
                "passes": cfg.run.iterations,
                "pairs": len(pairs),
                "skipped": skipped,
                "config": config_record(cfg),
            }
            checkpoint = save_hf_checkpoint(group, job.out_dir / "checkpoint-final", model_path, state)
        return job.finish(checkpoint=checkpoint, skipped=skipped)
