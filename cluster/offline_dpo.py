"""`troupe algo=dpo_offline dataset.path=...`: DPO on a preference file with the learner group alone
(no generators, no reward shards). `run.iterations` passes over the file, `dataset.pairs_per_iteration` pairs
per learner call; the reference is the frozen initial model.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from omegaconf import OmegaConf

from actors.models import resolve_model
from cluster.checkpoint import save_hf_checkpoint
from cluster.config import TroupeConfig
from cluster.learn import pad_to_multiple
from cluster.learner_group import LearnerGroup, policy_setup
from cluster.metrics import OFFLINE_DPO_COLUMNS, MetricsWriter, table_header, table_row
from cluster.preference_data import load_preferences, tokenize
from cluster.runtime import learner_env, start_ray


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
    started = time.perf_counter()
    out_dir = Path(cfg.run.output_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(cfg.model.policy)
    pairs, skipped = load_pairs(cfg, model_path)
    per_call = max(cfg.dataset.pairs_per_iteration, cfg.learner.world_size)
    calls_per_pass = -(-len(pairs) // per_call)
    lc = cfg.learner
    spec = policy_setup(
        cfg, model_path, total_steps=cfg.run.iterations * calls_per_pass * lc.epochs * lc.mini_batches
    )
    start_ray(cfg.ray)
    group = LearnerGroup(spec, learner_env(lc), cfg.ray.actor_timeout_s)
    group.wait_ready()
    rng = random.Random(cfg.run.seed)
    metrics = MetricsWriter(out_dir / "metrics.jsonl")
    show = cfg.run.print_table
    if show:
        print(
            f"troupe: offline DPO on {len(pairs)} pairs from {cfg.dataset.path} (skipped {skipped})",
            flush=True,
        )
        print(table_header(OFFLINE_DPO_COLUMNS), flush=True)
    last: dict = {}
    step = 0
    try:
        for epoch in range(cfg.run.iterations):
            order = pairs[:]
            rng.shuffle(order)
            for lo in range(0, len(order), per_call):
                chunk = pad_to_multiple(order[lo : lo + per_call], lc.world_size, rng)
                t0 = time.perf_counter()
                train = group.train_dpo(chunk)
                last = {"iteration": step, "epoch": epoch, "time/learn": time.perf_counter() - t0}
                last.update({f"train/{k}": v for k, v in train.items()})
                metrics.write(last)
                if show:
                    print(table_row(last, OFFLINE_DPO_COLUMNS), flush=True)
                step += 1
        checkpoint = None
        if cfg.run.save_checkpoint:
            state = {
                "passes": cfg.run.iterations,
                "pairs": len(pairs),
                "skipped": skipped,
                "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
            }
            checkpoint = save_hf_checkpoint(group, out_dir / "checkpoint-final", model_path, state)
    finally:
        metrics.close()
        group.shutdown()
    total = time.perf_counter() - started
    if show:
        print(f"metrics: {metrics.path}\ncheckpoint: {checkpoint}\ntotal: {total:.0f}s", flush=True)
    return {
        "metrics": metrics.path,
        "checkpoint": checkpoint,
        "last": last,
        "skipped": skipped,
        "total_s": total,
    }
