"""Best-of-N with the reward service: sample N responses per prompt from a policy, score them all through a
running `troupe job=rm_serve`, keep the best. Writes one JSON line per prompt: the best response, its reward and
breakdown, and every candidate's reward.

  .venv/bin/python -m cluster.jobs.best_of_n --url http://127.0.0.1:8008 --prompts prompts.jsonl \
      --prompt-key question [--reference-key answer] --n 8 --out best.jsonl [--model ...] [--backend vllm|hf]
A prompt row without the key is skipped and counted (file:line on stderr); the service's 4xx names the field.
"""

from __future__ import annotations

import argparse
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


def best_of_n(args) -> dict:
    from transformers import AutoTokenizer

    from actors.generator.actor import Generator
    from actors.generator.config import GeneratorConfig
    from actors.generator.sampling import Sampling
    from actors.models import resolve_model
    from actors.protocol import Prompt
    from cluster.runtime import generator_env

    prompts, references, skipped = read_prompts(args.prompts, args.prompt_key, args.reference_key)
    config = GeneratorConfig(backend=args.backend, dtype=args.dtype, max_model_len=args.max_model_len)
    os.environ.update(generator_env(config))
    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoded = []
    for i, p in enumerate(prompts):
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else p
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tuple(tokenizer(text, add_special_tokens=False).input_ids)
        encoded.append(Prompt(str(i), ids, text))
    generator = Generator(config, model_path, seed=args.seed)
    sampling = Sampling(n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    rollouts = generator.generate(encoded, sampling)
    results = []
    per_request = max(1, args.batch // args.n) * args.n  # a prompt's candidates go in one request
    for start in range(0, len(rollouts), per_request):
        chunk = rollouts[start : start + per_request]
        items = [
            {
                "prompt": prompts[int(r.prompt.uid)],
                "response": r.response_text,
                "finish_reason": r.finish_reason,
                **({"reference": references[int(r.prompt.uid)]} if args.reference_key else {}),
            }
            for r in chunk
        ]
        results += post_score(args.url, items)
    gains, bests = [], []
    with open(args.out, "w") as out:
        for i, prompt in enumerate(prompts):
            group = list(
                zip(
                    rollouts[i * args.n : (i + 1) * args.n],
                    results[i * args.n : (i + 1) * args.n],
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
        "n": args.n,
        "mean_best_reward": sum(bests) / max(len(bests), 1),
        "mean_first_sample_reward": sum(b - g for b, g in zip(bests, gains, strict=True))
        / max(len(bests), 1),
        "mean_gain_over_first_sample": sum(gains) / max(len(gains), 1),
        "out": args.out,
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8008")
    parser.add_argument("--prompts", required=True, help="a JSONL file of prompts")
    parser.add_argument("--prompt-key", default="prompt")
    parser.add_argument(
        "--reference-key", default=None, help="the answer field, for objectives that check one"
    )
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--out", default="best_of_n.jsonl")
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--backend", default="vllm", choices=("vllm", "hf"))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=64, help="items per request")
    parser.add_argument("--seed", type=int, default=0)
    summary = best_of_n(parser.parse_args(argv))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
