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


def candidates_path(out: str) -> Path:
    return Path(out).with_name(Path(out).name + ".candidates.jsonl")


def sampled_with(cfg) -> dict:
    """What the candidates depend on: an earlier run's are reused only when all of it is the same."""
    g = cfg.generator
    return {
        "policy": cfg.model.policy,
        "seed": cfg.run.seed,
        "n": cfg.best_of_n.n,
        **{k: getattr(g, k) for k in ("backend", "dtype", "temperature", "top_p", "max_new_tokens")},
    }


def saved_candidates(path: Path, prompts: list, sampling: dict) -> list[list[dict]] | None:
    """The candidates an earlier run of the same prompts and sampling generated, or None when there are none."""
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if [r["prompt"] for r in rows] != prompts or any(r.get("sampling") != sampling for r in rows):
        return None
    return [r["candidates"] for r in rows]


def generate_candidates(cfg, prompts: list) -> list[list[dict]]:
    """N samples per prompt from model.policy: [{"text", "finish_reason"}] per prompt, in prompt order."""
    from transformers import AutoTokenizer

    from troupe.actors.generator.actor import Generator
    from troupe.actors.generator.sampling import Sampling
    from troupe.actors.models import resolve_model
    from troupe.actors.protocol import Prompt
    from troupe.cluster.run.runtime import generator_env

    b, g = cfg.best_of_n, cfg.generator
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
    grouped: list[list[dict]] = [[] for _ in prompts]
    for r in generator.generate(encoded, sampling):
        grouped[int(r.prompt.uid)].append({"text": r.response_text, "finish_reason": r.finish_reason})
    return grouped


def best_row(prompt, candidates: list[dict], results: list[dict]) -> dict:
    """The prompt's best-scored candidate with its breakdown; candidates the service could not score (an "error"
    result) are left out, and a prompt none of whose candidates scored keeps best=None."""
    rewards = [s.get("reward") for s in results]
    scored = [i for i, r in enumerate(rewards) if r is not None]
    row = {"prompt": prompt, "rewards": rewards, "errors": len(candidates) - len(scored)}
    if not scored:
        return {**row, "best": None, "finish_reason": None, "reward": None, "objectives": {}, "weights": {}}
    i = max(scored, key=lambda k: rewards[k])
    return {
        **row,
        "best": candidates[i]["text"],
        "finish_reason": candidates[i]["finish_reason"],  # "length": cut at generator.max_new_tokens
        "reward": rewards[i],
        "objectives": results[i].get("objectives", {}),
        "weights": results[i].get("weights", {}),
    }


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
    """The candidates are saved (`<out>.candidates.jsonl`) before scoring, and each scored request's prompts are
    appended to `out` as they come back: when scoring fails part-way, running the same command again reuses the
    candidates and scores only the prompts `out` does not hold yet."""
    b = cfg.best_of_n
    prompts, references, skipped = read_prompts(b.prompts, cfg.data.prompt_key, b.reference_key)
    out, saved = Path(b.out), candidates_path(b.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sampling = sampled_with(cfg)
    candidates = saved_candidates(saved, prompts, sampling)
    done = 0
    if candidates is None:
        candidates = generate_candidates(cfg, prompts)
        tmp = saved.with_name(saved.name + ".tmp")
        tmp.write_text(
            "".join(
                json.dumps({"prompt": p, "sampling": sampling, "candidates": c}) + "\n"
                for p, c in zip(prompts, candidates, strict=True)
            )
        )
        tmp.replace(saved)
        out.write_text("")
    elif out.exists():
        done = sum(1 for line in out.read_text().splitlines() if line.strip())
        if done > len(prompts):
            raise ValueError(f"{out}: {done} rows, more than the {len(prompts)} prompts of {b.prompts}")
    per_request = max(1, b.batch // b.n)  # whole prompts per request
    with open(out, "a") as sink:
        for start in range(done, len(prompts), per_request):
            chunk = range(start, min(start + per_request, len(prompts)))
            items = [
                {
                    "prompt": prompts[i],
                    "response": c["text"],
                    "finish_reason": c["finish_reason"],
                    **({"reference": references[i]} if b.reference_key else {}),
                }
                for i in chunk
                for c in candidates[i]
            ]
            try:
                results = post_score(b.url, items)
            except Exception as e:
                raise RuntimeError(
                    f"best-of-n: scoring stopped after {start} of {len(prompts)} prompts ({e}); {out} holds those, "
                    f"{saved} every candidate: run the same command again to score the rest"
                ) from e
            for k, i in enumerate(chunk):
                sink.write(
                    json.dumps(best_row(prompts[i], candidates[i], results[k * b.n : (k + 1) * b.n])) + "\n"
                )
            sink.flush()
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    scored = [r for r in rows if r["reward"] is not None]
    firsts = [r["rewards"][0] for r in scored if r["rewards"][0] is not None]
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    return {
        "prompts": len(prompts),
        "skipped": skipped,
        "unscored": len(rows) - len(scored),  # prompts none of whose candidates the service could score
        "errors": sum(r["errors"] for r in rows),
        "n": b.n,
        "mean_best_reward": mean([r["reward"] for r in scored]),
        "mean_first_sample_reward": mean(firsts),
        "mean_gain_over_first_sample": mean(
            [r["reward"] - r["rewards"][0] for r in scored if r["rewards"][0] is not None]
        ),
        "out": b.out,
        "candidates": str(saved),
    }
