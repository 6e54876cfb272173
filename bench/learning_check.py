"""Learning check: GRPO, PPO and online DPO on the arithmetic task with SmolLM2-135M-Instruct, each for the same
number of generated samples, then task accuracy and mean reward before and after on held-out prompts.

A benchmark, not a test. Each algorithm runs `troupe --config-name demo algo=<name>` in a fresh process (its own
embedded Ray); the evaluation samples every checkpoint (and the base model) with one vLLM Generator actor at a time.
Run: .venv/bin/python -m bench.learning_check [--iterations 4] [--eval-prompts 32] [--algos grpo ppo dpo_online]
Smoke: .venv/bin/python -m bench.learning_check --smoke [--out FOLDER] [--algos ...]: the tiny model (the integration
tests' settings), 1 iteration of GRPO, 4 held-out prompts x 2 samples, under FOLDER (temporary by default).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.troupe_run import SMOKE_MODEL, SMOKE_OVERRIDES, run_troupe, smoke_out

EXTRA = {
    "grpo": [],
    "ppo": ["critic.lr=1e-4"],
    "dpo_online": [],
}


def train(algo: str, iterations: int, out: Path, extra: tuple[str, ...] = ()) -> tuple[Path, float, dict]:
    overrides = [
        *extra,
        f"algo={algo}",
        "algo.kl_coef=0.0",  # the same (no) reference for all three: the comparison is the estimator
        f"run.iterations={iterations}",
        *EXTRA.get(algo, []),
    ]
    lines, wall = run_troupe("demo", overrides, out)
    return (
        out / "checkpoint-final",
        wall,
        {
            "train_reward_first": lines[0]["reward/mean"],
            "train_reward_last": lines[-1]["reward/mean"],
            "samples": sum(x["samples"] for x in lines),
        },
    )


def evaluate(
    models: dict[str, str], eval_prompts: int, samples: int, extra: tuple[str, ...] = ()
) -> dict[str, dict]:
    """Accuracy and mean weighted reward of each model on the same held-out prompts (task seed 12345)."""
    import ray
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from troupe.actors.generator.actor import Generator
    from troupe.actors.generator.config import GeneratorConfig
    from troupe.actors.generator.sampling import Sampling
    from troupe.actors.reward.aggregation import WeightedSum, score_rollouts
    from troupe.actors.reward.shard import RewardShard, ShardSpec
    from troupe.cluster.config.compose import CONF_DIR
    from troupe.cluster.config.schema import register
    from troupe.cluster.data.prompts import build_prompt_sources
    from troupe.cluster.run.runtime import generator_env

    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(
            compose(
                config_name="demo",
                overrides=[*extra, f"data.prompts_per_iteration={eval_prompts}", "task.seed=12345"],
            )
        )
    ray.init(
        address="local", num_cpus=2, include_dashboard=False
    )  # a fresh local Ray, never a cluster found on the machine
    shard = RewardShard(ShardSpec(objectives={k: dict(v or {}) for k, v in cfg.reward.objectives.items()}))
    aggregation = WeightedSum(dict(cfg.reward.weights))
    sampling = Sampling(
        n=samples, temperature=cfg.generator.temperature, max_new_tokens=cfg.generator.max_new_tokens
    )
    results = {}
    for name, path in models.items():
        prompts = build_prompt_sources(cfg, AutoTokenizer.from_pretrained(path))[0].next_batch().prompts
        gen = (
            ray.remote(Generator)
            .options(num_cpus=1, runtime_env={"env_vars": generator_env(cfg.generator)})
            .remote(GeneratorConfig(max_model_len=cfg.generator.max_model_len), path, 0)
        )
        rollouts = ray.get(gen.generate.remote(list(prompts), sampling))
        ray.kill(gen)
        scored = score_rollouts(rollouts, shard.score(rollouts), aggregation)
        results[name] = {
            "accuracy": float(torch.tensor([s.reward.objectives["correctness"] for s in scored]).mean()),
            "reward": float(torch.tensor([s.reward.scalar for s in scored]).mean()),
        }
    ray.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--algos", nargs="+", default=["grpo", "ppo", "dpo_online"])
    parser.add_argument("--out", default="outputs/bench-learning-check")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model, 1 iteration, 4 x 2 held-out answers, GRPO unless --algos",
    )
    args = parser.parse_args()
    from troupe.actors.models import resolve_model

    model, extra = "builtin:smollm2-135m-instruct", ()
    if args.smoke:
        model = SMOKE_MODEL
        extra = (*SMOKE_OVERRIDES, "data.eval=null")
        args.iterations, args.eval_prompts, args.eval_samples = 1, 4, 2
        if args.algos == parser.get_default("algos"):
            args.algos = ["grpo"]
        args.out = str(
            smoke_out(None if args.out == parser.get_default("out") else args.out, "learning-check")
        )
    root = Path(args.out).resolve()
    runs = {}
    for algo in args.algos:
        ckpt, wall, info = train(algo, args.iterations, root / algo, extra)
        runs[algo] = (str(ckpt), wall, info)
        print(f"trained {algo}: {wall:.0f}s {info}", flush=True)
    models = {"base": resolve_model(model)} | {a: r[0] for a, r in runs.items()}
    scores = evaluate(models, args.eval_prompts, args.eval_samples, extra)
    base = scores["base"]
    print(
        f"\nheld-out: {args.eval_prompts} prompts x {args.eval_samples} samples, T=0.7; "
        f"training: {args.iterations} iterations x 8 prompts x 4 samples each"
    )
    print(
        f"{'algo':<11} {'samples':>7} {'acc before':>10} {'acc after':>9} {'reward before':>13} {'reward after':>12} {'wall s':>7}"
    )
    for algo, (_, wall, info) in runs.items():
        s = scores[algo]
        print(
            f"{algo:<11} {info['samples']:>7} {base['accuracy']:>10.3f} {s['accuracy']:>9.3f} "
            f"{base['reward']:>13.3f} {s['reward']:>12.3f} {wall:>7.0f}"
        )
    (root / "results.json").write_text(json.dumps({"scores": scores, "runs": runs}, indent=2))
    print(f"results: {root / 'results.json'}")


if __name__ == "__main__":
    main()
