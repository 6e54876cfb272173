"""troupe's GRPO against TRL's GRPOTrainer on the same machine, one after the other, in one invocation.

Both halves train the same model on the same prompts (troupe's arithmetic task, rendered with the same chat template:
the script checks TRL's prompt token ids against troupe's and stops if they differ), with the same group size, batch,
max new tokens, temperature, lr, steps, kl 0 and the same rule reward (troupe's objectives and aggregation from the
composed config, given to TRL as one reward function). TRL runs at its documented defaults otherwise, plus the two
patches vLLM-CPU needs (../shared/reference/trl-on-cpu.md). Each half runs in its own process; the script prints, for each, the median
step time over steps 2..N, completions/s, generated tokens/s, a phase breakdown and the learn phase's achieved
TFLOP/s against this machine's matmul roofline (the model's own layer shapes), and last the ratio of troupe's completions/s to TRL's.

TRL is not a troupe dependency: on first use it is installed into .bench-trl/ (pip --target, only the packages this
environment lacks, at versions that leave torch / transformers / vllm untouched) and put on the TRL process's path.

Run: .venv/bin/python -m bench.vs_trl [--steps 10] [--tiny] [--troupe-override learner.world_size=2 ...]
     [--out outputs/bench/vs_trl.json]
Smoke: .venv/bin/python -m bench.vs_trl --smoke [--out FOLDER]: the tiny model for 2 steps, everything under FOLDER (a
temporary one by default). It never installs TRL: without it in .bench-trl/ it runs troupe's half and checks TRL's
prompt rows, rendered with the tokenizer's chat template, against troupe's token ids, and says what it skipped.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench.trl_half import check_rendering, run_trl  # noqa: E402
from bench.trl_install import ensure_trl, installed_trl  # noqa: E402
from bench.vs_trl_report import _cpu_model, matmul_params, matmul_peak, report, summarise  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = str(ROOT / "conf")
RUN_DIR = ROOT / "outputs" / "bench" / "vs_trl"

# What both halves share; every other troupe setting comes from conf/demo.yaml (or --troupe-override).
PROMPTS, GROUP, MAX_NEW_TOKENS, LR, TEMPERATURE = 8, 4, 64, 1e-6, 1.0

VLLM_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# ----------------------------------------------------------------------------------------------------------- install


def troupe_overrides(model_ref: str, steps: int, out_dir: Path, extra: list[str]) -> list[str]:
    return [
        f"model.policy={model_ref}",
        f"data.prompts_per_iteration={PROMPTS}",
        f"generator.samples_per_prompt={GROUP}",
        f"generator.max_new_tokens={MAX_NEW_TOKENS}",
        f"generator.temperature={TEMPERATURE}",
        f"learner.lr={LR}",
        "learner.mini_batches=1",  # one optimizer step per generation, as TRL with gradient_accumulation_steps=1
        "algo.kl_coef=0.0",
        f"run.iterations={steps}",
        "run.print_table=false",
        "run.progress_bar=false",
        "run.save_checkpoint=false",
        "data.eval=null",  # no held-out evaluation: TRL runs none, and its rows are not training steps
        f"run.output_dir={out_dir}",
        *extra,
    ]


def compose_troupe(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from troupe.cluster.config.checks import validate
    from troupe.cluster.config.schema import register

    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose(config_name="demo", overrides=overrides))
    validate(cfg)
    return cfg


def build_spec(args) -> dict:
    """Everything both halves read: the composed troupe config is the one source of the shared settings."""
    from troupe.actors.hardware import cpu_has_native_bf16, resolve_dtype
    from troupe.actors.models import resolve_model

    model_ref = "builtin:tiny-llama" if args.tiny else "builtin:smollm2-135m-instruct"
    out_dir = RUN_DIR / "troupe-run"
    overrides = troupe_overrides(model_ref, args.steps, out_dir, args.troupe_override)
    cfg = compose_troupe(overrides)
    g = cfg.generator
    if cfg.algo.name != "grpo" or cfg.algo.estimator != "group":
        raise SystemExit(f"bench/vs_trl compares GRPO; the overrides give algo={cfg.algo.name}")
    learner_dtype = resolve_dtype(cfg.learner.dtype)
    return {
        "model_ref": model_ref,
        "model_path": resolve_model(model_ref),
        "steps": args.steps,
        "prompts": cfg.data.prompts_per_iteration,
        "group": g.samples_per_prompt,
        "max_new_tokens": g.max_new_tokens,
        "temperature": g.temperature,
        "top_p": g.top_p,
        "lr": cfg.learner.lr,
        "kl_coef": cfg.algo.kl_coef,
        "task": asdict(cfg.task),
        "objectives": cfg.reward.objectives,
        "weights": cfg.reward.weights,
        "aggregation": cfg.reward.aggregation,
        "troupe_overrides": overrides,
        "troupe_out_dir": str(out_dir),
        "troupe_learner": {
            "world_size": cfg.learner.world_size,
            "micro_batch_size": cfg.learner.micro_batch_size,
            "omp_threads": cfg.learner.omp_threads,
            "zero_stage": cfg.learner.zero_stage,
            "dtype": learner_dtype,
            "loss_agg": cfg.algo.loss_agg,
        },
        "troupe_generator": {"omp_threads": g.omp_threads, "dtype": resolve_dtype(g.dtype)},
        # TRL's bf16 (mixed precision) follows troupe's resolved learner dtype: on by default where the CPU has native
        # bf16, as trl-on-cpu.md measured.
        "trl_bf16": learner_dtype == "bfloat16",
        "native_bf16": cpu_has_native_bf16(),
        "trl_out_dir": str(RUN_DIR / "trl-run"),
    }


def expected_prompts(spec: dict, tokenizer) -> list:
    """troupe's PromptBatch for each step, exactly as its driver builds them (from the same composed config)."""
    from troupe.cluster.data.prompts import build_prompt_sources

    source, _ = build_prompt_sources(compose_troupe(spec["troupe_overrides"]), tokenizer)
    return [source.next_batch() for _ in range(spec["steps"])]


