"""A GSM8K subset rule by the base policy's own pass rate: keep the problems that the untrained policy answers right
at least once in `k` sampled answers, sampled exactly as the recipe samples (its chat template, system prompt,
temperature, top-p and token cap). The anchors filter RL data by the base model's pass rate (DAPO's and
Skywork-OR1's data, prime-rl's difficulty filtering): a problem no sample solves gives GRPO no advantage.

The rule is decided before any training, on a pool that train and dev are then carved from, so before and after are
both measured on problems of the same band; the evaluations themselves are fresh samples (or greedy), not the
filter's. Sampling runs one vLLM engine in a child process (its memory is gone before the runs start) and is cached
next to the subset: `passes.json` maps each problem's source line to its right answers out of k.
"""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def pass_counts(pool: list[dict], recipe: str, overrides: list[str], k: int, cache: Path) -> dict[int, int]:
    """Right answers among `k` samples of the base policy for each row of `pool` (rows carry `source_line`), keyed
    by source line; read from `cache` when it holds this pool, recipe, overrides and k."""
    key = {"recipe": recipe, "overrides": overrides, "k": k, "lines": [r["source_line"] for r in pool]}
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved["key"] == key:
            return {int(line): n for line, n in saved["passes"].items()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    pool_file = cache.with_suffix(".pool.jsonl")
    pool_file.write_text("".join(json.dumps(r) + "\n" for r in pool))
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        passes = child.submit(_sample, str(pool_file), recipe, overrides, k).result()
    cache.write_text(json.dumps({"key": key, "passes": passes}))
    return {int(line): n for line, n in passes.items()}


def solvable_rule(passes: dict[int, int], at_least: int = 1):
    """The row filter: problems with at least `at_least` right answers among the base policy's samples."""
    return lambda row: passes.get(row["source_line"], 0) >= at_least


def _sample(pool_file: str, recipe: str, overrides: list[str], k: int) -> dict[str, int]:
    import os

    from transformers import AutoTokenizer

    from troupe.actors.generator.config import placed
    from troupe.actors.generator.sampling import Sampling
    from troupe.actors.hardware import resolve_dtype
    from troupe.actors.models import resolve_model
    from troupe.actors.reward.math_answer import is_correct
    from troupe.cluster.config.compose import compose
    from troupe.cluster.data.prompts import build_prompt_sources
    from troupe.cluster.run.runtime import generator_env

    rows = sum(1 for line in Path(pool_file).read_text().splitlines() if line.strip())
    pool = [
        f"data.train={pool_file}",
        f"data.eval={pool_file}",
        f"eval.prompts={rows}",
        "data.id_key=source_line",
    ]
    cfg = compose([*overrides, *pool], recipe=recipe)
    g = placed(cfg.generator, colocated=False)
    os.environ.update(
        generator_env(g)
    )  # vLLM in-process, its threads and KV cache size, as in the generators
    from troupe.actors.generator.vllm_backend import VLLMBackend

    model_path = resolve_model(cfg.model.policy)
    _, prompts = build_prompt_sources(cfg, AutoTokenizer.from_pretrained(model_path))
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
    sampling = Sampling(k, g.temperature, g.top_p, g.max_new_tokens)
    groups = backend.generate([p.token_ids for p in prompts.prompts], sampling)
    return {
        p.uid: sum(is_correct(c.text, p.reference) for c in group)
        for p, group in zip(prompts.prompts, groups, strict=True)
    }
