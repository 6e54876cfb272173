"""Summaries and the printed comparison of bench/vs_trl.py: the machine's matmul peak, per-half medians and rates,
and the table with the ratio last."""

from __future__ import annotations

import json
import os
import statistics
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


TRL_PHASES = (
    "TRL phases: a GRPOTrainer subclass times _generate (tokenize + vLLM generate + decode; the weight sync inside "
    "it is subtracted and reported as sync), _calculate_rewards (score) and the patched sync_weights; a "
    "TrainerCallback takes the step time between consecutive on_step_end; learn = step - generate - score - sync "
    "(the old-policy forward, advantages, forward+backward and optimizer step)."
)


# ----------------------------------------------------------------------------------------------------------- install


def layer_matmuls(model_path: str) -> list[tuple[int, int, int]]:
    """The model's own matmuls per token, as (in, out, how many): every decoder layer's q/k/v/o and MLP
    projections, and the LM head (config.json of a Llama-style causal LM)."""
    c = json.loads((Path(model_path) / "config.json").read_text())
    h, layers = c["hidden_size"], c["num_hidden_layers"]
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or h // heads
    kv = c.get("num_key_value_heads") or heads
    return [
        (h, heads * head_dim, layers),  # q
        (h, kv * head_dim, 2 * layers),  # k, v
        (heads * head_dim, h, layers),  # o
        (h, c["intermediate_size"], 2 * layers),  # gate, up
        (c["intermediate_size"], h, layers),  # down
        (h, c["vocab_size"], 1),  # LM head
    ]


def matmul_peak(
    model_path: str, dtype_name: str, tokens=(512, 2048), threads: int = 2, reps: int = 3
) -> float:
    """The learner's roofline: TFLOP/s of the model's own matmuls as a training step runs them, for each weight
    [in, out] the forward [tokens, in] x [in, out] and the backward's two ([tokens, out] x [out, in] for the input
    gradient, [in, tokens] x [tokens, out] for the weight gradient), each the best of `reps`, weighted by how much
    of a step each is, at the best of the `tokens` sizes, with `threads` threads. Square matrices would overstate
    it: a small model's thin shapes run slower."""
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)

    def fastest(a, b) -> float:
        torch.mm(a, b)  # warm-up
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t)
        return best

    best = 0.0
    for m in tokens:
        flops = seconds = 0.0
        for k, n, count in layer_matmuls(model_path):
            for rows, inner, cols in ((m, k, n), (m, n, k), (k, m, n)):  # forward, input grad, weight grad
                a, b = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, cols, dtype=dtype)
                flops += 2 * rows * inner * cols * count
                seconds += fastest(a, b) * count
        best = max(best, flops / seconds / 1e12)
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
    bf16 = "bfloat16" in half["learner_dtype"]
    peak = peaks["bfloat16"] if bf16 else peaks["float32"]
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
        "learn_peak_dtype": "bfloat16" if bf16 else "float32",
        "reward_mean_first_last": (steps[0]["reward_mean"], steps[-1]["reward_mean"]),
    }


# ------------------------------------------------------------------------------------------------------------ driver


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
        "matmul roofline (the model's layer shapes, 2 threads): bf16 "
        + (
            f"{peaks['bfloat16']:.3f} TFLOP/s"
            if peaks["bfloat16"] is not None
            else "not measured (no half uses it)"
        )
        + f", fp32 {peaks['float32']:.3f} TFLOP/s"
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
        "unpadded; against the peak of the learner's dtype. With shared-prompt packing (troupe's "
        "train/prompts_packed=1) each prompt is computed once per group, so troupe's figure is the equivalent "
        "unpacked work per second, not the FLOPs its cores executed."
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