# --------------------------------------------------------------------------------------------------------- TRL half


def run_troupe(spec: dict) -> dict:
    import logging

    import ray
    from transformers import AutoTokenizer

    from troupe.cluster.run.driver import run

    logging.basicConfig(level=os.environ.get("TROUPE_LOG_LEVEL", "WARNING"))
    started = time.perf_counter()
    cfg = compose_troupe(spec["troupe_overrides"])
    shutil.rmtree(spec["troupe_out_dir"], ignore_errors=True)  # metrics.jsonl is appended to
    try:
        result = run(cfg)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    records = [json.loads(line) for line in Path(result["metrics"]).read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("iteration", -1) >= 0]  # training rows (an evaluation row has -1)
    if len(records) != spec["steps"]:
        raise SystemExit(
            f"bench/vs_trl: troupe wrote {len(records)} metric lines for {spec['steps']} iterations"
        )
    batches = expected_prompts(spec, AutoTokenizer.from_pretrained(spec["model_path"]))
    steps = []
    for rec, batch in zip(records, batches, strict=True):
        n = int(rec["samples"])
        steps.append(
            {
                "step": rec["iteration"] + 1,
                "step_s": rec["time/iteration"],
                "generate_s": rec["time/generate"],
                "score_s": rec["time/score"],
                "learn_s": rec["time/learn"],
                "sync_s": rec["time/sync"],
                "completions": n,
                "completion_tokens": int(round(rec["response_tokens/mean"] * n)),
                "prompt_tokens": sum(len(p.token_ids) for p in batch.prompts) * spec["group"],
                "reward_mean": rec["reward/mean"],
                "old_logprobs_forward": rec.get("train/old_logprobs_forward"),
            }
        )
    flags = [s["old_logprobs_forward"] for s in steps if s["old_logprobs_forward"] is not None]
    if flags:
        extra, source = statistics.mean(flags), "train/old_logprobs_forward in the metrics"
    else:
        extra, source = 1.0, "assumed (the metrics do not say whether the old log-probs took a forward)"
    lc = spec["troupe_learner"]
    total = time.perf_counter() - started
    return {
        "name": "troupe",
        "versions": {"troupe": importlib.metadata.version("troupe-rlhf")},
        "steps": steps,
        "outside_steps_s": total - sum(s["step_s"] for s in steps),
        "extra_forwards": extra,
        "extra_forwards_source": source,
        "learner_dtype": lc["dtype"],
        "settings": {"config": "conf/demo.yaml", "overrides": spec["troupe_overrides"], **lc},
    }


# --------------------------------------------------------------------------------------------------------- measures


