"""Generator throughput per dtype, as a ratio against float32 measured in the same run.

Why: `dtype: auto` picks bfloat16 only where the hardware has it natively (GPUs, AMX/AVX512-BF16 CPUs).
Run: .venv/bin/python -m bench.generator_dtype [--model builtin:smollm2-135m-instruct] [--prompts 16]
     [--out results.json] [--smoke: tiny model, 2 prompts x 8 tokens]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def measure(model: str, dtype: str, prompts: int, tokens: int) -> float:
    """Tokens per second of one warm batch, in a fresh process (vLLM runs in-process and owns it)."""
    os.environ.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind"
    )
    from vllm import LLM, SamplingParams

    from troupe.actors.models import resolve_model

    llm = LLM(
        model=resolve_model(model),
        dtype=dtype,
        enforce_eager=True,
        max_model_len=1024,
        seed=0,
        distributed_executor_backend="uni",
    )
    params = SamplingParams(n=2, temperature=1.0, max_tokens=tokens, ignore_eos=True)
    llm.generate(["Warm up."], params, use_tqdm=False)
    start = time.perf_counter()
    llm.generate([f"Tell me a story about the number {i}." for i in range(prompts)], params, use_tqdm=False)
    return prompts * 2 * tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", help="results as JSON")
    ap.add_argument(
        "--smoke", action="store_true", help="the same code path on the tiny model, 2 prompts x 8 tokens"
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke and not args.one:
        from bench.troupe_run import SMOKE_MODEL, smoke_out

        args.model, args.prompts, args.tokens = SMOKE_MODEL, 2, 8
        args.out = str(smoke_out(args.out, "generator-dtype") / "results.json")
    if args.one:
        print(json.dumps({"tok_s": measure(args.model, args.one, args.prompts, args.tokens)}))
        return
    from troupe.actors.hardware import cpu_has_native_bf16, resolve_dtype

    results = {}
    for dtype in ("float32", "bfloat16"):
        cmd = [
            sys.executable,
            "-m",
            "bench.generator_dtype",
            "--one",
            dtype,
            "--model",
            args.model,
            "--prompts",
            str(args.prompts),
            "--tokens",
            str(args.tokens),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"bench/generator_dtype: the {dtype} run failed:\n{proc.stderr[-3000:]}")
        results[dtype] = json.loads(proc.stdout.strip().splitlines()[-1])["tok_s"]
    print(
        f"model {args.model}, {args.prompts} prompts x n=2 x {args.tokens} tokens; native bf16: {cpu_has_native_bf16()}"
    )
    print(f"{'dtype':<10} {'tok/s':>8} {'vs fp32':>8}")
    for dtype, tps in results.items():
        print(f"{dtype:<10} {tps:>8.0f} {tps / results['float32']:>8.2f}")
    print(f"auto resolves to: {resolve_dtype('auto')}")
    if args.out:
        summary = {
            "model": args.model,
            "prompts": args.prompts,
            "tokens": args.tokens,
            "native_bf16": cpu_has_native_bf16(),
            "tok_s": results,
            "vs_fp32": {d: t / results["float32"] for d, t in results.items()},
            "auto": resolve_dtype("auto"),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
        print(f"results: {args.out}")


if __name__ == "__main__":
    main()
