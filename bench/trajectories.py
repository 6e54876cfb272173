"""Multi-turn trajectories per second: 1 generator against 2, and troupe's continuous batching across turns against
lockstep turns, measured in the same run.

Conversations are MT-Bench's two-turn questions (../shared/data; generated two-turn prompts without it), through
FollowUpEnv with a simulated environment latency (a tool or service call: uniform in [0, 2 x --latency-ms]).
- `continuous`: troupe's runner (actors/envs/runner.py): each trajectory's next turn joins the engine as soon as
  its environment answered.
- `lockstep`: every trajectory's turn k in one `generate` call, then every environment step (in parallel threads),
  then turn k + 1: the batch waits for its longest turn and its slowest environment call.
Each configuration runs in its own Ray actors on a warm engine; the layouts share the machine's cores (1 generator
x 2 threads, 2 generators x 1 thread).

Run: .venv/bin/python -m bench.trajectories [--prompts 32] [--samples 2] [--latency-ms 100] [--out DIR]
     [--smoke: the tiny model, 4 prompts x 2 samples x 8 tokens]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from troupe.actors.envs.builtin import FollowUpEnv
from troupe.actors.envs.config import EnvConfig
from troupe.actors.generator.actor import Generator

MT_BENCH = "FastChat/fastchat/llm_judge/data/mt_bench/question.jsonl"


class SlowFollowUp(FollowUpEnv):
    """FollowUpEnv whose steps take a random time, as a tool or a remote service would."""

    def __init__(self, latency_ms: float = 100.0, seed: int = 0):
        super().__init__()
        self.latency_s, self.rng = latency_ms / 1000, random.Random(seed)

    def step(self, message):
        time.sleep(self.rng.uniform(0, 2 * self.latency_s))
        return super().step(message)


class BenchGenerator(Generator):
    """troupe's generator, plus the lockstep baseline on the same engine."""

    def lockstep(self, prompts, sampling, env: EnvConfig) -> dict:
        from transformers import AutoTokenizer

        from troupe.actors.envs.trajectory import Trajectory, TurnEncoder

        encoder = TurnEncoder(AutoTokenizer.from_pretrained(self.model_path))
        make = env.factory()
        start = time.perf_counter()
        live = []
        for prompt in prompts:
            for k in range(sampling.n):
                e = make()
                messages = e.reset(prompt)
                live.append((Trajectory(prompt, k, encoder.first(messages), messages), e))
        done, tokens = 0, 0
        with ThreadPoolExecutor(env.workers) as pool:
            for _turn in range(env.max_turns):
                if not live:
                    break
                turn = replace(sampling, n=1, seed=None)
                outs = self.backend.generate([t.context() for t, _ in live], turn)
                for (traj, _), group in zip(live, outs, strict=True):
                    c = group[0]
                    traj.add_turn(list(c.token_ids), list(c.logprobs), self.version, c.text)
                    tokens += len(c.token_ids)
                steps = list(pool.map(lambda te: te[1].step(te[0].messages[-1]), live))
                going = []
                for (traj, e), step in zip(live, steps, strict=True):
                    if step.done:
                        done += 1
                    else:
                        obs = list(step.observations)
                        traj.add_observation(obs, encoder.observation(obs, traj.ids[-1]), step.reward)
                        going.append((traj, e))
                live = going
        done += len(live)
        return {"trajectories": done, "tokens": tokens, "wall_s": time.perf_counter() - start}

    def continuous(self, prompts, sampling, env: EnvConfig) -> dict:
        start = time.perf_counter()
        trajectories, _ = self.run_trajectories(prompts, sampling, env)
        tokens = sum(sum(t.loss_mask) for t in trajectories)
        return {"trajectories": len(trajectories), "tokens": tokens, "wall_s": time.perf_counter() - start}


def load_questions(count: int) -> list[list[str]]:
    """MT-Bench's two-turn questions, or generated ones when ../shared/data is absent."""
    from bench.rm_data import DATA

    path = DATA / MT_BENCH
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [r["turns"] for r in rows[:count]]
    return [[f"Describe place number {i} in a few sentences.", "Now in one sentence."] for i in range(count)]