def busy_processes(exclude: int | None = None) -> list[str]:
    """Other heavy jobs (tests, troupe runs) that would skew the timings; `exclude`: our own child."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in (os.getpid(), os.getppid(), exclude):
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(
            k in cmd for k in ("pytest", "troupe.cluster.run.driver", "bin/troupe", "bench.vs_trl --_half")
        ):
            found.append(f"{pid} {cmd.strip()[:100]}")
    return found


def run_half(half: str, spec_path: Path, trl_dir: Path) -> dict:
    result_path = RUN_DIR / f"{half}-result.json"
    log_path = RUN_DIR / f"{half}.log"
    result_path.unlink(missing_ok=True)
    env = {**os.environ}
    for k, v in VLLM_ENV.items():
        env.setdefault(k, v)
    paths = [str(ROOT)] + ([str(trl_dir)] if half == "trl" else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "bench.vs_trl", "--_half", half, "--_spec", str(spec_path)]
    cmd += ["--_result", str(result_path)]
    print(f"bench/vs_trl: running the {half} half (log: {_shown(log_path)})", flush=True)
    started = time.perf_counter()
    seen: set[str] = set()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:  # watch for other heavy jobs while this half runs: they skew its timings
            seen.update(busy_processes(exclude=proc.pid))
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
    wall = time.perf_counter() - started
    if proc.returncode != 0 or not result_path.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-60:])
        raise SystemExit(f"bench/vs_trl: the {half} half failed (exit {proc.returncode}); log tail:\n{tail}")
    result = json.loads(result_path.read_text())
    result["process_wall_s"] = wall
    result["other_jobs_seen"] = sorted(seen)
    if seen:
        print(
            f"bench/vs_trl: WARNING: other heavy jobs ran during the {half} half:", *sorted(seen), sep="\n  "
        )
    print(f"bench/vs_trl: {half} half done in {wall:.0f}s", flush=True)
    return result


def _shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def main() -> None:
    global RUN_DIR
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="optimizer steps (= troupe iterations) per half")
    p.add_argument("--tiny", action="store_true", help="builtin:tiny-llama for both halves (a smoke run)")
    p.add_argument(
        "--troupe-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra override for troupe (repeatable), e.g. learner.world_size=2",
    )
    p.add_argument("--only", choices=("trl", "troupe"), help="run one half (no ratio)")
    p.add_argument("--out", default="outputs/bench/vs_trl.json", help="results as JSON")
    p.add_argument("--trl-dir", default=".bench-trl", help="where TRL is installed for the bench")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="the tiny model for 2 steps, outputs under --out (a folder; temporary by default); never installs TRL",
    )
    p.add_argument(
        "--no-trl", action="store_true", help="smoke mode: skip the TRL half even when TRL is installed"
    )
    p.add_argument("--_half", choices=("trl", "troupe"), help=argparse.SUPPRESS)
    p.add_argument("--_spec", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._half:  # a child process: one half, its result as JSON
        spec = json.loads(Path(args._spec).read_text())
        result = run_trl(spec) if args._half == "trl" else run_troupe(spec)
        Path(args._result).write_text(json.dumps(result, indent=1))
        return

    skipped = []
    if args.smoke:
        from bench.troupe_run import smoke_out

        RUN_DIR = smoke_out(args.out if args.out != p.get_default("out") else None, "vs-trl")
        args.out = str(RUN_DIR / "vs_trl.json")
        args.tiny, args.steps = True, 2
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    busy = busy_processes()
    if busy:
        print(
            "bench/vs_trl: WARNING: other heavy jobs are running; timings will be skewed:", *busy, sep="\n  "
        )
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    trl_dir = (ROOT / args.trl_dir).resolve()
    install, rendering = None, None
    if args.smoke and args.only != "troupe":
        install = None if args.no_trl else installed_trl(trl_dir)
        if install is None:
            args.only = "troupe"
            why = (
                "--no-trl"
                if args.no_trl
                else f"TRL is not installed in {_shown(trl_dir)} (smoke mode never installs it)"
            )
            skipped.append(
                f"the TRL half ({why}): TRL's install and GRPOTrainer run; its prompt rows were rendered with the "
                "tokenizer's chat template and checked against troupe's token ids instead"
            )
    elif args.only != "troupe":
        install = ensure_trl(trl_dir)
    spec = build_spec(args)
    spec_path = RUN_DIR / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    if skipped:
        rendering = check_rendering(spec)
        print(
            f"bench/vs_trl: smoke: TRL's prompt rows match troupe's token ids for {rendering['steps_checked']} steps "
            f"(tokenizer-level rendering)",
            flush=True,
        )
    print(
        "bench/vs_trl: measuring the matmul roofline with the model's own layer shapes (2 threads)",
        flush=True,
    )
    tokens = (64,) if args.smoke else (512, 2048)  # smoke: the code path, not the number
    # bf16 only where a half computes in it: without native bf16 (neither does then) torch's emulated bf16 matmul
    # runs at ~1 GFLOP/s and its peak alone would take minutes.
    uses_bf16 = spec["trl_bf16"] or spec["troupe_learner"]["dtype"] == "bfloat16"
    peaks = {
        d: matmul_peak(spec["model_path"], d, tokens=tokens) if d == "float32" or uses_bf16 else None
        for d in ("bfloat16", "float32")
    }
    params = matmul_params(spec["model_path"])

    results = {}
    for half in ("trl", "troupe"):
        if args.only in (None, half):
            results[half] = run_half(half, spec_path, trl_dir)
    summaries = {h: summarise(r, params, peaks) for h, r in results.items()}
    out = {
        "spec": spec,
        "machine": {"cpus": os.cpu_count(), "cpu": _cpu_model(), "native_bf16": spec["native_bf16"]},
        "matmul_peak_tflops_2_threads": peaks,
        "matmul_params": params,
        "trl_install": install,
        "smoke": args.smoke,
        "skipped": skipped,
        "prompt_rendering_check": rendering,
        "results": results,
        "summary": summaries,
    }
    if len(summaries) == 2:
        out["ratio_troupe_over_trl_completions_per_s"] = (
            summaries["troupe"]["completions_per_s"] / summaries["trl"]["completions_per_s"]
        )
    out_path = Path(args.out).resolve()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=1))
    report(spec, results, summaries, peaks, params, install, out_path)
    for what in skipped:
        print(f"bench/vs_trl: smoke: skipped {what}")


if __name__ == "__main__":
    main()
