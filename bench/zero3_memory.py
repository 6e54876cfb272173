"""Peak memory per learner rank at ZeRO-3 start-up, with and without partitioned loading (`learner.zero_init`).

Before (`learner.zero_init=false`): every rank loads the whole model in fp32, DeepSpeed partitions it afterwards,
and the frozen KL reference stays whole on every rank. After (the default): transformers builds each weight already
partitioned (`HfDeepSpeedConfig` + `deepspeed.zero.Init`) and the reference is a ZeRO-3 engine of its own, so no
rank ever holds a full copy.

A randomly initialised Llama of about 1B parameters (20 layers, hidden 2048, GQA 32/4 heads, vocabulary 32,000) is
written once as a bf16 safetensors checkpoint; then, for each variant in turn, a real 2-rank LearnerGroup (DeepSpeed
ZeRO-3, gloo, the policy plus its reference: algo.kl_coef > 0) is built from it and each rank reports its peak
resident memory (ru_maxrss) once the policy is loaded (before DeepSpeed's optimizer state, which ZeRO-3 shards
either way) and once set up, and the share of the policy's and the reference's weights it holds.

Run: .venv/bin/python -m bench.zero3_memory [--dtype bfloat16] [--out outputs/bench/zero3_memory.json]
Smoke: .venv/bin/python -m bench.zero3_memory --smoke [--out FOLDER]: a model of 2 small layers, same steps.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

# about 1.0B parameters: 20 x 44.0M per layer + 2 x 65.5M (embeddings, untied LM head)
ONE_B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=20,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
)
SMOKE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
)
VARIANTS = {"before (zero_init=false)": "false", "after (zero_init=true)": "true"}


def write_random_model(folder: Path, shape: dict) -> int:
    """A random Llama checkpoint (bf16 safetensors) in `folder`; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def start_group(model_path: str, dtype: str, zero_init: str) -> list[dict]:
    """A 2-rank ZeRO-3 policy group with a reference; each rank's setup info."""
    from bench.vs_trl import compose_troupe
    from troupe.cluster.fleet.learners import LearnerGroup, policy_setup
    from troupe.cluster.run.runtime import learner_env

    cfg = compose_troupe(
        [
            f"model.policy={model_path}",
            "learner.world_size=2",
            "learner.omp_threads=1",
            "learner.zero_stage=3",
            f"learner.zero_init={zero_init}",
            f"learner.dtype={dtype}",
            "algo.kl_coef=0.05",
        ]
    )
    group = LearnerGroup(policy_setup(cfg, model_path), learner_env(cfg.learner), cfg.ray.actor_timeout_s)
    try:
        return group.wait_ready()
    finally:
        group.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="learner.dtype")
    p.add_argument("--out", default="outputs/bench/zero3_memory.json")
    p.add_argument("--smoke", action="store_true", help="a 2-layer model, outputs under --out")
    args = p.parse_args()

    import ray

    from bench.vs_trl import compose_troupe
    from troupe.cluster.run.runtime import start_ray

    out = Path(args.out)
    if args.smoke:
        from bench.troupe_run import smoke_out

        out = (
            smoke_out(args.out if args.out != p.get_default("out") else None, "zero3-memory") / "results.json"
        )
    with tempfile.TemporaryDirectory(prefix="troupe-zero3-") as folder:
        started = time.perf_counter()
        params = write_random_model(Path(folder), SMOKE if args.smoke else ONE_B)
        print(
            f"bench/zero3_memory: random model of {params / 1e9:.2f}B parameters written in "
            f"{time.perf_counter() - started:.0f}s",
            flush=True,
        )
        start_ray(compose_troupe([]).ray, log_to_driver=False)
        try:
            rows = {}
            for name, zero_init in VARIANTS.items():
                started = time.perf_counter()
                try:
                    ranks = start_group(folder, args.dtype, zero_init)
                except Exception as e:  # e.g. a rank killed by Ray's OOM monitor: that is the measurement
                    rows[name] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"}
                    print(f"bench/zero3_memory: {name} failed: {rows[name]['error']}", flush=True)
                    continue
                rows[name] = {"setup_s": time.perf_counter() - started, "ranks": ranks}
                print(f"bench/zero3_memory: {name} ready in {rows[name]['setup_s']:.0f}s", flush=True)
        finally:
            ray.shutdown()
    report = {"params": params, "dtype": args.dtype, "world_size": 2, "smoke": args.smoke, "variants": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nZeRO-3 start-up, 2 ranks, {params / 1e9:.2f}B parameters, {args.dtype}, policy + reference")
    print(
        f"{'variant':>26} {'peak MiB, loaded':>17} {'peak MiB, set up':>17} {'policy held':>12}"
        f" {'reference held':>15} {'setup s':>8}"
    )
    before = None
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:>26} {'failed: ' + row['error']}")
            continue
        loaded = max(r["load_peak_rss_mb"] for r in row["ranks"])
        peak = max(r["peak_rss_mb"] for r in row["ranks"])
        before = before or (loaded, peak)
        policy = max(r["held"] for r in row["ranks"])
        reference = max(r["reference_held"] for r in row["ranks"])
        print(
            f"{name:>26} {loaded:17.0f} {peak:17.0f} {policy:12.2f} {reference:15.2f} {row['setup_s']:8.0f}"
        )
    if all("error" not in row for row in rows.values()):
        print(f"after / before peak per rank: loaded {loaded / before[0]:.2f}, set up {peak / before[1]:.2f}")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