def run_layout(args, replicas: int, threads: int, mode: str, questions) -> dict:
    import ray

    from troupe.actors.generator.config import GeneratorConfig
    from troupe.actors.generator.sampling import Sampling
    from troupe.actors.models import resolve_model
    from troupe.actors.protocol import Prompt
    from troupe.cluster.run.runtime import generator_env

    config = GeneratorConfig(max_model_len=1024, omp_threads=threads)
    env = EnvConfig(
        target=SlowFollowUp,
        kwargs={"latency_ms": args.latency_ms},
        max_turns=2,
        max_tokens=2 * args.tokens + 200,
    )
    remote = ray.remote(BenchGenerator).options(num_cpus=0, runtime_env={"env_vars": generator_env(config)})
    model = resolve_model(args.model)
    gens = [remote.remote(config, model, i, 0, False) for i in range(replicas)]
    prompts = [
        Prompt(f"q{i}", (), turns[0], meta=(("turns", json.dumps(turns)),), messages=(("user", turns[0]),))
        for i, turns in enumerate(questions)
    ]
    sampling = Sampling(n=args.samples, temperature=0.7, max_new_tokens=args.tokens)
    try:
        ray.get([g.ready.remote() for g in gens])
        warm = [getattr(g, mode).remote(prompts[:1], replace(sampling, n=1), env) for g in gens]
        ray.get(warm)
        shares = [prompts[i::replicas] for i in range(replicas)]
        start = time.perf_counter()
        parts = ray.get(
            [getattr(g, mode).remote(s, sampling, env) for g, s in zip(gens, shares, strict=True)]
        )
        wall = time.perf_counter() - start
    finally:
        for g in gens:
            ray.kill(g)
    trajectories = sum(p["trajectories"] for p in parts)
    tokens = sum(p["tokens"] for p in parts)
    return {"trajectories": trajectories, "tokens": tokens, "wall_s": wall, "traj_s": trajectories / wall,
            "tok_s": tokens / wall}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=2, help="trajectories per prompt")
    ap.add_argument("--tokens", type=int, default=96, help="max new tokens per turn")
    ap.add_argument("--latency-ms", type=float, default=100.0, help="mean environment step latency")
    ap.add_argument("--out", default="outputs/bench-trajectories")
    ap.add_argument("--smoke", action="store_true", help="the tiny model, 4 prompts x 2 samples x 8 tokens")
    args = ap.parse_args()
    if args.smoke:
        from bench.troupe_run import SMOKE_MODEL, smoke_out

        args.model, args.prompts, args.tokens, args.latency_ms = SMOKE_MODEL, 4, 8, 20.0
        args.out = str(smoke_out(None if args.out == ap.get_default("out") else args.out, "trajectories"))
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    questions = load_questions(args.prompts)
    layouts = {
        "1x2 continuous": (1, 2, "continuous"),
        "1x2 lockstep": (1, 2, "lockstep"),
        "2x1 continuous": (2, 1, "continuous"),
    }
    results = {name: run_layout(args, *layout, questions) for name, layout in layouts.items()}
    ray.shutdown()
    base = results["1x2 continuous"]
    print(f"model {args.model}; {len(questions)} prompts x {args.samples} trajectories, 2 turns of <= {args.tokens} "
          f"tokens; environment latency {args.latency_ms:.0f} ms on average")  # fmt: skip
    print(
        f"{'generators x threads, turns':<30} {'traj/s':>8} {'tok/s':>8} {'wall s':>8} {'vs 1x2 continuous':>18}"
    )
    for name, r in results.items():
        print(
            f"{name:<30} {r['traj_s']:>8.2f} {r['tok_s']:>8.0f} {r['wall_s']:>8.1f} {r['traj_s'] / base['traj_s']:>18.2f}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"model": args.model, "prompts": len(questions), "samples": args.samples, "tokens": args.tokens,
               "latency_ms": args.latency_ms, "results": results,
               "vs_1x2_continuous": {n: r["traj_s"] / base["traj_s"] for n, r in results.items()}}  # fmt: skip
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
