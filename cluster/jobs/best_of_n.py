"""Best-of-N with the reward service: sample N responses per prompt from a policy, score them all through a
running `troupe rm serve`, keep the best. Writes one JSON line per prompt: the best response, its reward and
breakdown, and every candidate's reward.

  troupe best-of-n best_of_n.prompts=prompts.jsonl data.prompt_key=question [best_of_n.reference_key=answer] \
      best_of_n.n=8 best_of_n.out=best.jsonl [model.policy=...] [generator.backend=vllm|hf]
A prompt row without the key is skipped and counted (file:line on stderr); the service's 4xx names the field.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path


def post_score(url: str, items: list[dict], timeout: float = 600.0) -> list[dict]:
    request = urllib.request.Request(
        url.rstrip("/") + "/score",
        data=json.dumps({"items": items}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())["results"]
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"reward service answered {e.code}: {e.read().decode(errors='replace')}") from e


def read_prompts(path: str, key: str, reference_key: str | None) -> tuple[list, list, int]:
    """Prompts, their references ("" without a reference key) and how many rows were skipped."""
    rows, references, skipped = [], [], 0
    for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = row[key]
            reference = "" if not reference_key or row[reference_key] is None else str(row[reference_key])
        except (ValueError, KeyError, TypeError) as e:
            skipped += 1
            print(f"{path}:{line_no}: skipped ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        rows.append(prompt)
        references.append(reference)
    return rows, references, skipped


def best_of_n(cfg) -> dict:
    """`cfg`: the typed TroupeConfig (best_of_n.*, model.policy, generator.*, data.prompt_key, run.seed). Writing
    into run.output_dir (the default best_of_n.out), it holds that folder like every job."""
    from troupe.cluster.durability.run_folder import claim

    out_dir = Path(cfg.run.output_dir).resolve()
    if not Path(cfg.best_of_n.out).resolve().is_relative_to(out_dir):
        return _sample_and_pick(cfg)
    with claim(out_dir):
        return _sample_and_pick(cfg)


def _sample_and_pick(cfg) -> dict:
    from transformers import AutoTokenizer

    from troupe.actors.generator.actor import Generator
    from troupe.actors.generator.sampling import Sampling
    from troupe.actors.models import resolve_model
    from troupe.actors.protocol import Prompt
    from troupe.cluster.run.runtime import generator_env

    b, g = cfg.best_of_n, cfg.generator
    prompts, references, skipped = read_prompts(b.prompts, cfg.data.prompt_key, b.reference_key)
    os.environ.update(generator_env(g))
    model_path = resolve_model(cfg.model.policy)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoded = []
    for i, p in enumerate(prompts):
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else p
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tuple(tokenizer(text, add_special_tokens=False).input_ids)
        encoded.append(Prompt(str(i), ids, text))
    generator = Generator(g, model_path, seed=cfg.run.seed)
    sampling = Sampling(n=b.n, temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens)
    rollouts = generator.generate(encoded, sampling)
    Path(b.out).parent.mkdir(parents=True, exist_ok=True)
    results = []
    per_request = max(1, b.batch // b.n) * b.n  # a prompt's candidates go in one request
    for start in range(0, len(rollouts), per_request):
        chunk = rollouts[start : start + per_request]
        items = [
            {
                "prompt": prompts[int(r.prompt.uid)],
                "response": r.response_text,
                "finish_reason": r.finish_reason,
                **({"reference": references[int(r.prompt.uid)]} if b.reference_key else {}),
            }
            for r in chunk
        ]
        results += post_score(b.url, items)
    gains, bests = [], []
    with open(b.out, "w") as out:
        for i, prompt in enumerate(prompts):
            group = list(
                zip(
                    rollouts[i * b.n : (i + 1) * b.n],
                    results[i * b.n : (i + 1) * b.n],
                    strict=True,
                )
            )
            best_rollout, best = max(group, key=lambda pair: pair[1]["reward"])
            rewards = [s["reward"] for _, s in group]
            gains.append(best["reward"] - rewards[0])  # against taking the first sample
            bests.append(best["reward"])
            row = {
                "prompt": prompt,
                "best": best_rollout.response_text,
                "finish_reason": best_rollout.finish_reason,  # "length": cut at --max-new-tokens
                "reward": best["reward"],
                "objectives": best["objectives"],
                "weights": best["weights"],
                "rewards": rewards,
            }
            out.write(json.dumps(row) + "\n")
    summary = {
        "prompts": len(prompts),
        "skipped": skipped,
        "n": b.n,
        "mean_best_reward": sum(bests) / max(len(bests), 1),
        "mean_first_sample_reward": sum(b - g for b, g in zip(bests, gains, strict=True))
        / max(len(bests), 1),
        "mean_gain_over_first_sample": sum(gains) / max(len(gains), 1),
        "out": b.out,
    }
    return summary
