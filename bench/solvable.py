"""A GSM8K subset rule by the base policy's own pass rate: keep the problems that the untrained policy answers right
at least once in `k` sampled answers, sampled as the recipe samples (its chat template, system prompt, temperature,
top-p and token cap; one reply, so not for recipes with an environment). The anchors filter RL data by the base
model's pass rate (DAPO's and Skywork-OR1's data, prime-rl's difficulty filtering): a problem no sample solves gives
GRPO no advantage.

The rule is decided before any training, on a pool that train and dev are then carved from, so before and after are
both measured on problems of the same band; the evaluations themselves are fresh samples (or greedy), not the
filter's. Sampling runs one vLLM engine in a child process (its memory is gone before the runs start) and is cached
next to the subset: `passes.json` maps each problem's source line to its right answers out of k, under a key made of
what decides them (the pool's rows, the composed model/data/generator settings, k).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from troupe.actors.protocol import Prompt
from troupe.actors.reward.math_answer import is_correct

SAMPLER = 1  # bump when the sampling below changes what it counts


def pass_counts(pool: list[dict], recipe: str, overrides: list[str], k: int, cache: Path) -> dict[int, int]:
    """Right answers among `k` samples of the base policy for each row of `pool` (rows carry `source_line`), keyed
    by source line; read from `cache` when it was made for the same rows, settings and k."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    pool_file = cache.with_suffix(".pool.jsonl")
    pool_file.write_text("".join(json.dumps(r) + "\n" for r in pool))
    cfg = _pool_config(str(pool_file), len(pool), recipe, overrides)
    if cfg.env.target:
        raise ValueError(
            f"the pass-rate rule samples one reply per problem; recipe {recipe!r} has an env.target"
        )
    settings = {name: dataclasses.asdict(getattr(cfg, name)) for name in ("model", "data", "generator")}
    settings["data"].pop("train"), settings["data"].pop("eval")  # the pool file's path: its rows are hashed
    key = {
        "sampler": SAMPLER,
        "k": k,
        "rows_sha256": hashlib.sha256(pool_file.read_bytes()).hexdigest(),
        "settings_sha256": hashlib.sha256(
            json.dumps(settings, sort_keys=True, default=str).encode()
        ).hexdigest(),
    }
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved["key"] == key:
            return {int(line): n for line, n in saved["passes"].items()}
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        passes = child.submit(_sample, str(pool_file), len(pool), recipe, overrides, k).result()
    cache.write_text(json.dumps({"key": key, "passes": passes}))
    return {int(line): n for line, n in passes.items()}


def solvable_rule(passes: dict[int, int]):
    """The row filter: problems with at least one right answer among the base policy's samples."""
    return lambda row: passes.get(row["source_line"], 0) > 0


def count_right(prompts: Sequence[Prompt], replies: Sequence[Sequence[str]]) -> dict[str, int]:
    """Per prompt uid, how many of its replies give its reference answer (the correctness objective's check)."""
    return {
        p.uid: sum(is_correct(text, p.reference) for text in texts)
        for p, texts in zip(prompts, replies, strict=True)
    }


def _pool_config(pool_file: str, rows: int, recipe: str, overrides: list[str]):
    from troupe.cluster.config.compose import compose

    as_eval = [
        f"data.train={pool_file}",
        f"data.eval={pool_file}",
        f"eval.prompts={rows}",
        "data.id_key=source_line",
    ]
    return compose([*overrides, *as_eval], recipe=recipe)


def _sample(pool_file: str, rows: int, recipe: str, overrides: list[str], k: int) -> dict[str, int]:
    from transformers import AutoTokenizer

    from troupe.actors.generator.config import placed
    from troupe.actors.generator.sampling import Sampling
    from troupe.actors.hardware import resolve_dtype
    from troupe.actors.models import resolve_model
    from troupe.cluster.data.prompts import eval_prompt_set, prompt_encoder
    from troupe.cluster.run.runtime import generator_env

    cfg = _pool_config(pool_file, rows, recipe, overrides)
    g = placed(cfg.generator, colocated=False)
    # vLLM in-process, its threads and KV cache size, as in the generator actors
    os.environ.update(generator_env(g))
    from troupe.actors.generator.vllm_backend import VLLMBackend

    model_path = resolve_model(cfg.model.policy)
    encoder = prompt_encoder(
        cfg.data, AutoTokenizer.from_pretrained(model_path), g.max_model_len, g.max_new_tokens
    )
    prompts = eval_prompt_set(cfg.data, cfg.task, encoder, rows).prompts
    backend = VLLMBackend(
        model_path,
        resolve_dtype(g.dtype),
        g.max_model_len,
        cfg.run.seed,
        g.enforce_eager,
        g.gpu_memory_utilization,
        g.tensor_parallel_size,
        cfg.model.trust_remote_code,
    )
    groups = backend.generate(
        [p.token_ids for p in prompts], Sampling(k, g.temperature, g.top_p, g.max_new_tokens)
    )
    return count_right(prompts, [[c.text for c in group] for group in groups])
