"""The learn phase alone, on the real learner group, for each rank layout: where the policy update's time goes and
how close it comes to this machine's matmul roofline.

For each layout RANKS x THREADS (e.g. 2x1: two DeepSpeed ranks of one OMP thread each; 1x2: one rank with two;
1x2+compile: the same with learner.compile=true, each decoder layer under torch.compile), a
LearnerGroup is built from conf/demo.yaml exactly as the driver builds it, and trained on the same batch: the
arithmetic task's real prompts (token ids from its PromptSource), GROUP responses per prompt sampled from the
model itself, rewards +1 and -1 in every group so each one teaches, one micro-batch per rank (the CPU recipes'
choice). Each timed step is one `LearnerGroup.train` call (on-policy: the batch's weight version follows the
learner's, so no old-policy forward), the first of each group a warm-up; with --rounds N the layouts take turns N
times (the machine's speed drifts) and each layout's median is over all its rounds. It prints, per layout, the median seconds per
step and its speed against the first layout's, the achieved TFLOP/s — counted as the work actually done (with shared-prompt packing a group's prompt is
computed once; the LM head only at response tokens) and as vs_trl.py counts it (every row's prompt, the head at
every token) — and each against the matmul roofline of the learner's dtype (vs_trl_report.matmul_peak, 2 threads),
and whether the learner packed the prompt groups (its one-time packing check can turn packing off).

Run: .venv/bin/python -m bench.learn_phase [--layouts 1x2,2x1,1x2+compile] [--steps 5] [--rounds 2] [--override KEY=VALUE ...]
     [--out outputs/bench/learn_phase.json]
Smoke: .venv/bin/python -m bench.learn_phase --smoke [--out FOLDER]: the tiny model, 2 steps, every layout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from bench.vs_trl import GROUP, MAX_NEW_TOKENS, PROMPTS, TEMPERATURE, compose_troupe

# bench/vs_trl.py's batch and sampling
VS_TRL = [
    f"data.prompts_per_iteration={PROMPTS}",
    f"generator.samples_per_prompt={GROUP}",
    f"generator.max_new_tokens={MAX_NEW_TOKENS}",
    f"generator.temperature={TEMPERATURE}",
]


def synthetic_batch(cfg, model_path: str, seed: int):
    """PROMPTS real prompts x GROUP responses sampled from the model itself (seeded, at the config's temperature and
    max_new_tokens), right-padded as the driver's batches are. Sampled, not random, tokens: the learner's one-time
    packing check compares log-probs, and random tokens' (about -17 nats each) carry more bf16 noise than it allows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from troupe.actors.learner.batch import RolloutBatch, pad_sequences
    from troupe.cluster.data.prompts import build_prompt_sources

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    source, _ = build_prompt_sources(cfg, tokenizer)
    prompts = [p.token_ids for p in source.next_batch().prompts]
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).eval()
    g = cfg.generator
    torch.manual_seed(seed)
    rows = []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(
                torch.tensor([prompt]),
                do_sample=True,
                temperature=g.temperature,
                top_k=0,
                max_new_tokens=g.max_new_tokens,
                num_return_sequences=GROUP,
                pad_token_id=tokenizer.eos_token_id,
            )
            for seq in out[:, len(prompt) :].tolist():
                if tokenizer.eos_token_id in seq:
                    seq = seq[: seq.index(tokenizer.eos_token_id) + 1]
                rows.append((list(prompt), seq))
    del model
    ids, attention, action = pad_sequences([p for p, _ in rows], [r for _, r in rows], pad_id=0)
    b, width = ids.shape
    rewards = torch.tensor([1.0, -1.0]).repeat(b // 2)  # +1 and -1 in every group: each one teaches
    token_rewards = torch.zeros(b, width - 1)
    last = (action.cumsum(-1) == action.sum(-1, keepdim=True)) & action.bool()
    token_rewards[last] = rewards
    batch = RolloutBatch(
        input_ids=ids,
        attention_mask=attention,
        action_mask=action,
        behaviour_logprobs=torch.full((b, width - 1), -3.0) * action,
        rewards=rewards,
        token_rewards=token_rewards,
        temperature=torch.full((b,), float(cfg.generator.temperature)),
        weight_version=torch.zeros(b, dtype=torch.long),
        group_size=GROUP,
    )
    shape = {
        "prompt_tokens": [len(p) for p in prompts],
        "response_tokens": [len(r) for _, r in rows],
    }
    return batch, shape


def step_flops(model_path: str, shape: dict, packed: bool) -> dict:
    """FLOPs of one forward + backward (6 per weight per token): done (a packed group's prompt once when the learner
    packed, the LM head at response tokens only) and as bench/vs_trl.py counts them (every row with its own prompt,
    every weight at every token)."""
    from bench.vs_trl_report import layer_matmuls

    *body, (k, n, _) = layer_matmuls(model_path)  # the LM head is the last entry
    body_params, head_params = sum(a * b * c for a, b, c in body), k * n
    responses = sum(shape["response_tokens"])
    unpacked = GROUP * sum(shape["prompt_tokens"]) + responses
    body_tokens = sum(shape["prompt_tokens"]) + responses if packed else unpacked
    return {
        "done": 6 * (body_params * body_tokens + head_params * responses),
        "vs_trl_count": 6 * (body_params + head_params) * unpacked,
    }


def time_layout(layout: str, args, model_path: str, batch, shape: dict) -> dict:
    from troupe.actors.hardware import resolve_dtype
    from troupe.cluster.fleet.learners import LearnerGroup, policy_setup
    from troupe.cluster.run.runtime import learner_env

    shape_part, *flags = layout.split("+")
    ranks, threads = (int(x) for x in shape_part.split("x"))
    overrides = [
        f"model.policy={args.model}",
        f"learner.world_size={ranks}",
        f"learner.omp_threads={threads}",
        "learner.mini_batches=1",
        f"learner.micro_batch_size={PROMPTS * GROUP}",  # one micro-batch per rank: the CPU recipes' choice
        *VS_TRL,
        f"run.iterations={args.steps}",
        *args.override,
        *(f"learner.{flag}=true" for flag in flags),  # e.g. 1x2+compile: learner.compile=true
    ]
    cfg = compose_troupe(overrides)
    spec = policy_setup(cfg, model_path)
    group = LearnerGroup(spec, learner_env(cfg.learner), cfg.ray.actor_timeout_s)
    try:
        group.wait_ready()
        steps = []
        for step in range(args.steps):
            batch = batch.with_columns(weight_version=torch.full((len(batch),), step, dtype=torch.long))
            started = time.perf_counter()
            metrics, _ = group.train(batch, 0.0)
            steps.append(
                {
                    "wall_s": time.perf_counter() - started,
                    "rank_train_s": metrics["train_s"],
                    "prompts_packed": metrics["prompts_packed"],
                    "old_logprobs_forward": metrics["old_logprobs_forward"],
                    "compiled_graphs": metrics.get("compile/graphs", 0),
                }
            )
            print(f"bench/learn_phase: {layout} step {step + 1}: {steps[-1]['wall_s']:.2f}s", flush=True)
    finally:
        group.shutdown()
    if any(s["old_logprobs_forward"] for s in steps):
        raise SystemExit(
            f"bench/learn_phase: {layout}: an old-policy forward ran; the batch should be on-policy"
        )
    return {
        "layout": layout,
        "ranks": ranks,
        "threads": threads,
        "dtype": resolve_dtype(spec.train.dtype),
        "micro_batch_size": cfg.learner.micro_batch_size,
        "zero_stage": cfg.learner.zero_stage,
        "overrides": overrides,
        "steps": steps,
        "packed": all(s["prompts_packed"] == 1.0 for s in steps),
        "shape": shape,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--layouts",
        default="1x2,2x1,1x2+compile",
        help="comma-separated RANKSxTHREADS[+FLAG], FLAG a boolean learner option set to true (e.g. compile)",
    )
    p.add_argument("--steps", type=int, default=5, help="train calls per layout, the first a warm-up")
    p.add_argument("--rounds", type=int, default=2, help="times the layouts take turns")
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="troupe override")
    p.add_argument("--out", default="outputs/bench/learn_phase.json")
    p.add_argument("--smoke", action="store_true", help="the tiny model, 2 steps, outputs under --out")
    args = p.parse_args()

    import ray

    from bench.vs_trl_report import matmul_peak
    from troupe.actors.hardware import resolve_dtype
    from troupe.actors.models import resolve_model
    from troupe.cluster.run.runtime import start_ray

    out = Path(args.out)
    if args.smoke:
        from bench.troupe_run import smoke_out

        out = (
            smoke_out(args.out if args.out != p.get_default("out") else None, "learn-phase")
            / "learn_phase.json"
        )
        args.model, args.steps, args.rounds = "builtin:tiny-llama", 2, 1
    model_path = resolve_model(args.model)
    base = compose_troupe([f"model.policy={args.model}", *VS_TRL, *args.override])
    dtype = resolve_dtype(base.learner.dtype)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start_ray(base.ray, log_to_driver=False)
    try:
        layouts = args.layouts.split(",")
        batch, shape = synthetic_batch(
            base, model_path, base.run.seed
        )  # one batch for every layout and round
        runs = [
            time_layout(layout, args, model_path, batch, shape)
            for _ in range(args.rounds)
            for layout in layouts
        ]
    finally:
        ray.shutdown()
    results = []
    for layout in layouts:  # one row per layout, its median over every round's timed steps
        mine = [r for r in runs if r["layout"] == layout]
        timed = [s["wall_s"] for r in mine for s in r["steps"][1:]] or [mine[0]["steps"][0]["wall_s"]]
        results.append(
            {**mine[0], "steps": [s for r in mine for s in r["steps"]], "median_s": statistics.median(timed)}
            | {"packed": all(r["packed"] for r in mine)}
        )
    print("bench/learn_phase: measuring the matmul roofline with the model's own layer shapes (2 threads)")
    peak = matmul_peak(model_path, dtype, tokens=(64,) if args.smoke else (512, 2048))
    for r in results:
        flops = step_flops(model_path, r["shape"], r["packed"])
        r["tflops"] = {k: v / r["median_s"] / 1e12 for k, v in flops.items()}
        r["roofline_fraction"] = {k: v / peak for k, v in r["tflops"].items()}
    report = {"model": args.model, "dtype": dtype, "peak_tflops_2_threads": peak, "layouts": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(
        f"\nlearn phase of {PROMPTS} prompts x {GROUP} on {args.model} ({dtype}); roofline {peak:.3f} TFLOP/s"
    )
    print(
        f"{'layout':>12} {'median s':>9} {'packed':>7} {'TFLOP/s done':>13} {'of roofline':>12} {'vs_trl count':>13} "
        f"{'of roofline':>12} {'speed vs ' + results[0]['layout']:>16}"
    )
    for r in results:
        t, f = r["tflops"], r["roofline_fraction"]
        print(
            f"{r['layout']:>12} {r['median_s']:9.2f} {'yes' if r['packed'] else 'no':>7} {t['done']:13.3f} {f['done']:11.0%} "
            f"{t['vs_trl_count']:13.3f} {f['vs_trl_count']:11.0%} {results[0]['median_s'] / r['median_s']:16.2f}"
        )
    print(f"results: {out}")


if __name__ == "__main__":
    main()
